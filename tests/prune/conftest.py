"""Prune fixtures: a tiny checkpoint whose run data is a small local corpus (for calibration)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from llmcli.config_loader import load_config

CORPUS = "".join(f"LINE {i}: the quick brown fox jumps over the lazy dog, and so on {i % 7}.\n" for i in range(300))


@pytest.fixture
def corpus_run(tmp_path, write_run) -> Callable[..., Path]:
    """corpus_run(model, tokenizer, name=): a checkpoint of `model` whose config.yaml reads CORPUS."""

    def make(model, tokenizer, name: str = "run") -> Path:
        corpus = tmp_path / "corpus.txt"
        corpus.write_text(CORPUS)
        cfg = load_config(None, [f"data.source={corpus}", "train.batch_size=4"])
        return write_run(tmp_path / name, model, tokenizer, cfg)

    return make


@pytest.fixture
def corpus_tokenizer():
    from llmcli.config import TokenizerConfig
    from llmcli.tokenizer import train_tokenizer

    return train_tokenizer(TokenizerConfig(kind="char"), [CORPUS])
