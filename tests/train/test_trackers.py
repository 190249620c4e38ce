"""train.log_with through Accelerate's trackers: TensorBoard's event files hold every logged value
(read back), the config goes in as hyper-parameters, a resume does not log a step twice, and a
tracker that is unknown or not installed is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from llmcli.config_loader import load_config
from llmcli.train.loop import train
from llmcli.train.run_dir import RunPlan
from llmcli.train.trackers import hyperparameters


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"row {i}: trackers keep what the run logs.\n" for i in range(300)))
    return path


def settings(corpus: Path, *extra: str) -> list[str]:
    return [f"data.source={corpus}", "model.n_layer=1", "model.n_head=2", "model.d_model=16",
            "model.block_size=16", "train.batch_size=4", "train.max_steps=8", "train.warmup_steps=2",
            "train.eval_interval=4", "train.eval_batches=1", "train.log_interval=2", *extra]


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `log_dir`, as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def logged(run: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key != "step":
                out.setdefault(key, []).append((row["step"], float(value)))
    return out


def assert_same(events: dict, rows: dict) -> None:
    assert set(events) == set(rows)
    for key, points in rows.items():
        assert [s for s, _ in events[key]] == [s for s, _ in points], key
        assert [v for _, v in events[key]] == pytest.approx([v for _, v in points], rel=1e-6), key


def test_tensorboard_event_files_hold_every_logged_value(cli, corpus, tmp_path):
    run = tmp_path / "run"
    result = cli("train", "--out", run, *settings(corpus, "train.log_with=[tensorboard]"))
    assert result.exit_code == 0, result.output
    rows = logged(run)
    assert {"train_loss", "val_loss", "val_acc", "lr"} <= set(rows)
    assert [s for s, _ in rows["val_loss"]] == [4, 8]
    assert_same(scalars(run / "logs" / "run"), rows)
    (hparams,) = (run / "logs" / "run").glob("*/hparams.yml")
    stored = yaml.safe_load(hparams.read_text())
    assert stored["model.d_model"] == 16 and stored["train.log_with"] == "['tensorboard']"
    assert stored["data.source"] == str(corpus)


def test_a_resumed_run_logs_each_step_once(corpus, tmp_path):
    """What a run killed after its step-4 checkpoint left in TensorBoard (steps 5-6) is dropped
    when it resumes from step 4 and logs them again."""
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    train(RunPlan(load_config(None, settings(corpus, "train.log_with=tensorboard", "train.max_steps=4")), run))
    killed = SummaryWriter(str(run / "logs" / "run"))
    for step in (5, 6):
        killed.add_scalar("train_loss", 99.0, global_step=step)
    killed.close()
    train(RunPlan(load_config(run / "config.yaml", ["train.max_steps=8"]), run, resume=True))
    events = scalars(run / "logs" / "run")
    assert [s for s, _ in events["train_loss"]] == [1, 2, 4, 5, 6, 8]  # the first step after a resume logs
    assert_same(events, logged(run))


def test_unknown_or_missing_trackers_are_refused_before_anything_is_written(cli, corpus, tmp_path,
                                                                            one_line_error, monkeypatch):
    run = tmp_path / "run"
    one_line_error(cli("train", "--out", run, *settings(corpus, "train.log_with=[tensorboard,notebook]")),
                   "train.log_with: unknown tracker 'notebook' (known: tensorboard, wandb, mlflow")
    monkeypatch.setattr("accelerate.tracking.get_available_trackers", lambda: ["tensorboard"])
    one_line_error(cli("train", "--out", run, *settings(corpus, "train.log_with=[tensorboard,wandb]")),
                   "train.log_with: wandb is not installed; pip install wandb")
    one_line_error(cli("train", "--out", run, *settings(corpus, "train.log_with=comet_ml")),
                   "pip install comet-ml")
    assert not run.exists()


def test_hyperparameters_are_flat_scalars(corpus):
    flat = hyperparameters(load_config(None, settings(corpus, "data.val_plays=[hamlet]", "train.lora.r=4")))
    assert flat["train.max_steps"] == 8 and flat["model.bias"] is True and flat["train.lora.r"] == 4
    assert flat["data.val_plays"] == "['hamlet']" and flat["model.n_kv_head"] == "None"
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
