"""Progress of data preparation's long phases (scan, tokenizer, encode): a live bar with MB/s,
tokens and ETA on a terminal; a plain timestamped line every LOG_SECONDS elsewhere, and one at the
end of each phase that took QUIET_SECONDS or more (a small corpus prints nothing)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from llmcli import ui

LOG_SECONDS = 10.0
QUIET_SECONDS = 1.0


class PhaseProgress:
    """One phase at a time: `start(name, total_bytes)`, `advance(nbytes, tokens)`, `finish()`."""

    def __init__(self, console: Console):
        self.console = console
        self.live = ui.interactive(console)
        self.bar: Progress | None = None

    def start(self, name: str, total_bytes: int | None) -> None:
        self.name, self.total = name, total_bytes
        self.done_bytes = self.tokens = 0
        self.started = self.logged = time.perf_counter()
        if self.live:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TransferSpeedColumn(), TextColumn("{task.fields[tokens]}"), TimeRemainingColumn(),
                                console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(name, total=total_bytes, tokens="")

    def advance(self, nbytes: int, tokens: int = 0) -> None:
        self.done_bytes += nbytes
        self.tokens += tokens
        if self.bar is not None:
            shown = f"{ui.format_count(self.tokens)} tokens" if self.tokens else ""
            self.bar.update(self.task, advance=nbytes, tokens=shown)
        elif time.perf_counter() - self.logged >= LOG_SECONDS:
            self.logged = time.perf_counter()
            ui.log(self._line(final=False), self.console)

    def finish(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if time.perf_counter() - self.started >= QUIET_SECONDS:
            ui.log(self._line(final=True), self.console)

    def _line(self, final: bool) -> str:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        rate = self.done_bytes / seconds / 1e6
        line = f"{self.name}: {ui.format_bytes(self.done_bytes)}"
        if self.total and not final:
            line += f" of {ui.format_bytes(self.total)} ({100 * self.done_bytes / self.total:.0f}%)"
        line += f" {'in ' + ui.format_duration(seconds) + ', ' if final else ', '}{rate:.1f} MB/s"
        if self.tokens:
            line += f", {ui.format_count(self.tokens)} tokens"
        if self.total and not final and self.done_bytes:
            line += f", ETA {ui.format_duration(seconds * (self.total - self.done_bytes) / self.done_bytes)}"
        return line
