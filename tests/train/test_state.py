"""Resume restores everything or refuses: damaged, pickled or mismatched state files are one-line
errors naming the file, and nothing of the run changes."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from llmcli.config_loader import load_config
from llmcli.train.loop import train
from llmcli.train.run_dir import RunPlan

TEXT = "".join(f"LINE {i}: the quick brown fox jumps over the lazy dog, and so on {i % 7}.\n" for i in range(600))


@pytest.fixture
def run(tmp_path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT)
    cfg = load_config(None, [f"data.source={corpus}", "model.n_layer=1", "model.n_head=2", "model.d_model=32",
                             "model.block_size=32", "model.dropout=0.1", "train.batch_size=4", "train.max_steps=4",
                             "train.warmup_steps=1", "train.eval_interval=4", "train.eval_batches=1"])
    train(RunPlan(cfg, tmp_path / "run"))
    return tmp_path / "run"


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def resume(cli, run: Path, *extra: str):
    return cli("train", "--resume", run, "train.max_steps=6", *extra)


def test_the_state_holds_no_pickles(run):
    names = sorted(p.name for p in (run / "state").iterdir())
    assert names == ["model.safetensors", "optimizer.json", "optimizer.safetensors", "rng-0.safetensors",
                     "strategy.json", "trainer_state.json"]
    assert "torch" in load_file(run / "state" / "rng-0.safetensors")


@pytest.mark.parametrize("damage, fragment", [
    (lambda s: (s / "rng-0.safetensors").write_bytes(b"\x80\x04 not a safetensors file"), "rng-0.safetensors"),
    (lambda s: save_file({"nothing": load_file(s / "rng-0.safetensors")["torch"]}, s / "rng-0.safetensors"),
     "not a random-generator state"),
    (lambda s: (s / "rng-0.safetensors").unlink(), "random state of 0 process(es)"),
    (lambda s: (s / "optimizer.safetensors").unlink(), "optimizer.safetensors is missing"),
    (lambda s: (s / "optimizer.json").write_text("{not json"), "optimizer.json: not valid JSON"),
    (lambda s: (s / "trainer_state.json").write_text('{"step": "many"}'), "trainer_state.json: expected the keys"),
    (lambda s: (s / "trainer_state.json").write_text("garbage"), "trainer_state.json: not valid JSON"),
    (lambda s: (s / "model.safetensors").write_bytes(b"\x00" * 10), "model.safetensors: cannot be read"),
    (lambda s: (s / "random_states_0.pkl").write_bytes(pickle.dumps({"x": 1})), "pickle files (random_states_0.pkl)"),
])
def test_a_damaged_state_file_is_refused_naming_it(run, cli, one_line_error, damage, fragment):
    damage(run / "state")
    before = snapshot(run)
    one_line_error(resume(cli, run), fragment)
    assert snapshot(run) == before


def test_a_config_edited_to_no_longer_match_the_weights_is_refused(run, cli, one_line_error):
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("d_model: 32", "d_model: 64"))
    one_line_error(resume(cli, run), "state/model.safetensors", "shape")


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(run, cli):
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 5, "train_lo')
    result = resume(cli, run)
    assert result.exit_code == 0, result.output
    assert "dropped its torn last line" in result.stderr
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert max(r["step"] for r in rows) == 6


def test_a_damaged_metrics_line_before_the_last_is_refused(run, cli, one_line_error):
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "}{", *lines[1:]]) + "\n")
    one_line_error(resume(cli, run), "metrics.jsonl: line 2 is not a metrics row")


def test_resuming_with_another_number_of_processes_is_refused(run, cli, one_line_error):
    save_file(load_file(run / "state" / "rng-0.safetensors"), run / "state" / "rng-1.safetensors")
    one_line_error(resume(cli, run), "random state of 2 process(es); this run has 1")
