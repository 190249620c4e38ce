"""Training curves from a run's metrics.jsonl: `llmcli plot`, and curves.png for `train --plot`.

Every point comes from the file: log rows carry the training metrics (train_loss, train_acc, lr,
tokens_per_second, tokens_seen, elapsed), evaluation rows the validation ones (val_loss, val_ppl,
val_acc) at their step. An evaluation row's tokens and time, which it does not record, are read
off the log rows around its step (tokens grow linearly with steps; time nearly so).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.text import Text

from llmcli import ui
from llmcli.errors import UserError
from llmcli.insight import figures
from llmcli.options.insight import PlotOptions

METRICS_FILE = "metrics.jsonl"
CURVES = "curves.png"
# A named metric is one or more keys of metrics.jsonl; any other key is plotted as itself.
GROUPS = {"loss": ("train_loss", "val_loss"), "acc": ("train_acc", "val_acc"), "ppl": ("val_ppl",),
          "lr": ("lr",), "tokens_per_second": ("tokens_per_second",)}
X_KEYS = {"step": "step", "tokens": "tokens_seen", "time": "elapsed"}
X_LABELS = {"step": "step", "tokens": "tokens seen", "time": "training time (s)"}
MARKERS = ("•", "x", "+", "o", "*", "#", "@", "%")


@dataclass(frozen=True)
class Series:
    """One curve: `key` of run `run` (as the user named it) against x."""

    run: str
    key: str
    x: np.ndarray
    y: np.ndarray

    @property
    def label(self) -> str:
        return f"{self.run} {self.key}"


def plot_command(opts: PlotOptions) -> None:
    out = figures.check_out(opts.out) if opts.out is not None else None
    series = load_curves(opts.runs, opts.metric, opts.x)
    if out is not None:
        draw(series, out, opts.metric, opts.x, log=opts.log)
        points = sum(len(s.x) for s in series)
        ui.log(f"wrote {out} ({len(series)} curve{'s' if len(series) != 1 else ''}, {points} points)")
    else:
        show(series, opts.metric, opts.x, log=opts.log)


def metrics_path(run: Path) -> Path:
    """A run's metrics.jsonl; a best/ or last/ checkpoint inside a run is taken as its run."""
    run = Path(run).expanduser()
    if not run.exists():
        raise UserError(f"run not found: {run}")
    for candidate in (run, run.parent if run.name in ("best", "last") else None):
        if candidate is not None and (candidate / METRICS_FILE).is_file():
            return candidate / METRICS_FILE
    raise UserError(f"{run} has no {METRICS_FILE} (is it a run directory from llmcli train?)")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a torn last line (a run killed mid-write) is skipped."""
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise UserError(f"{path}: line {number} is not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise UserError(f"{path}: line {number} is not a metrics row (no integer step)")
        rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no metrics yet")
    return rows


def load_curves(runs: Sequence[Path], metric: str, x: str) -> list[Series]:
    """Every run's curves of `metric` against `x`; a run that has none of it is refused."""
    keys = GROUPS.get(metric, (metric,))
    series = []
    for run in runs:
        path = metrics_path(run)
        rows = read_metrics(path)
        found = [s for s in (_series(str(run), rows, key, x, path) for key in keys) if s is not None]
        if not found:
            present = sorted({k for row in rows for k, v in row.items() if _number(v)} - {"step"})
            raise UserError(f"{path} has no {metric!r} values ({', '.join(keys)}); it has "
                            f"{', '.join(present) or 'none'}")
        series += found
    return series


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _series(run: str, rows: list[dict[str, Any]], key: str, x: str, path: Path) -> Series | None:
    points = [(row["step"], float(row[key])) for row in rows if _number(row.get(key))]
    if not points:
        return None
    steps = np.array([p[0] for p in points], dtype=np.float64)
    if x == "step":
        xs = steps
    else:
        known = [(row["step"], float(row[X_KEYS[x]])) for row in rows if _number(row.get(X_KEYS[x]))]
        if not known:
            raise UserError(f"{path} records no {X_KEYS[x]}, so it cannot be plotted against {x}")
        xs = _read_off(known, steps)
    return Series(run, key, xs, np.array([p[1] for p in points], dtype=np.float64))


def _read_off(known: list[tuple[int, float]], steps: np.ndarray) -> np.ndarray:
    """x at each step from the (step, x) points recorded: linear between them, and along the
    last segment's slope (or x/step) beyond the last."""
    at = dict(known)
    ks = np.array(sorted(at), dtype=np.float64)
    vs = np.array([at[int(k)] for k in ks])
    slope = (vs[-1] - vs[-2]) / (ks[-1] - ks[-2]) if len(ks) > 1 else vs[-1] / max(ks[-1], 1.0)
    inside = np.interp(steps, ks, vs)
    return np.where(steps > ks[-1], vs[-1] + (steps - ks[-1]) * slope, inside)


def draw(series: list[Series], out: Path, metric: str, x: str, *, log: bool = False) -> Any:
    """The curves with matplotlib: a colour per run; train solid, validation dashed with dots.
    Returns the figure (written to `out`)."""
    figure = figures.new_figure(7.5, 4.2, dpi=100)
    ax = figure.add_subplot()
    runs = list(dict.fromkeys(s.run for s in series))
    colours = {run: f"C{i % 10}" for i, run in enumerate(runs)}
    for s in series:
        val = s.key.startswith("val_")
        ax.plot(s.x, s.y, color=colours[s.run], linestyle="--" if val else "-", linewidth=1.4,
                marker="o" if val else None, markersize=3.5, label=s.label)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(X_LABELS[x])
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against {X_LABELS[x]}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    figures.save_figure(figure, out)
    return figure


def show(series: list[Series], metric: str, x: str, *, log: bool = False, console: Console = ui.stdout) -> None:
    """The same curves in the terminal (plotext), coloured on a TTY, a marker per curve."""
    import plotext as plt

    plt.clear_figure()
    for i, s in enumerate(series):
        plt.plot(s.x.tolist(), s.y.tolist(), label=s.label, marker=MARKERS[i % len(MARKERS)])
    if log:
        plt.yscale("log")
    plt.title(f"{metric} against {X_LABELS[x]}")
    plt.xlabel(X_LABELS[x])
    plt.plotsize(min(console.width, 100), 20)
    chart = plt.build()
    if ui.interactive(console):
        console.print(Text.from_ansi(chart))
    else:
        console.print(plt.uncolorize(chart), markup=False, highlight=False, soft_wrap=True)


def write_run_curves(run_dir: Path) -> Path:
    """curves.png in `run_dir`: its train and val loss against step (`llmcli train --plot`)."""
    out = Path(run_dir) / CURVES
    draw(load_curves([Path(run_dir)], "loss", "step"), out, "loss", "step")
    return out
