"""The paged KV cache against the slot cache, and prefix caching against none (issue 19).

    python benchmarks/bench_paged.py
    python benchmarks/bench_paged.py --rounds 2 --requests 48

A random-weight transformer with a 1024-token context (--layers x --width, weights do not matter
for speed or memory). Two tables, each from interleaved rounds:

1. Memory. The same KV memory budget (what --budget-slots full-context slots take) as a slot cache
   (that many slots) and as a paged one (budget / (block tokens x bytes per token) blocks, up to
   --requests sequences at once). --requests prompts of uniform random length in [16, 512]
   (seeded) each generate --new-tokens greedy tokens; the table gives the sequences each cache
   runs at once (the most over the run; target >= 3x), preemptions, the seconds spent in prefill
   and in decode steps, and aggregate tokens/s (generated, and prompt + generated, over the wall
   time) with its ratio. With --compile both caches decode through the compiled step (one
   engine each, warmed up before the rounds and kept across them, as `serve` runs), where the
   paged read takes keys and values straight from the blocks.
2. Prefix caching. One request with a 512-token prefix warms the cache, then --shared requests
   arrive together, each the prefix + 16 tokens of its own, on a paged cache with and without
   prefix caching; the table gives the p50 time to first token and its ratio (target <= 0.3x).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Spread, ratios, table

CONTEXT = 1024
VOCAB = 512


def build_model(layers: int, width: int):
    from llmcli.config import ModelConfig
    from llmcli.models.transformer import Transformer

    torch.manual_seed(0)
    config = ModelConfig(n_layer=layers, n_head=width // 64, d_model=width, block_size=CONTEXT, vocab_size=VOCAB)
    return Transformer(config).eval()


def run(engine, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
    """Every prompt queued at once, stepped to the end: wall seconds, the most running at once, TTFTs."""
    from llmcli.options.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, seed=0)
    started = time.perf_counter()
    requests = [engine.get(engine.add(p, params)) for p in prompts]
    before = dataclasses.replace(engine.stats)
    peak = 0
    while engine.has_work():
        engine.step()
        peak = max(peak, engine.num_running)
    seconds = time.perf_counter() - started
    generated = new_tokens * len(prompts)
    return {"seconds": seconds, "peak": peak, "tok_s": (sum(map(len, prompts)) + generated) / seconds,
            "gen_s": generated / seconds,
            **{key: getattr(engine.stats, key) - getattr(before, key)
               for key in ("preemptions", "prefill_seconds", "decode_seconds")},
            "ttft": statistics.median(r.metrics.first_token_at - r.metrics.added_at for r in requests)}


def memory_table(model, args) -> None:
    from llmcli.generate.engine import Engine

    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 513, (args.requests,), generator=rng).tolist()
    prompts = [torch.randint(0, VOCAB, (n,), generator=rng).tolist() for n in lengths]
    per_token = model.kv_bytes_per_token(torch.float32)
    budget = args.budget_slots * CONTEXT * per_token
    blocks = budget // (args.block_size * per_token)
    slot = lambda: Engine(model, max_batch_size=args.budget_slots, compile=args.compile)  # noqa: E731
    paged = lambda: Engine(model, max_batch_size=args.requests, kv_blocks=blocks,  # noqa: E731
                           block_len=args.block_size, prefix_cache=False, compile=args.compile)
    kept = {"slot": slot(), "paged": paged()} if args.compile else {}
    for engine in kept.values():
        engine.warm_up()
    results: dict[str, list[dict]] = {"slot": [], "paged": []}
    for _ in range(args.rounds):
        for name, make in (("slot", slot), ("paged", paged)):
            results[name].append(run(kept.get(name) or make(), prompts, args.new_tokens))
    s, p = results["slot"], results["paged"]

    def figures(rs: list[dict], base: list[dict]) -> list[object]:
        return [Spread.of([r["peak"] for r in rs]), Spread.of([r["preemptions"] for r in rs]),
                Spread.of([r["prefill_seconds"] for r in rs]), Spread.of([r["decode_seconds"] for r in rs]),
                Spread.of([r["gen_s"] for r in rs]), Spread.of([r["tok_s"] for r in rs]),
                ratios([r["peak"] for r in rs], [r["peak"] for r in base]),
                ratios([r["tok_s"] for r in rs], [r["tok_s"] for r in base])]

    print(f"Same KV memory, {budget / 2**20:.0f} MiB: {args.requests} prompts of 16-512 tokens, {args.new_tokens} "
          f"new tokens each; median (min-max) of {args.rounds} interleaved rounds. Target: >= 3x the sequences "
          "at once.")
    table("paged vs slot KV cache", ["cache", "sequences at once", "preemptions", "prefill s", "decode s",
                                     "generated tok/s",
                                     "all tok/s", "x sequences", "x all tok/s"],
          [[f"slot ({args.budget_slots} slots)", *figures(s, s)],
           [f"paged ({blocks} blocks of {args.block_size})", *figures(p, s)]])


def prefix_table(model, args) -> None:
    from llmcli.generate.engine import Engine

    rng = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, VOCAB, (512,), generator=rng).tolist()
    prompts = [prefix + torch.randint(0, VOCAB, (16,), generator=rng).tolist() for _ in range(args.shared)]
    blocks = 2 * args.shared * CONTEXT // args.block_size
    results: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for cached in (False, True):
            engine = Engine(model, max_batch_size=args.shared, kv_blocks=blocks, block_len=args.block_size,
                            prefix_cache=cached)
            run(engine, [prefix + [7]], 1)  # the warm-up request (both ways: the same work)
            results[cached].append(run(engine, prompts, args.new_tokens)["ttft"])
    ratio = ratios(results[True], results[False])
    print(f"{args.shared} requests sharing a 512-token prefix (+16 tokens each) arrive together after one "
          f"warm-up request; median (min-max) of {args.rounds} interleaved rounds. Target: p50 TTFT <= 0.3x.")
    table("prefix caching", ["prefix cache", "TTFT p50 (s)", "x TTFT"],
          [["off", Spread.of(results[False]), "1.00"], ["on", Spread.of(results[True]), ratio]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--budget-slots", type=int, default=8)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--shared", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="the memory table's engines decode compiled")
    args = parser.parse_args()
    with torch.inference_mode():
        model = build_model(args.layers, args.width)
        memory_table(model, args)
        prefix_table(model, args)


if __name__ == "__main__":
    main()
