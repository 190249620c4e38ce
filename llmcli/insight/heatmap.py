"""Attention heatmaps: a grid of matplotlib panels (tokens on both axes), or shaded terminal cells.

Colours follow the square root of the weight (a PowerNorm with the bar beside it), so that the
small weights of long rows stay visible next to a token that takes most of the attention; cells a
query may not attend (weight exactly 0: later tokens) stay blank. A red line marks where generated
tokens follow the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.columns import Columns
from rich.console import Console
from rich.panel import Panel as RichPanel
from rich.text import Text

from llmcli.insight import figures

CELL_INCHES = 0.16  # per token along an axis
LABELLED_TOKENS = 48  # beyond this, every k-th token is labelled
# Terminal shades: a blank for weights that are exactly 0 (masked), then by the square root.
SHADES = ("··", "░░", "▒▒", "▓▓", "██")
COLOURS = ("grey35", "blue", "cyan", "yellow", "bright_white")


@dataclass(frozen=True)
class Panel:
    """One heatmap: a layer's head (or its heads combined: head "mean"/"max") of one map, weights
    [queries, keys] with the tokens' text along each axis, drawn at (row, col) of a grid."""

    name: str
    layer: int
    head: int | str
    weights: np.ndarray
    queries: list[str]
    keys: list[str]
    row: int
    col: int
    query_split: int | None = None  # where generated tokens start along each axis (a line is drawn)
    key_split: int | None = None
    # What each axis holds, e.g. "text + generated" (decoder self-attention) or, for an encoder-
    # decoder's cross-attention, "generated" (target) down and "text" (source) across.
    query_axis: str = "text"
    key_axis: str = "text"

    @property
    def title(self) -> str:
        head = f"head {self.head}" if isinstance(self.head, int) else f"{self.head} of heads"
        return f"{self.name}, layer {self.layer}, {head}"


def draw(panels: list[Panel], out: Path, title: str) -> Any:
    """Every panel at its (row, col), one shared colour bar, written to `out`; returns the figure."""
    from matplotlib.colors import PowerNorm

    rows, cols = max(p.row for p in panels) + 1, max(p.col for p in panels) + 1
    longest = max(max(len(p.queries), len(p.keys)) for p in panels)
    side = min(max(1.8, CELL_INCHES * longest), 6.0)
    figure = figures.new_figure(cols * (side + 0.5) + 1.2, rows * (side + 0.5) + 0.6, dpi=_dpi(rows, cols, side))
    grid = figure.add_gridspec(rows, cols)
    shared = all(p.queries == panels[0].queries and p.keys == panels[0].keys for p in panels)
    norm = PowerNorm(0.5, vmin=0.0, vmax=1.0)
    image = None
    axes = []
    for p in panels:
        ax = figure.add_subplot(grid[p.row, p.col])
        axes.append(ax)
        image = ax.imshow(np.ma.masked_equal(p.weights, 0.0), cmap="viridis", norm=norm,
                          interpolation="nearest", aspect="auto")
        ax.set_title(p.title, fontsize=7)
        if p.query_split is not None:
            ax.axhline(p.query_split - 0.5, color="red", linewidth=0.8)
        if p.key_split is not None:
            ax.axvline(p.key_split - 0.5, color="red", linewidth=0.8)
        left, bottom = not shared or p.col == 0, not shared or p.row == rows - 1
        _ticks(ax.set_yticks, p.queries, label=left)
        _ticks(ax.set_xticks, p.keys, label=bottom, rotation=90)
        ax.set_ylabel(f"query: {p.query_axis}" if left else "", fontsize=7)
        ax.set_xlabel(f"key: {p.key_axis}" if bottom else "", fontsize=7)
        ax.tick_params(length=0, labelsize=max(4.0, min(7.0, 220 / max(longest, 1))))
    figure.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    figure.suptitle(title, fontsize=9)
    figures.save_figure(figure, out)
    return figure


def _dpi(rows: int, cols: int, side: float) -> int:
    """Enough pixels to read the labels, few enough to keep the file small."""
    inches = max(rows, cols) * (side + 0.5)
    return int(max(60, min(110, 1600 / inches)))


def _ticks(set_ticks, tokens: list[str], *, label: bool, rotation: int = 0) -> None:
    step = max(1, -(-len(tokens) // LABELLED_TOKENS))
    positions = list(range(0, len(tokens), step))
    labels = [figures.token_label(tokens[i], 8) for i in positions] if label else []
    if label:
        set_ticks(positions, labels, rotation=rotation)
    else:
        set_ticks(positions, labels)


def shade(weight: float) -> tuple[str, str]:
    """The two characters (and colour) of one terminal cell."""
    if weight == 0.0:
        return "  ", ""
    level = min(len(SHADES) - 1, int(np.sqrt(weight) * len(SHADES)))
    return SHADES[level], COLOURS[level]


def render(panel: Panel) -> Text:
    """One map as text: a row per query (its token on the left), two characters per key."""
    rows = [figures.token_label(t, 6) for t in panel.queries]
    width = max(len(r) for r in rows)
    text = Text(" " * (width + 1) + "".join(figures.token_label(k, 2).ljust(2)[:2] for k in panel.keys) + "\n")
    for label, weights in zip(rows, panel.weights, strict=True):
        text.append(label.rjust(width) + " ")
        for w in weights:
            cell, colour = shade(float(w))
            text.append(cell, style=colour)
        text.append("\n")
    text.rstrip()
    return text


def show(panels: list[Panel], console: Console) -> None:
    """Every panel as shaded cells, side by side as the terminal's width allows, and the key."""
    console.print(Columns([RichPanel(render(p), title=p.title, title_align="left", expand=False)
                           for p in panels]))
    bounds = [f"{SHADES[i][0]} <{((i + 1) / len(SHADES)) ** 2:.2f}" for i in range(len(SHADES) - 1)]
    console.print("shades: " + "  ".join(bounds) + f"  {SHADES[-1][0]} higher; blank: not attended (0)")
