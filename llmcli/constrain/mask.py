"""The per-row logits mask: each constrained sequence's matcher says which tokens may come next.

The engine calls three things, all on its own thread: `mask_logits(logits, constraints)` before
sampling (rows without a constraint are left alone), `RowConstraint.advance(token)` after each
emitted token, and for speculative decoding `RowConstraint.masks_along(proposal)`, which keeps the
longest valid prefix of a proposal and gives the mask at each of its positions.

One step's masks are one int32 bitmask [rows, vocab / 32] that llguidance fills (rows in parallel
on its own threads where cores are spare), unpacked into booleans with a few tensor operations for the whole batch: the
per-row Python work is one call per constrained row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from llmcli.constrain.grammar import Format, Grammars

_SHIFTS = torch.arange(32, dtype=torch.int32)


class RowConstraint:
    """One sequence's matcher, and the ids it maps the grammar's end onto (the request's stop tokens)."""

    def __init__(self, grammars: Grammars, fmt: Format, stop_ids: Sequence[int], width: int):
        self.matcher = grammars.matcher(fmt)
        self.grammars = grammars
        self.format = fmt
        self.eos = grammars.eos
        self.size = grammars.size
        self.stop_ids = tuple(stop_ids)
        self.width = width  # the model's logits width (>= the tokenizer's vocabulary)
        self.stops = torch.zeros(width, dtype=torch.bool)  # where the grammar's end goes
        self.stops[[t for t in self.stop_ids if t < width]] = True
        self.fallback = self.stop_ids[0] if self.stop_ids else self.eos  # what a dead end may still emit

    @property
    def done(self) -> bool:
        """The format is complete and nothing may follow (only the end of the text)."""
        return self.matcher.is_stopped()

    def allowed(self) -> torch.Tensor:
        """Bool [width]: the tokens the format allows next (its end as the request's stop tokens)."""
        return allowed_tokens([self], self.width)[0]

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


def _fill(constraints: Sequence[RowConstraint | None], bitmask: torch.Tensor) -> None:
    """Each constrained row's bits from its matcher (several rows in parallel); the others stay all ones."""
    from llguidance.torch import fill_next_token_bitmask, fill_next_token_bitmask_par

    rows = [(c.matcher, i) for i, c in enumerate(constraints) if c is not None]
    executor = next(c for c in constraints if c is not None).grammars.executor if len(rows) > 1 else None
    if executor is not None:
        fill_next_token_bitmask_par(executor, rows, bitmask)
    else:
        for matcher, i in rows:
            fill_next_token_bitmask(matcher, bitmask, i)


def allowed_tokens(constraints: Sequence[RowConstraint | None], width: int) -> torch.Tensor:
    """Bool [rows, width]: what each row may emit next (all True for rows without a constraint)."""
    present = [c for c in constraints if c is not None]
    size, eos = present[0].size, present[0].eos
    bitmask = torch.full((len(constraints), (size + 31) // 32), -1, dtype=torch.int32)
    _fill(constraints, bitmask)
    bits = ((bitmask[:, :, None] >> _SHIFTS) & 1).flatten(1)[:, :size].bool()
    rows = torch.tensor([i for i, c in enumerate(constraints) if c is not None])
    allowed = torch.ones(len(constraints), width, dtype=torch.bool)
    allowed[rows, size:] = False  # ids past the tokenizer's vocabulary (padded logits) spell nothing
    allowed[:, :size] = bits
    end = allowed[rows, eos]
    allowed[rows, eos] = False
    stops = torch.stack([c.stops for c in present])
    allowed[rows] |= stops & end[:, None]
    dead = rows[~allowed[rows].any(-1)]  # a dead end (or past the end): the end token, for the engine to stop on
    for i in dead.tolist():
        allowed[i, constraints[i].fallback] = True
    return allowed


def mask_logits(logits: torch.Tensor, constraints: Sequence[RowConstraint | None]) -> torch.Tensor:
    """`logits` [n, V] with every token a row's constraint forbids set to -inf (None: no constraint)."""
    if all(c is None for c in constraints):
        return logits
    allowed = allowed_tokens(constraints, logits.shape[-1])
    return logits.masked_fill(~allowed.to(logits.device), -math.inf)
