"""`llmcli prune`: the checkpoint it writes loads in every command, the table, fine-tuning (a run
that resumes), magnitude storage, and bad input refused with one line, writing nothing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llmcli.checkpoint import load_model, read_pruning
from llmcli.load import load_checkpoint
from llmcli.options.checkpoints import PruneOptions
from llmcli.options.inference import ServeOptions
from llmcli.prune import magnitude
from llmcli.prune.command import print_report, prune_checkpoint


def prune(run, out, **kwargs):
    kwargs.setdefault("eval_tokens", 0)
    kwargs.setdefault("decode_tokens", 0)
    return prune_checkpoint(PruneOptions(run_dir=run, out=out, calibration_batches=2, **kwargs))


@pytest.fixture(scope="module")
def pruned_llama(trained_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "llama"
    report = prune(trained_runs["llama"], out, heads=0.25, mlp=0.3, eval_tokens=256, decode_tokens=8)
    return out, report


def test_the_pruned_checkpoint_is_smaller_and_says_how_it_was_made(pruned_llama, trained_runs):
    out, report = pruned_llama
    saved = json.loads((out / "model.json").read_text())
    assert saved["pruning"] == read_pruning(out) == {"method": "structured", "from": str(trained_runs["llama"].resolve()),
                                                      "heads": 0.25, "mlp": 0.3}
    assert sum(saved["layer_heads"]) == 3 and sum(saved["layer_ff"]) == round(0.7 * 2 * 128)
    original, pruned = report.columns
    assert pruned.parameters < original.parameters and pruned.size_bytes < original.size_bytes
    assert original.agreement == 1 and 0 <= pruned.agreement <= 1
    assert set(original.decode) == {1, 8} and all(min(v) > 0 for v in pruned.decode.values())
    assert original.perplexity > 1 and pruned.perplexity > 1 and original.eval_tokens == 256


def test_the_table_names_each_model(pruned_llama):
    from rich.console import Console

    console = Console(width=200, record=True)
    print_report(pruned_llama[1], console)
    text = console.export_text()
    for row in ("parameters", "weights file", "val perplexity (256 tokens)", "decode tok/s (batch 1, greedy)",
                "decode tok/s (batch 8, greedy)", "greedy tokens equal to the original's", "structured pruned"):
        assert row in text, row


def test_a_pruned_checkpoint_loads_in_every_command(pruned_llama, cli, tmp_path, trained_runs):
    out, _ = pruned_llama
    result = cli("eval", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["perplexity"] > 1
    result = cli("generate", out, "LINE", "--max-new-tokens", "5", "--seed", "1")
    assert result.exit_code == 0, result.output
    result = cli("quantize", out, "--method", "int8", "--out", tmp_path / "q", "--eval-tokens", "64", "--decode-tokens", "4")
    assert result.exit_code == 0, result.output
    assert load_model(tmp_path / "q").config.layer_heads == load_model(out).config.layer_heads
    result = cli("train", "--init-from", out, "--out", tmp_path / "ft", f"data.source={trained_runs['llama'] / '..' / 'corpus.txt'}",
                 "train.max_steps=2", "train.eval_interval=2", "train.eval_batches=1", "train.batch_size=2")
    assert result.exit_code == 0, result.output
    assert read_pruning(tmp_path / "ft")["method"] == "structured"


def test_a_pruned_checkpoint_serves(pruned_llama):
    from fastapi.testclient import TestClient

    from llmcli.serve.app import create_app
    from llmcli.serve.server import build_state

    out, _ = pruned_llama
    loaded = load_checkpoint(out)
    model, tokenizer = loaded.model, loaded.tokenizer
    state = build_state(model, tokenizer, ServeOptions(run_dir=out))
    with TestClient(create_app(state)) as client:
        reply = client.post("/v1/completions", json={"model": out.name, "prompt": "LINE", "max_tokens": 4,
                                                     "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 4


@pytest.mark.slow
def test_fine_tuning_is_a_run_that_resumes(trained_runs, tmp_path, cli):
    out = tmp_path / "ft"
    report = prune(trained_runs["gpt2"], out, sparsity=0.25, finetune_steps=3, eval_tokens=128,
                   overrides=["train.eval_interval=3", "train.eval_batches=1"])
    assert [c.name for c in report.columns] == ["original", "structured pruned", "+ 3 steps"]
    assert (out / "state").is_dir() and (out / "best").is_dir()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()][-1] == 3
    assert read_pruning(out)["heads"] == 0.25 and load_model(out).config.layer_ff is not None
    assert not list(tmp_path.glob(".ft.pruned.*"))  # the staged pruned checkpoint is gone
    result = cli("train", "--resume", out, "train.max_steps=4")
    assert result.exit_code == 0, result.output
    assert read_pruning(out)["method"] == "structured"


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_pruning_is_stored_as_values_and_a_bitmask(trained_runs, tmp_path, scope):
    out = tmp_path / "m"
    prune(trained_runs["gpt2"], out, method="magnitude", sparsity=0.5, scope=scope)
    stored = load_file(str(out / "model.safetensors"))
    assert "blocks.0.mlp.up_proj.weight.sparse_mask" in stored and "blocks.0.mlp.up_proj.weight" not in stored
    assert (out / "model.safetensors").stat().st_size < 0.75 * (trained_runs["gpt2"] / "model.safetensors").stat().st_size
    loaded, original = load_model(out), load_model(trained_runs["gpt2"])
    assert magnitude.sparsity_of(loaded) == pytest.approx(0.5, abs=0.01)
    for (name, a), b in zip(loaded.state_dict().items(), original.state_dict().values(), strict=True):
        assert torch.equal(a[a != 0], b[a != 0]), name  # what is kept is the original weight
    weights = [magnitude_share(getattr(m, n)) for m, n in magnitude.targets(loaded)]
    assert (max(weights) - min(weights) < 0.01) == (scope == "layer")
    assert read_pruning(out) == {"method": "magnitude", "sparsity": 0.5, "scope": scope,
                                 "from": str(trained_runs["gpt2"].resolve())}


def magnitude_share(weight):
    return float((weight == 0).float().mean())


def test_magnitude_pruning_works_for_recurrent_models(trained_runs, tmp_path):
    out = tmp_path / "m"
    prune(trained_runs["lstm"], out, method="magnitude", sparsity=0.8)
    assert magnitude.sparsity_of(load_model(out)) == pytest.approx(0.8, abs=0.01)
    with torch.no_grad():
        assert load_model(out)(torch.zeros(1, 4, dtype=torch.long)).isfinite().all()


def test_structured_pruning_of_a_recurrent_run(trained_runs, tmp_path, cli):
    out = tmp_path / "r"
    prune(trained_runs["gru"], out, hidden=0.25)
    assert load_model(out).config.hidden_size == 24
    assert cli("eval", out).exit_code == 0


@pytest.mark.parametrize("args,fragments", [
    (["--sparsity", "1.0"], ["--sparsity must be in [0, 1); got 1.0"]),
    (["--heads", "-0.1"], ["--heads must be in [0, 1)"]),
    ([], ["--sparsity or --heads / --mlp / --hidden / --layers: say how much to remove"]),
    (["--method", "magnitude"], ["--sparsity is needed with --method magnitude"]),
    (["--method", "magnitude", "--sparsity", "0.5", "--finetune-steps", "5"], ["--finetune-steps is for --method structured"]),
    (["--method", "2:4"], ["--method 2:4 needs a CUDA GPU"]),
    (["--hidden", "0.5"], ["--hidden: this model has no hidden units to prune"]),
    (["--heads", "0.9"], ["--heads 0.9 would remove every attention head of layer"]),
    (["--layers", "2"], ["--layers 2: at most 1 of this model's 2 layers can go (it keeps one)"]),
    (["--layers", "0"], ["--layers must be at least 1"]),
    (["--method", "magnitude", "--sparsity", "0.5", "--layers", "1"], ["--layers is for --method structured"]),
])
def test_bad_input_is_one_line_and_writes_nothing(trained_runs, tmp_path, cli, one_line_error, args, fragments):
    out = tmp_path / "out"
    one_line_error(cli("prune", trained_runs["gpt2"], "--out", out, *args), *fragments)
    assert not out.exists()


def test_a_quantized_or_missing_source_is_refused(trained_runs, tmp_path, cli, one_line_error):
    one_line_error(cli("prune", tmp_path / "nope", "--out", tmp_path / "o", "--mlp", "0.5"), "checkpoint not found")
    cli("quantize", trained_runs["gpt2"], "--method", "int8", "--out", tmp_path / "q", "--eval-tokens", "0",
        "--decode-tokens", "0")
    one_line_error(cli("prune", tmp_path / "q", "--out", tmp_path / "o", "--mlp", "0.5"), "is quantized (int8)")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_magnitude_pruning_of_a_seq2seq_run(seq2seq_runs, tmp_path, cli):
    out = tmp_path / "m"
    prune(seq2seq_runs["encoder-decoder"], out, method="magnitude", sparsity=0.5)
    assert magnitude.sparsity_of(load_model(out)) == pytest.approx(0.5, abs=0.01)
    result = cli("eval", out)
    assert result.exit_code == 0, result.output
