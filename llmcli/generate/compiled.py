"""A compiled decode step: `torch.compile` over a bounded set of batch shapes (gpt-fast's hot loop,
on the engine's decode states).

A decode step of a small model is a hundred small kernels for a few rows, and launching them
costs more than their arithmetic; compiled, the pointwise work between the matrix products is
fused into a few loops and the step runs as one call. A graph has fixed shapes, so a step
computes the rows of slots 0..n-1 for the smallest bucket n (1, 2, 4, 8, ..., the slot count)
that covers every slot decoding in it (models.base.BucketRows): the other rows of the bucket are
placeholders that write a scratch slot, so one graph per bucket serves every step, whichever
slots decode and wherever they are. The graph also takes each row's arg-max over the tokenizer's
vocabulary, so a step whose rows are all greedy samples nothing outside it. On the CPU the graph is
launched from inductor's C++ wrapper rather than its Python one. `warm_up()` compiles every bucket
at once (serve does it before it accepts a request); a bucket not warmed is compiled on first use.
Inductor keeps the compiled code in its on-disk cache (TORCHINDUCTOR_CACHE_DIR, by default
torchinductor_$USER in the temp directory), so a later process loads it instead of compiling:
`Warmup` says which it was. Greedy output is the eager step's (the tests compare them), up to the
float rounding of fused kernels.

On a CUDA device torch.compile's "reduce-overhead" mode also captures each bucket's graph as a
CUDA graph; that path is written but has not run here (no GPU on the machine these were built on).
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch._dynamo.utils import counters

from llmcli.models.base import BucketRows, LanguageModel


def host_longs(values: Sequence[int]) -> torch.Tensor:
    """A CPU int64 tensor of `values` (a few, at least one) over a buffer of its own: a fifth of
    what torch.tensor costs on a short list, which a step pays for its tokens and its positions."""
    return torch.frombuffer(array("q", values), dtype=torch.long)


def compiles(model: LanguageModel) -> bool:
    """Whether the engine can compile `model`'s decode step: a family with BucketRows, on CPU or CUDA,
    none of whose modules says it would break the graph (`compiles = False`: int4 layers, which look
    up a float copy of their weight outside it)."""
    device = next(model.parameters()).device
    return (model.compiles_decode and device.type in ("cpu", "cuda")
            and all(getattr(module, "compiles", True) for module in model.modules()))


def buckets(slots: int) -> list[int]:
    """The batch shapes compiled for `slots` slots: powers of two below it, and itself."""
    out = [1]
    while out[-1] * 2 < slots:
        out.append(out[-1] * 2)
    return out + [slots] if slots > 1 else out


@dataclass(frozen=True)
class Warmup:
    """What `CompiledDecode.warm_up` compiled: the buckets, the seconds it took, and how many of
    their graphs inductor loaded from its on-disk cache (hits) or compiled (misses)."""

    buckets: tuple[int, ...]
    seconds: float
    cache_hits: int
    cache_misses: int

    @property
    def cache(self) -> str:
        """Inductor's cache in one word: warm (every graph loaded), cold (every graph compiled), partly warm."""
        if not self.cache_misses:
            return "warm"
        return "cold" if not self.cache_hits else "partly warm"

    def summary(self) -> str:
        return (f"compiled decode for batch {', '.join(map(str, self.buckets))} in {self.seconds:.1f} s "
                f"(inductor cache: {self.cache})")


class CompiledDecode:
    """`decode(tokens, slots, positions)`: next-token logits [n, V] for one token per row and each
    row's arg-max over the first `vocab_size` ids, through one compiled graph per bucket (see the
    module docstring)."""

    def __init__(self, model: LanguageModel, state, slots: int, vocab_size: int):
        self.sizes = buckets(slots)
        self.device = next(model.parameters()).device
        self.prefixes = [tuple(range(n)) for n in range(slots + 1)]  # slots 0..n-1: the usual rows
        # One graph per bucket, and every CompiledDecode in the process compiles the same `step` code:
        # each adds its buckets to dynamo's per-code limit, or a later engine would silently run eager.
        config = torch._dynamo.config
        config.recompile_limit += len(self.sizes)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, config.recompile_limit)

        def step(tokens: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(tokens, state=state, rows=BucketRows(positions))[:, -1]
            return logits, logits[:, :vocab_size].argmax(-1)

        if self.device.type == "cuda":  # CUDA graphs (unverified here)
            self.step = torch.compile(step, dynamic=False, mode="reduce-overhead")
        else:  # the graph's launcher in C++: inductor's Python one costs more than a small model's step
            self.step = torch.compile(step, dynamic=False, options={"cpp_wrapper": True})
        self.warmup_seconds: dict[int, float] = {}  # bucket -> seconds its first call took

    @torch.inference_mode()
    def warm_up(self) -> Warmup:
        """Compile (or load from inductor's cache) every bucket's graph not run yet, each step's rows
        all placeholders (they write the scratch slot only)."""
        hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
        started = time.perf_counter()
        for n in self.sizes:
            if n not in self.warmup_seconds:
                begun = time.perf_counter()
                self.step(torch.zeros(n, 1, dtype=torch.long, device=self.device),
                          torch.full((n,), -1, device=self.device))
                self.warmup_seconds[n] = time.perf_counter() - begun
        return Warmup(tuple(self.sizes), time.perf_counter() - started, counters["inductor"]["fxgraph_cache_hit"] - hits,
                      counters["inductor"]["fxgraph_cache_miss"] - misses)

    def __call__(self, tokens: Sequence[int], slots: tuple[int, ...], positions: Sequence[int]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [n, V], arg-max ids [n]) of the rows in `slots`."""
        n = next(size for size in self.sizes if size > max(slots))
        prefix = slots == self.prefixes[len(slots)]
        if prefix and len(slots) == n:
            ids, at = host_longs(tokens).view(n, 1), host_longs(positions)
        else:
            ids, at = torch.zeros(n, 1, dtype=torch.long), torch.full((n,), -1)
            index = host_longs(slots)
            ids[index, 0], at[index] = host_longs(tokens), host_longs(positions)
        ids, at = ids.to(self.device, non_blocking=True), at.to(self.device, non_blocking=True)
        if n in self.warmup_seconds:
            logits, greedy = self.step(ids, at)
        else:
            started = time.perf_counter()
            logits, greedy = self.step(ids, at)
            self.warmup_seconds[n] = time.perf_counter() - started
        if prefix:
            return (logits, greedy) if len(slots) == n else (logits[:len(slots)], greedy[:len(slots)])
        rows = torch.tensor(slots, device=logits.device)
        return logits[rows], greedy[rows]
