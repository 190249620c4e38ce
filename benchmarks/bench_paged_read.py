"""The paged KV cache's decode read: gathering every block into a copy vs reading the pool in place.

    python benchmarks/bench_paged_read.py
    python benchmarks/bench_paged_read.py --batches 1 8 64 --contexts 512 2304 --rounds 3

A random-weight GPT-2-style transformer (--layers x --width, heads of 32, context C for each of
--contexts) decodes one token per row, batch B for each of --batches, every row on a paged cache
(blocks of --block-len, each row's blocks shuffled through the pool so no table is contiguous) at
a position of its own in [C/2, C). Two ways to read the keys/values, in interleaved rounds:
"gather" (each layer copies every block a row reads into a contiguous [B, S, H, D] copy, then
SDPA: the read before models.kv_cache.paged_attention) and "in place" (the step's `attend`), both
eager (PagedStep: the engine's step without --compile) and compiled (PagedBucketStep through
generate.compiled.CompiledDecode, which reads the whole context of every row). Reported: ms per
decode step, median (min-max) over the rounds, and gather / in place (> 1: the new read is faster).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Spread, ratios, table

from llmcli.models.kv_cache import PagedKVCache

VOCAB = 512


class GatheringPagedCache(PagedKVCache):
    """The paged cache as it read before `attend`: every step's keys/values gathered for SDPA."""

    def bind(self, rows, length, device):
        step = super().bind(rows, length, device)
        step.attend = None  # the transformer then takes `update`'s gathered keys/values
        return step


def build(args, context: int, batch: int, cache_class: type[PagedKVCache]):
    from llmcli.config import ModelConfig
    from llmcli.models.transformer import Transformer

    torch.manual_seed(0)
    config = ModelConfig(n_layer=args.layers, n_head=args.width // 32, d_model=args.width, block_size=context,
                         vocab_size=VOCAB)
    model = Transformer(config).eval()
    per_row = math.ceil(context / args.block_len)
    cache = cache_class(config, batch, batch * per_row, args.block_len)
    order = torch.randperm(batch * per_row, generator=torch.Generator().manual_seed(0)).view(batch, per_row)
    for slot in range(batch):
        cache.set_blocks(slot, order[slot].tolist())
    for pool in cache.k + cache.v:
        pool[:cache.num_blocks].normal_()
    positions = torch.randint(context // 2, context, (batch,), generator=torch.Generator().manual_seed(1))
    return model, cache, positions.tolist()


def stepper(args, context: int, batch: int, cache_class: type[PagedKVCache], compiled: bool):
    """A function running one decode step of `batch` rows (compiled: built and warmed up first)."""
    from llmcli.generate.compiled import CompiledDecode
    from llmcli.models.base import Rows

    model, cache, positions = build(args, context, batch, cache_class)
    slots, tokens = tuple(range(batch)), [7] * batch
    if compiled:
        decode = CompiledDecode(model, cache, batch, VOCAB)
        step = lambda: decode(tokens, slots, positions)  # noqa: E731
    else:
        ids, rows = torch.tensor(tokens)[:, None], Rows(slots, positions, [1] * batch)
        step = lambda: model(ids, state=cache, rows=rows)  # noqa: E731
    step()
    return step


def per_step_ms(step, steps: int) -> float:
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--block-len", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2304])
    parser.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--steps", type=int, default=10, help="decode steps per round (their median)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch._dynamo.config.cache_size_limit = 64
    rows = []
    with torch.inference_mode():
        for mode in args.modes:
            for context in args.contexts:
                for batch in args.batches:
                    steps = {name: stepper(args, context, batch, cls, mode == "compiled")
                             for name, cls in (("gather", GatheringPagedCache), ("in place", PagedKVCache))}
                    ms: dict[str, list[float]] = {name: [] for name in steps}
                    for _ in range(args.rounds):
                        for name, step in steps.items():
                            ms[name].append(per_step_ms(step, args.steps))
                    rows.append([mode, context, batch, Spread.of(ms["gather"]), Spread.of(ms["in place"]),
                                 ratios(ms["gather"], ms["in place"])])
                    print(*rows[-1], flush=True)
    print(f"{args.layers} x {args.width} model, blocks of {args.block_len}, rows at positions in [C/2, C); "
          f"ms per decode step, median (min-max) of {args.rounds} interleaved rounds of {args.steps} steps "
          f"(each round's median).")
    table("paged decode read: gather vs in place", ["mode", "context C", "batch", "gather ms", "in place ms",
                                                    "x gather / in place"], rows)


if __name__ == "__main__":
    main()
