"""What the engine reports, as typed objects: a step's tokens, the running totals, the cache's use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class TokenEvent(NamedTuple):
    """One token of one sequence from `Engine.step()` (a speculative step may give several per
    sequence). A named tuple: a step makes one per token, and a frozen dataclass costs twice as much."""

    id: int
    token: int
    finished: bool
    finish_reason: str | None = None


@dataclass
class EngineStats:
    """Running totals since the engine started: tokens and seconds of prefill (prompts, slid windows
    and recomputed ones) and of decoding, sequences preempted for cache blocks, speculative guesses
    made and kept, and steps taken."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    preemptions: int = 0
    proposed_tokens: int = 0
    accepted_tokens: int = 0
    steps: int = 0

    @property
    def prefill_rate(self) -> float:
        """Prefill tokens per second (0 before any)."""
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_rate(self) -> float:
        """Decoded tokens per second (0 before any)."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        """Speculative guesses kept / made (None before any)."""
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else None


@dataclass(frozen=True)
class CacheUse:
    """The decode state's load (serve's /health and /metrics): slots held and in all, the token
    positions running sequences hold and the share of the cache in use (blocks held / blocks for a
    paged cache, else tokens / (slots x context)); for a paged cache also its blocks (held, in all,
    tokens each), whether prefix caching is on and its hits over prompt tokens looked up, and the
    preemptions so far (None without paging)."""

    slots_used: int
    slots_total: int
    tokens: int
    usage: float
    blocks_used: int | None = None
    blocks_total: int | None = None
    block_tokens: int | None = None
    prefix_caching: bool | None = None
    prefix_hit_rate: float | None = None
    prefix_hit_tokens: int | None = None
    prefix_queried_tokens: int | None = None
    preemptions: int | None = None

    @property
    def paged(self) -> bool:
        return self.blocks_total is not None
