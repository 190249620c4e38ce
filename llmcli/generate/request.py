"""A generation request: what was asked, what came out so far, and how long it took.

Where a request runs (its slot, its window of the context, its cache blocks) is the scheduler's
business (scheduler.py), and how its tokens are computed the runner's (runner.py): a `Request`
holds only what a user of the engine reads back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from llmcli.options.sampling import SamplingParams

FINISH_EOT = "eot"  # the model produced <|endoftext|> (or another stop token)
FINISH_STOP = "stop"  # a stop string appeared in the text
FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_CANCELLED = "cancelled"
FINISH_FORMAT = "format"  # a constrained output is complete: its format allows nothing more


@dataclass
class RequestMetrics:
    """What a request cost: seconds in prefill and in decoding, when it arrived and got its first
    token (time.perf_counter), and the work done again for it (preemptions, window slides,
    speculative guesses made and kept)."""

    added_at: float
    first_token_at: float | None = None
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    preemptions: int = 0
    slides: int = 0
    proposed: int = 0
    accepted: int = 0


@dataclass
class Request:
    """One sequence: its settings, its tokens (the prompt, then every token generated) and how it
    ended. Read its fields; the engine alone changes them."""

    id: int
    params: SamplingParams
    prompt_ids: list[int]  # after left truncation to the context window
    source_ids: list[int] | None  # seq2seq: the source the decoder attends to
    dropped_prompt_tokens: int
    stop_token_ids: frozenset[int]
    seed: int
    generator: torch.Generator  # this request's own random numbers: its samples do not depend on the batch
    metrics: RequestMetrics
    tokens: list[int] = field(default_factory=list)  # prompt + generated so far
    finish_reason: str | None = None
    constraint: Any = None  # constrain.mask.RowConstraint: the format its tokens must spell (None: free)
    adapter: int = 0  # which LoRA adapter its rows use when several share the base (llmcli/adapters.py)

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
