"""What training shows: live progress on a terminal, plain timestamped lines elsewhere, a summary."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmcli import ui


class Reporter:
    """Live progress on a TTY; plain timestamped lines otherwise. Only the main process prints.

    The bar follows the budget that ends the run: steps (train.max_steps), or else seconds
    (train.max_minutes), so a time-budget run shows how much of its time is spent.
    """

    def __init__(self, enabled: bool, total_steps: int | None, max_seconds: float | None,
                 console: Console = ui.stderr, epochs: tuple[int, int] | None = None):
        """`epochs` = (steps per epoch, epochs to train) shows `epoch k/n` with each step."""
        self.enabled, self.console, self.epochs = enabled, console, epochs
        self.total_steps, self.max_seconds = total_steps, max_seconds
        self.live = enabled and ui.interactive(console)
        self.eval_header_done = False
        self.progress: Progress | None = None

    def __enter__(self) -> Reporter:
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]train"), BarColumn(), TextColumn("{task.fields[where]}"),
                TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                TextColumn("ETA {task.fields[eta]}"), console=self.console, transient=False)
            self.progress.start()
            total = self.total_steps or self.max_seconds
            self.task = self.progress.add_task("train", total=total, stats="", eta="-", where="")
        return self

    def tick(self, step: int, elapsed: float) -> None:
        """Every step: move the live bar (steps, or seconds of the budget)."""
        if self.progress is None:
            return
        where = f"step {step}" + (f"/{self.total_steps}" if self.total_steps else
                                  f"  {ui.format_duration(elapsed)}/{ui.format_duration(self.max_seconds or 0)}")
        self.progress.update(self.task, completed=step if self.total_steps else elapsed, where=where)

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(message, markup=False, highlight=False)
        else:
            ui.log(message, self.console)

    def step(self, step: int, loss: float, acc: float, lr: float, tok_s: float, elapsed: float,
             start_step: int, parts: dict[str, float] | None = None) -> None:
        """`parts`: the terms a training objective's loss is made of (distillation: kd, ce)."""
        if not self.enabled:
            return
        terms = f" ({'  '.join(f'{k} {v:.4f}' for k, v in parts.items())})" if parts else ""
        stats = f"loss {loss:.4f}{terms}  acc {acc:.3f}  lr {lr:.2e}  {ui.format_count(tok_s)} tok/s"
        if self.epochs is not None:
            per_epoch, total = self.epochs
            stats = f"epoch {min(total, -(-step // per_epoch))}/{total}  {stats}"
        eta = self._eta(step, elapsed, start_step)
        if self.progress is not None:
            self.progress.update(self.task, stats=stats, eta=eta)
            self.tick(step, elapsed)
        else:
            total = f"/{self.total_steps}" if self.total_steps else ""
            ui.log(f"step {step}{total}  {stats}  elapsed {ui.format_duration(elapsed)}  ETA {eta}",
                   self.console)

    def _eta(self, step: int, elapsed: float, start_step: int) -> str:
        remaining = []
        if self.max_seconds is not None:
            remaining.append(max(0.0, self.max_seconds - elapsed))
        if self.total_steps and step > start_step and elapsed > 0:
            per_step = elapsed / (step - start_step)  # elapsed counts this run only
            remaining.append(per_step * (self.total_steps - step))
        return ui.format_duration(min(remaining)) if remaining else "-"

    def eval_row(self, step: int, train_loss: float | None, val: dict[str, float]) -> None:
        if not self.eval_header_done:
            self.print(f"{'step':>8}  {'train loss':>10}  {'val loss':>9}  {'val ppl':>9}  {'val acc':>8}")
            self.eval_header_done = True
        train = f"{train_loss:10.4f}" if train_loss is not None else f"{'-':>10}"
        self.print(f"{step:>8}  {train}  {val['val_loss']:9.4f}  {val['val_ppl']:9.2f}  {val['val_acc']:8.4f}")


def print_summary(summary: dict[str, Any], console: Console = ui.stdout) -> None:
    table = Table(title="training summary", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    acc = summary.get("best_val_acc")
    rows = [
        ("parameters", ui.format_count(summary["parameters"])),
        ("steps", str(summary["steps"])),
        ("tokens seen", ui.format_count(summary["tokens_seen"])),
        ("epochs", f"{summary['epochs']:.2f}"),
        ("wall time", ui.format_duration(summary["wall_seconds"])),
        ("tokens/s", ui.format_count(summary["tokens_per_second"])),
        ("best val loss", f"{summary['best_val_loss']:.4f} (step {summary['best_step']})"),
        ("best val ppl", f"{summary['best_val_ppl']:.2f}"),
        ("best val acc", f"{acc:.4f}" if acc is not None else "-"),
        ("checkpoint", summary["checkpoint"]),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
