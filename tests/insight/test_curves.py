"""`llmcli plot` and `train --plot`: curves read from metrics.jsonl, several runs overlaid, in a
picture or the terminal; a run without metrics, or without the metric asked for, is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmcli.errors import UserError
from llmcli.insight import curves


def write_metrics(run: Path, steps: int = 20, eval_every: int = 5, scale: float = 1.0,
                  keys: tuple[str, ...] = ("train_loss", "train_acc", "lr", "tokens_per_second"),
                  evals: tuple[str, ...] = ("val_loss", "val_ppl", "val_acc")) -> Path:
    """A run directory whose metrics.jsonl holds log rows every step and eval rows every
    `eval_every` steps, as the trainer writes them (128 tokens a step, 0.5 s a step)."""
    run.mkdir(parents=True)
    rows = []
    for step in range(1, steps + 1):
        values = {"train_loss": scale * 4 / step, "train_acc": step / 40, "lr": 1e-3 * step,
                  "tokens_per_second": 1000.0 + step}
        rows.append({"step": step, **{k: values[k] for k in keys}, "tokens_seen": 128 * step,
                     "elapsed": 0.5 * step})
        if step % eval_every == 0:
            values = {"val_loss": scale * 5 / step, "val_ppl": np.exp(5 / step), "val_acc": 0.1}
            rows.append({"step": step, **{k: values[k] for k in evals}})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_curves_are_the_values_in_the_metrics_file(tmp_path):
    a, b = write_metrics(tmp_path / "a"), write_metrics(tmp_path / "b", steps=10, scale=2.0)
    series = curves.load_curves([a, b], "loss", "step")
    assert [(s.run, s.key, len(s.x)) for s in series] == [
        (str(a), "train_loss", 20), (str(a), "val_loss", 4), (str(b), "train_loss", 10), (str(b), "val_loss", 2)]
    np.testing.assert_array_equal(series[1].x, [5, 10, 15, 20])
    np.testing.assert_allclose(series[1].y, [1.0, 0.5, 5 / 15, 0.25])
    np.testing.assert_allclose(series[3].y, [2.0, 1.0])
    (lr,) = curves.load_curves([a], "lr", "tokens")
    np.testing.assert_allclose(lr.x, 128 * np.arange(1, 21))
    (val,) = curves.load_curves([a], "val_ppl", "time")  # any key of the file, against time
    np.testing.assert_allclose(val.x, [2.5, 5.0, 7.5, 10.0])


def test_evaluation_rows_take_tokens_and_time_from_the_log_rows_around_them(tmp_path):
    run = tmp_path / "sparse"
    run.mkdir()
    rows = [{"step": 10, "train_loss": 3.0, "tokens_seen": 1000, "elapsed": 4.0},
            {"step": 20, "train_loss": 2.0, "tokens_seen": 2000, "elapsed": 8.0},
            {"step": 15, "val_loss": 2.5}, {"step": 25, "val_loss": 1.9}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    val = curves.load_curves([run], "loss", "tokens")[1]
    np.testing.assert_allclose(val.x, [1500, 2500])
    val = curves.load_curves([run], "loss", "time")[1]
    np.testing.assert_allclose(val.x, [6.0, 10.0])


def test_a_trained_runs_file_plots_and_reads_back(cli, trained_runs, tmp_path, read_png):
    out = tmp_path / "curves.png"
    result = cli("plot", trained_runs["gpt2"], trained_runs["llama"], "--out", out, "--log")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stderr and "4 curves" in result.stderr
    read_png(out, (600, 300))
    for metric, x in (("acc", "tokens"), ("lr", "time"), ("tokens_per_second", "step")):
        assert cli("plot", trained_runs["gpt2"], "--metric", metric, "--x", x, "--out", out).exit_code == 0
        read_png(out, (600, 300))


def test_the_picture_draws_exactly_those_values(tmp_path, read_png):
    a, b = write_metrics(tmp_path / "a"), write_metrics(tmp_path / "b", steps=10, scale=3.0)
    series = curves.load_curves([a, b], "loss", "tokens")
    figure = curves.draw(series, tmp_path / "c.png", "loss", "tokens", log=True)
    (ax,) = figure.axes
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == [s.label for s in series]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [s.label for s in series]
    np.testing.assert_allclose(lines[3].get_xdata(), [640, 1280])
    np.testing.assert_allclose(lines[3].get_ydata(), [3.0, 1.5])
    assert lines[0].get_color() == lines[1].get_color() != lines[2].get_color()  # a colour per run
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "tokens seen"
    read_png(tmp_path / "c.png", (600, 300))


def test_the_terminal_view_draws_every_curve(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = write_metrics(Path("a")), write_metrics(Path("b"), scale=2.0)
    result = cli("plot", a, b)
    assert result.exit_code == 0, result.output
    for label in ("a train_loss", "a val_loss", "b train_loss", "b val_loss"):
        assert label in result.stdout
    assert "loss against step" in result.stdout and "\x1b[" not in result.stdout  # no colours in a pipe
    assert "10.0" in cli("plot", a, "--x", "time", "--log").stdout  # the last elapsed, on the x axis


def test_refusals_are_one_line_and_write_nothing(cli, tmp_path, one_line_error):
    good = write_metrics(tmp_path / "good", keys=("train_loss",), evals=("val_loss",))
    out = tmp_path / "out.png"
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(cli("plot", empty, "--out", out), f"{empty} has no metrics.jsonl")
    one_line_error(cli("plot", good, tmp_path / "missing", "--out", out), "run not found")
    one_line_error(cli("plot", good, "--metric", "acc", "--out", out),
                   "has no 'acc' values (train_acc, val_acc); it has elapsed, tokens_seen, train_loss, val_loss")
    (good / "metrics.jsonl").write_text('{"step": 1, "train_loss": 2.0}\n')
    one_line_error(cli("plot", good, "--metric", "val_loss", "--out", out), "has no 'val_loss' values")
    one_line_error(cli("plot", good, "--x", "tokens", "--out", out), "records no tokens_seen")
    one_line_error(cli("plot", good, "--x", "epochs"), "--x must be one of step, tokens, time")
    (empty / "metrics.jsonl").write_text("")
    one_line_error(cli("plot", empty, "--out", out), "holds no metrics yet")
    (empty / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    one_line_error(cli("plot", empty), "line 2 is not JSON")
    one_line_error(cli("plot", good, "--out", tmp_path / "good" / "metrics.jsonl" / "x.png"), "is not a directory")
    one_line_error(cli("plot", good, "--out", "/sys/llmcli-curves.png"), "cannot write in /sys")
    assert not out.exists()


def test_a_torn_last_line_is_skipped(tmp_path):
    run = write_metrics(tmp_path / "run", steps=5)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "train_lo')
    (train, _) = curves.load_curves([run], "loss", "step")
    assert train.x.tolist() == [1, 2, 3, 4, 5]


def test_a_checkpoint_inside_a_run_plots_its_run(tmp_path):
    run = write_metrics(tmp_path / "run")
    (run / "best").mkdir()
    assert curves.metrics_path(run / "best") == run / "metrics.jsonl"
    with pytest.raises(UserError, match="has no metrics.jsonl"):
        curves.metrics_path(tmp_path)


def test_train_plot_writes_curves_at_every_evaluation(cli, tmp_path, read_png, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line {i}: a small corpus to learn from.\n" for i in range(300)))
    written = []
    real = curves.write_run_curves
    monkeypatch.setattr(curves, "write_run_curves", lambda run: written.append(read_rows(run)) or real(run))
    run = tmp_path / "run"
    result = cli("train", "--out", run, "--plot", f"data.source={corpus}", "model.n_layer=1", "model.n_head=2",
                 "model.d_model=16", "model.block_size=16", "train.batch_size=4", "train.max_steps=9",
                 "train.eval_interval=4", "train.eval_batches=1", "train.log_interval=2")
    assert result.exit_code == 0, result.output
    assert [rows[-1]["step"] for rows in written] == [4, 8, 9]  # each evaluation, its row already there
    read_png(run / "curves.png", (600, 300))


def read_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
