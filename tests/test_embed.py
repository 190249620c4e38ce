"""Sequence embeddings: every family pools through its own `embed`, a batch gives what each input gives
alone, and `llmcli embed` writes .npy or JSON lines and refuses what it cannot embed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmcli.config import ModelConfig
from llmcli.embed import Embedder
from llmcli.models.registry import FAMILIES, build_model


def family_config(arch: str) -> ModelConfig:
    fields = dict(arch=arch, n_layer=2, d_model=32, block_size=24, vocab_size=40)
    if arch in ("encoder-decoder", "gru-seq2seq", "lstm-seq2seq"):
        fields.update(source_block_size=20, src_vocab_size=30)
    if arch in ("transformer", "encoder-decoder"):
        fields.update(n_head=4)
    return ModelConfig(**fields)


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_every_family_pools_and_padding_changes_nothing(arch):
    torch.manual_seed(0)
    model = build_model(family_config(arch)).eval()
    assert model.pooling != "none"
    inputs = [[3, 4, 5], [7, 8, 9, 10, 11, 12, 2], [6]]
    embedder = Embedder(model, tokenizer=None)
    together = embedder.vectors(inputs)
    alone = np.concatenate([embedder.vectors([ids]) for ids in inputs])
    width = 64 if getattr(model.config, "bidirectional", False) and arch.endswith("seq2seq") else 32  # both directions
    assert together.shape == (3, width) and np.allclose(together, alone, atol=1e-5)
    assert np.allclose(np.linalg.norm(together, axis=1), 1, atol=1e-5)
    assert not np.allclose(together[0], together[1])
    assert embedder.limit == (20 if model.task == "seq2seq" else model.context_length)


def test_embed_command_writes_npy_and_jsonl(cli, trained_runs, tmp_path, one_line_error):
    lines = tmp_path / "lines.txt"
    lines.write_text("LINE 1: the quick brown fox\n\nthe lazy dog\n")
    out = tmp_path / "vectors.npy"
    result = cli("embed", trained_runs["gpt2"], "--input", lines, "--out", out)
    vectors = np.load(out)
    assert vectors.shape == (2, 32) and "2 texts -> 32-dimensional vectors (mean of the last hidden states" in \
        result.stderr
    jsonl = cli("embed", trained_runs["lstm"], "--input", lines).stdout.splitlines()
    rows = [json.loads(line) for line in jsonl]
    assert [r["text"] for r in rows] == ["LINE 1: the quick brown fox", "the lazy dog"] and len(rows[0]["embedding"]) == 32
    one_line_error(cli("embed", trained_runs["gpt2"], "--input", lines, "--out", out),
                   "already exists")
    long = tmp_path / "long.txt"
    long.write_text("short\n" + "x" * 40 + "\n")
    one_line_error(cli("embed", trained_runs["gpt2"], "--input", long, "--out", tmp_path / "v.jsonl"),
                   "line 2 has 40 tokens; this model embeds at most 32")
    assert not (tmp_path / "v.jsonl").exists()
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("ROMEO {\n")
    one_line_error(cli("embed", trained_runs["gpt2"], "--input", unknown), "never saw")
    one_line_error(cli("embed", trained_runs["gpt2"], "--input", lines, "--out", tmp_path / "v.csv"),
                   ".npy or .jsonl")
