"""Model cards: every run directory, checkpoint and export carries a README.md built from its own files
(family, shape, parameters, data, tokenizer, training summary, evaluation), for every family."""

from __future__ import annotations

import json

import pytest

from llmcli.checkpoint import load_model
from llmcli.model_card import CARD


def rows(card: str) -> dict[str, str]:
    """The table rows of a card: {key: value}."""
    found = {}
    for line in card.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 2 and cells[0]:
            found[cells[0]] = cells[1]
    return found


@pytest.mark.parametrize("name", ["gpt2", "llama", "lstm", "gru", "rnn"])
def test_a_run_and_its_checkpoints_carry_a_card_from_their_files(trained_runs, name):
    run = trained_runs[name]
    card = (run / CARD).read_text()
    found, model = rows(card), load_model(run)
    info = json.loads((run / "checkpoint.json").read_text())
    assert card.startswith(f"# {name}\n")
    assert found["family"].startswith(model.config.arch)
    assert found["parameters"].split("(")[1].startswith(f"{model.num_params():,})")
    assert found["vocabulary"] == f"{model.config.vocab_size:,}" and found["kind"] == "char"
    assert found["steps"].startswith(f"{info['step']:,} (")
    assert found["val perplexity"] == f"{info['val_ppl']:.4f}"
    assert found["best val loss"].startswith(f"{info['val_loss']:.4f}")  # from metrics.jsonl: the run's own log
    assert f"llmcli generate {run}" in card
    for checkpoint in ("best", "last"):
        assert rows((run / checkpoint / CARD).read_text())["val loss"] == f"{info['val_loss']:.4f}"


@pytest.mark.parametrize("arch", ["encoder-decoder", "gru-seq2seq"])
def test_a_seq2seq_card_shows_both_sides(seq2seq_runs, arch):
    found = rows((seq2seq_runs[arch] / CARD).read_text())
    assert found["family"] == arch and found["task"] == "seq2seq"
    assert "encoder" in found["shape"] and found["source side"].startswith("char, ")


def test_quantized_and_exported_folders_carry_cards(trained_runs, tmp_path, cli):
    run = trained_runs["gpt2"]
    assert cli("quantize", run, "--method", "int8", "--out", tmp_path / "q", "--eval-tokens", "0",
               "--decode-tokens", "0").exit_code == 0
    found = rows((tmp_path / "q" / CARD).read_text())
    assert found["quantization"] == "int8" and found["quantized from"] == str(run.resolve())
    assert cli("export", run, "--out", tmp_path / "hf").exit_code == 0
    card = (tmp_path / "hf" / CARD).read_text()
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation\n")
    assert "AutoModelForCausalLM.from_pretrained" in card and rows(card)["family"] == "transformer (gpt2 preset)"
