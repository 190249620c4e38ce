"""The per-row logits mask: each constrained sequence's matcher says which tokens may come next.

The engine calls three things, all on its own thread: `mask_logits(logits, constraints)` before
sampling (rows without a constraint are left alone), `RowConstraint.advance(token)` after each
emitted token, and for speculative decoding `RowConstraint.masks_along(proposal)`, which keeps the
longest valid prefix of a proposal and gives the mask at each of its positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from llmcli.constrain.grammar import Format, Grammars

_SHIFTS = torch.arange(32, dtype=torch.int32)


class RowConstraint:
    """One sequence's matcher, and the ids it maps the grammar's end onto (the request's stop tokens)."""

    def __init__(self, grammars: Grammars, fmt: Format, stop_ids: Sequence[int], width: int):
        self.matcher = grammars.matcher(fmt)
        self.format = fmt
        self.eos = grammars.eos
        self.size = grammars.size
        self.stop_ids = tuple(stop_ids)
        self.width = width  # the model's logits width (>= the tokenizer's vocabulary)
        self._bitmask = torch.zeros(1, (self.size + 31) // 32, dtype=torch.int32)

    @property
    def done(self) -> bool:
        """The format is complete and nothing may follow (only the end of the text)."""
        return self.matcher.is_stopped()

    def allowed(self) -> torch.Tensor:
        """Bool [width]: the tokens the format allows next (its end as the request's stop tokens)."""
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        bits = ((self._bitmask[0, :, None] >> _SHIFTS) & 1).flatten()[:self.size].bool()
        out = torch.zeros(self.width, dtype=torch.bool)
        out[:self.size] = bits
        end = bool(bits[self.eos])
        out[self.eos] = False
        for ident in self.stop_ids:
            if ident < self.width:
                out[ident] = end
        if not bool(out.any()):  # a dead end (or past the end): only the end token, for the engine to stop on
            out[self.stop_ids[0] if self.stop_ids else self.eos] = True
        return out

    def advance(self, token: int) -> None:
        """The sequence emitted `token`; a stop token is the grammar's end."""
        self.matcher.consume_token(self.eos if token in self.stop_ids else int(token))

    def rollback(self, count: int) -> None:
        """Forget the last `count` tokens advanced over (a speculative proposal)."""
        if count:
            self.matcher.rollback(count)

    def masks_along(self, proposal: Sequence[int]) -> tuple[list[int], torch.Tensor]:
        """(the longest prefix of `proposal` the format allows, the masks [len + 1, width] before each
        of its tokens and after the last); the matcher's state is left as it was."""
        masks = [self.allowed()]
        kept: list[int] = []
        for token in proposal:
            if not bool(masks[-1][token]):
                break
            self.advance(token)
            kept.append(int(token))
            masks.append(self.allowed())
        self.rollback(len(kept))
        return kept, torch.stack(masks)


def mask_logits(logits: torch.Tensor, constraints: Sequence[Any]) -> torch.Tensor:
    """`logits` [n, V] with every token a row's constraint forbids set to -inf (None: no constraint)."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return logits
    allowed = torch.ones(logits.shape, dtype=torch.bool)
    for i in rows:
        allowed[i] = constraints[i].allowed()
    return logits.masked_fill(~allowed.to(logits.device), -math.inf)
