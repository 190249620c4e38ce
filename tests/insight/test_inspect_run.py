"""`llmcli inspect`: a run's family, shape, parameters, tokenizer, quantization, LoRA adapter,
training summary and files, as a table and as JSON, every number checked against its source."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmcli.checkpoint import load_model
from llmcli.config_loader import load_config
from llmcli.data.prepare import cache_dir_for, load_prepared
from llmcli.insight.curves import read_metrics
from llmcli.options.checkpoints import QuantizeOptions
from llmcli.quantize.command import quantize_checkpoint


@pytest.fixture
def prepared_here(trained_runs, monkeypatch):
    """The trained runs' prepared data is in this machine's cache (epochs can be counted)."""
    monkeypatch.setenv("LLMCLI_CACHE_DIR", str(trained_runs["gpt2"].parent / "cache"))


def inspect_json(cli, path) -> dict:
    result = cli("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.usefixtures("prepared_here")
def test_a_trained_run_is_summarised_from_its_files(cli, trained_runs):
    run = trained_runs["gpt2"]
    info = inspect_json(cli, run)
    model = load_model(run)
    assert info["family"] == "transformer" and info["model"]["d_model"] == 32 and info["model"]["n_layer"] == 2
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert info["parameters"] == {"total": model.num_params(), "embedding": embedding,
                                  "non_embedding": model.num_params() - embedding}
    assert info["tokenizer"]["kind"] == "char" and info["tokenizer"]["vocab_size"] == model.config.vocab_size
    assert info["quantization"] is None and info["adapter"] is None
    rows = read_metrics(run / "metrics.jsonl")
    t = info["training"]
    assert t["step"] == 60 and t["tokens_seen"] == 60 * 8 * 32
    assert t["best_val_loss"] == min(r["val_loss"] for r in rows if "val_loss" in r)
    assert 0 < t["epochs"] < 10
    assert info["files"]["model.safetensors"] == (run / "model.safetensors").stat().st_size
    assert info["files"]["metrics.jsonl"] == (run / "metrics.jsonl").stat().st_size
    assert {"best/", "last/", "state/", "config.yaml"} <= set(info["files"])


@pytest.mark.usefixtures("prepared_here")
def test_epochs_are_the_recorded_ones_else_tokens_over_the_training_split(cli, trained_runs,
                                                                          tmp_path, monkeypatch):
    run = shutil.copytree(trained_runs["gpt2"], tmp_path / "run", symlinks=True)
    rows = read_metrics(run / "metrics.jsonl")

    def epochs_with(rows: list[dict]) -> dict:
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return inspect_json(cli, run)["training"]

    unrecorded = [{k: v for k, v in r.items() if k != "epoch"} for r in rows]
    counted = epochs_with(unrecorded)
    tokens = load_prepared(cache_dir_for(load_config(run / "config.yaml"))).stats["train"]["tokens"]
    assert counted["train_split_tokens"] == tokens and counted["epochs"] == 60 * 8 * 32 / tokens
    recorded = epochs_with([{**r, "epoch": r["step"] / 40} for r in rows])
    assert recorded["epochs"] == 1.5 and recorded["train_split_tokens"] is None
    monkeypatch.setenv("LLMCLI_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert "epochs" not in epochs_with(unrecorded)
    assert "the run's data is not prepared here" in cli("inspect", run).stdout


@pytest.mark.usefixtures("prepared_here")
def test_the_table_shows_the_same_summary(cli, trained_runs):
    run = trained_runs["llama"]
    info = inspect_json(cli, run)
    result = cli("inspect", run)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for fragment in ("family", "transformer", f"{info['parameters']['total']:,}",
                     f"{info['parameters']['non_embedding']:,}", "char (WordLevel)", "none (float weights)",
                     f"{info['training']['best_val_loss']:.4f} (step 60)", f"{info['training']['epochs']:.3f}",
                     "metrics.jsonl", "model.safetensors"):
        assert fragment in out, fragment


def test_a_quantized_checkpoint_shows_its_method_and_logical_parameters(cli, trained_runs, tmp_path):
    out = tmp_path / "int8"
    quantize_checkpoint(QuantizeOptions(run_dir=trained_runs["llama"], out=out, method="int8",
                                        eval_tokens=0, decode_tokens=0))
    info = inspect_json(cli, out)
    assert info["quantization"]["method"] == "int8"
    assert info["parameters"] == inspect_json(cli, trained_runs["llama"])["parameters"]
    assert info["training"] == {} and "quantization" in cli("inspect", out).stdout


def test_a_lora_run_shows_its_adapter_and_base(cli, lora_run, trained_runs):
    from safetensors.torch import load_file

    info = inspect_json(cli, lora_run)
    adapter = info["adapter"]
    tensors = load_file(str(lora_run / "adapter_model.safetensors"))
    assert adapter["parameters"] == sum(t.numel() for t in tensors.values()) > 0
    assert adapter["r"] == 4 and adapter["base"] == str(trained_runs["llama"].resolve())
    assert adapter["base_problem"] is None and len(adapter["modules"]) == 2 * 3  # q, v, up in 2 layers
    assert info["training"]["step"] == 30
    out = cli("inspect", lora_run).stdout
    assert adapter["targets"] == ["q", "v", "up"] and "LORA r 4, alpha 16 on q, v, up (6 modules)" in out and f"({adapter['parameters']:,})" in out


def test_bad_paths_are_one_line_errors(cli, tmp_path, one_line_error):
    one_line_error(cli("inspect", tmp_path / "nothing"), "checkpoint not found")
    one_line_error(cli("inspect", tmp_path), "no model.safetensors in")


def embedding_split(model) -> dict[str, int]:
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    return {"total": model.num_params(), "embedding": embedding, "non_embedding": model.num_params() - embedding}


def test_a_recurrent_language_model_run(cli, trained_runs):
    run = trained_runs["lstm"]
    info = inspect_json(cli, run)
    model = load_model(run)
    assert (info["family"], info["task"], info["model"]["d_model"], info["model"]["n_layer"]) == ("lstm", "lm", 32, 2)
    assert info["parameters"] == embedding_split(model)
    assert info["tokenizer"]["kind"] == "char" and info["source_tokenizer"] is None and info["pruning"] is None
    rows = read_metrics(run / "metrics.jsonl")
    t = info["training"]
    assert t["step"] == 60 and t["tokens_seen"] == max(r["tokens_seen"] for r in rows if "tokens_seen" in r)
    assert t["best_val_loss"] == min(r["val_loss"] for r in rows if "val_loss" in r)
    out = cli("inspect", run).stdout
    assert "lstm" in out and f"{model.num_params():,}" in out and "source tokenizer" not in out


def test_a_seq2seq_run_shows_both_tokenizers(cli, seq2seq_runs):
    from llmcli.load import load_checkpoint

    run = seq2seq_runs["encoder-decoder"]
    info = inspect_json(cli, run)
    loaded = load_checkpoint(run)
    model, tokenizer, source = loaded.model, loaded.tokenizer, loaded.source_tokenizer
    assert (info["family"], info["task"], info["model"]["n_head"]) == ("encoder-decoder", "seq2seq", 4)
    assert info["parameters"] == embedding_split(model)
    assert info["tokenizer"]["kind"] == "word"
    assert info["tokenizer"]["vocab_size"] == tokenizer.get_vocab_size(with_added_tokens=True)
    assert info["source_tokenizer"]["kind"] == "char"
    assert info["source_tokenizer"]["vocab_size"] == source.get_vocab_size(with_added_tokens=True)
    rows = read_metrics(run / "metrics.jsonl")
    assert info["training"]["step"] == 40
    assert info["training"]["best_val_loss"] == min(r["val_loss"] for r in rows if "val_loss" in r)
    out = cli("inspect", run).stdout
    for fragment in ("encoder-decoder", "target tokenizer", "word (WordLevel)", "source tokenizer",
                     "char (WordLevel)", f"{model.num_params():,}", "best val loss"):
        assert fragment in out, fragment


def test_pruning_is_shown_when_the_checkpoint_records_it(cli, trained_runs, tmp_path, one_line_error):
    """The `pruning` entry `llmcli prune` writes into model.json (here by hand), shown as it is."""
    checkpoint = shutil.copytree(trained_runs["gpt2"] / "best", tmp_path / "pruned")
    model_json = json.loads((checkpoint / "model.json").read_text())
    lines = cli("inspect", checkpoint).stdout.splitlines()
    assert any("pruning" in line and "none" in line for line in lines) and inspect_json(cli, checkpoint)["pruning"] is None
    entry = {"method": "structured", "heads": 0.25, "mlp": 0.3, "from": "runs/gpt2"}
    (checkpoint / "model.json").write_text(json.dumps({**model_json, "pruning": entry}))
    info = inspect_json(cli, checkpoint)
    assert info["pruning"] == entry and "pruning" not in info["model"]
    assert info["parameters"] == inspect_json(cli, trained_runs["gpt2"])["parameters"]
    assert "method structured, heads 0.25, mlp 0.3, from runs/gpt2" in cli("inspect", checkpoint).stdout
    assert load_model(checkpoint).config == load_model(trained_runs["gpt2"]).config  # no model setting
    (checkpoint / "model.json").write_text(json.dumps({**model_json, "pruning": "half"}))
    one_line_error(cli("inspect", checkpoint), '"pruning" must be a JSON object')
