"""Shared helpers for the benchmark scripts: timing, machine limits and result tables.

Every figure a benchmark reports is a ratio against a baseline measured in the same run, so the
numbers compare across machines even though absolute times do not. What is compared is measured
in interleaved rounds (a, b, a, b, ...) and shown as the median with the range over the rounds,
`1.22 (1.05-1.31)`: on a shared machine one round alone says little.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

console = Console(highlight=False, width=200)  # wide tables stay readable in logs and pipes


def median_seconds(fn: Callable[[], object], *, repeat: int = 5, min_time: float = 0.2,
                   warmup: int = 2) -> float:
    """Median seconds per call; each sample runs enough calls to last about min_time/repeat."""
    for _ in range(warmup):
        fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < min_time / repeat or calls == 0:
        fn()
        calls += 1
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples)


def matmul_peak_gflops(n: int = 2048) -> float:
    """fp32 GFLOP/s of a large square matmul: the practical compute ceiling of this machine."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    seconds = median_seconds(lambda: torch.mm(a, b, out=out), repeat=5, min_time=2.0)
    return 2 * n**3 / seconds / 1e9


def copy_bandwidth_gbs(megabytes: int = 512) -> float:
    """GB/s moved by a large tensor copy (bytes read + bytes written): the memory ceiling."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), repeat=5, min_time=1.0)
    return 2 * src.numel() * 4 / seconds / 1e9


def table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    t = Table(title=title, title_justify="left")
    for i, name in enumerate(columns):
        t.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*[fmt(v) for v in row])
    console.print(t)


@dataclass(frozen=True)
class Spread:
    """Values of one figure over several rounds: shown as `median (min-max)`."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(tuple(values))

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def __str__(self) -> str:
        if len(self.values) == 1:
            return fmt(self.values[0])
        return f"{fmt(self.median)} ({fmt(min(self.values))}-{fmt(max(self.values))})"


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> Spread:
    """Per-round ratios (round i of a over round i of b), so a slow spell hits both sides."""
    return Spread.of([a / b for a, b in zip(numerators, denominators, strict=True)])


def fmt(value: object) -> str:
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)
