"""The drawing code for an encoder-decoder's maps (a hand-made set of maps in their shape; the real
families' maps are tested in test_attention_seq2seq.py): encoder self-attention over the source, decoder self-attention over the target, and
cross-attention with target tokens down and source tokens across, in a picture and the terminal."""

from __future__ import annotations

import numpy as np
import torch
from rich.console import Console

from llmcli.insight import heatmap
from llmcli.insight.attention import select
from llmcli.models.base import AttentionMap

SOURCE, TARGET = list("phone"), ["F", "OW", "N"]  # G2P: letters against phonemes


def rows_of(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random attention rows (each sums to 1) of `shape`."""
    return torch.softmax(torch.randn(shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def seq2seq_maps() -> list[AttentionMap]:
    causal = torch.tril(torch.ones(3, 3)).bool()
    decoder = rows_of((2, 2, 3, 3), 1).masked_fill(~causal, 0.0)
    decoder = decoder / decoder.sum(-1, keepdim=True)
    return [AttentionMap("encoder self-attention", rows_of((2, 2, 5, 5), 0)),
            AttentionMap("decoder self-attention", decoder, ("generated",), ("generated",)),
            AttentionMap("cross-attention", rows_of((2, 2, 3, 5), 2), ("generated",), ("text",))]


def test_cross_attention_draws_target_against_source(tmp_path, read_png):
    maps = seq2seq_maps()
    panels = select(maps, {"text": SOURCE, "generated": TARGET}, layer=1, head=None, aggregate=None)
    assert [(p.name, p.row, p.col) for p in panels] == [
        ("encoder self-attention", 0, 0), ("encoder self-attention", 0, 1), ("decoder self-attention", 1, 0),
        ("decoder self-attention", 1, 1), ("cross-attention", 2, 0), ("cross-attention", 2, 1)]
    cross = panels[5]
    assert (cross.queries, cross.keys, cross.query_axis, cross.key_axis) == (TARGET, SOURCE, "generated", "text")
    np.testing.assert_array_equal(cross.weights, maps[2].weights[1, 1].numpy())
    figure = heatmap.draw(panels, tmp_path / "seq2seq.png", title="g2p")
    axes = [ax for ax in figure.axes if ax.get_images()]
    assert [ax.get_images()[0].get_array().shape for ax in axes] == [(5, 5)] * 2 + [(3, 3)] * 2 + [(3, 5)] * 2
    assert axes[4].get_ylabel() == "query: generated" and axes[4].get_xlabel() == "key: text"
    assert [t.get_text() for t in axes[4].get_xticklabels()] == SOURCE
    assert [t.get_text() for t in axes[4].get_yticklabels()] == TARGET
    assert axes[0].get_ylabel() == "query: text"
    read_png(tmp_path / "seq2seq.png", (300, 400))


def test_the_terminal_view_of_cross_attention_has_a_row_per_target_token():
    (panel,) = select(seq2seq_maps()[2:], {"text": SOURCE, "generated": TARGET}, 0, None, "max")
    console = Console(width=120, record=True)
    heatmap.show([panel], console)
    lines = console.export_text().splitlines()
    assert "cross-attention, layer 0, max of heads" in lines[0]
    assert [line.strip("│ ").split(" ")[0] for line in lines[2:5]] == TARGET
    assert all(len(line.strip("│ ").split(" ", 1)[1].strip()) == 2 * len(SOURCE) for line in lines[2:5])
