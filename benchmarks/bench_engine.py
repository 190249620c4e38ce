"""The engine's own speed: decode tok/s against the previous engine and a minimal compiled loop, and
what a step costs outside the model's forward.

    python benchmarks/bench_engine.py --previous ../llmcli-at-58c85f7     # about 2 minutes
    python benchmarks/bench_engine.py --previous PATH --rounds 5 --threads 2

Models: the `make demo` model's shape (configs/shakespeare-char.yaml: Llama-style 4 x 128, an
82-token char vocabulary, context 64) and a 4 x 256 one (context 256); random weights (speed does
not depend on them). Each side decodes NEW greedy tokens after a PROMPT-token prompt for 1 and for
8 sequences at once; tok/s counts generated tokens over the whole call, prefill included. Sides:

* previous: the engine of the checkout given with --previous (the commit before the scheduler /
  runner split), run in a subprocess of its own on the same weights (same seed);
* eager / compiled: this engine with the decode step eager and compiled (compiled.py), each one
  Engine kept across rounds (as a server keeps it; the compiled one's warm-up is reported apart);
* anchor: a minimal gpt-fast-style loop written below over the same modules (a static KV cache of
  the context, one function per token, torch.compile'd), the floor of what the engine's per-step
  work could cost.

Every round runs every side once, in turn (interleaved), and the tables give the median with the
range over rounds, and ratios taken round by round. The step profile runs 8 sequences through the
compiled engine and times each step and the compiled forward inside it: their difference is the
engine's overhead per step (scheduling, inputs, sampling, bookkeeping); cProfile then names where
it goes. The greedy tokens of every side must agree; the script says so.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Spread, console, ratios, table

SHAPES = {
    "demo 4x128": dict(preset="llama", n_layer=4, n_head=4, d_model=128, block_size=64, vocab_size=82),
    "4x256": dict(preset="llama", n_layer=4, n_head=4, d_model=256, block_size=256, vocab_size=82),
}


def build(shape: str):
    from llmcli.config_loader import build_config
    from llmcli.models.transformer import Transformer

    torch.manual_seed(0)
    return Transformer(build_config({"model": SHAPES[shape]}).model).eval()


def prompts(shape: str, batch: int, length: int) -> list[list[int]]:
    vocab = SHAPES[shape]["vocab_size"]
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1)).tolist()


def engine_run(engine, batch_prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
    """tok/s of one greedy run through an engine (any with add/step/has_work), and its tokens."""
    from llmcli.options.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eot=True)
    started = time.perf_counter()
    ids = [engine.add(p, params) for p in batch_prompts]
    out: dict[int, list[int]] = {i: [] for i in ids}
    while engine.has_work():
        for event in engine.step():
            out[event.id].append(event.token)
    return len(batch_prompts) * new / (time.perf_counter() - started), [out[i] for i in ids]


# --------------------------------------------------------------------------------------------
# The anchor: gpt-fast's generate.py, minimal, over the same modules


def anchor_forward(model, tokens: torch.Tensor, positions: torch.Tensor, caches: list, rope) -> torch.Tensor:
    """Logits [B, T, V] of tokens [B, T] at positions [B, T], writing a static KV cache per layer."""
    from llmcli.models.transformer import apply_rope

    B, T = tokens.shape
    x = model.tok_embed(tokens)
    cos, sin = rope[0][positions][:, None], rope[1][positions][:, None]
    mask = (torch.arange(caches[0][0].shape[2]) <= positions[:, :, None])[:, None]
    rows = torch.arange(B)[:, None]
    for block, (k_cache, v_cache) in zip(model.blocks, caches, strict=True):
        attn, h = block.attn, block.attn_norm(x)
        q = attn.q_proj(h).view(B, T, attn.n_head, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache[rows, :, positions] = k.transpose(1, 2)
        v_cache[rows, :, positions] = v.transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask)
        x = x + attn.out_proj(y.transpose(1, 2).reshape(B, T, -1))
        x = x + block.mlp(block.mlp_norm(x))
    return model.lm_head(model.final_norm(x))


class Anchor:
    """Prefill eagerly, then one compiled call per token: `decode(token, position) -> next token`."""

    def __init__(self, model):
        from llmcli.models.transformer import rope_tables

        self.model, self.rope = model, rope_tables(model.config, "cpu")
        c = model.config

        def decode(token, position, caches):
            return anchor_forward(model, token, position, caches, self.rope)[:, -1].argmax(-1, keepdim=True)

        self.decode = torch.compile(decode, dynamic=False)
        self.shape = (c.kv_heads, c.block_size, c.head_dim)

    @torch.inference_mode()
    def run(self, batch_prompts: list[list[int]], new: int) -> tuple[float, list[list[int]]]:
        started = time.perf_counter()
        B, T = len(batch_prompts), len(batch_prompts[0])
        caches = [(torch.zeros(B, *self.shape), torch.zeros(B, *self.shape)) for _ in self.model.blocks]
        positions = torch.arange(T).expand(B, T)
        token = anchor_forward(self.model, torch.tensor(batch_prompts), positions, caches, self.rope)[:, -1]
        token = token.argmax(-1, keepdim=True)
        out = [token]
        for i in range(new - 1):
            token = self.decode(token, torch.full((B, 1), T + i), caches)
            out.append(token)
        return B * new / (time.perf_counter() - started), torch.cat(out, 1).tolist()


# --------------------------------------------------------------------------------------------


def previous_rounds(args: argparse.Namespace, shape: str, batch: int) -> dict:
    """One round of the previous engine, in a subprocess that imports the --previous checkout."""
    command = [sys.executable, __file__, "--previous", str(args.previous), "--one", shape, str(batch),
               "--prompt", str(args.prompt), "--new", str(args.new), "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_previous_once(args: argparse.Namespace) -> None:
    """--one SHAPE BATCH: with the --previous checkout first on sys.path, one warm run and one timed one."""
    sys.path.insert(0, str(Path(args.previous).resolve()))
    import llmcli
    from llmcli.generate.engine import Engine

    assert Path(llmcli.__file__).resolve().is_relative_to(Path(args.previous).resolve()), llmcli.__file__
    torch.set_num_threads(args.threads)
    shape, batch = args.one[0], int(args.one[1])
    model = build(shape)
    batch_prompts = prompts(shape, batch, args.prompt)
    engine_run(Engine(model, max_batch_size=batch), batch_prompts, 4)
    tok_s, tokens = engine_run(Engine(model, max_batch_size=batch), batch_prompts, args.new)
    print(json.dumps({"tok_s": tok_s, "tokens": tokens}))


def speed_table(args: argparse.Namespace) -> None:
    from llmcli.generate.engine import Engine

    rows, agree = [], True
    for shape in SHAPES:
        model = build(shape)
        anchor = Anchor(model)
        for batch in (1, 8):
            batch_prompts = prompts(shape, batch, args.prompt)
            eager, compiled = Engine(model, max_batch_size=batch), Engine(model, max_batch_size=batch, compile=True)
            started = time.perf_counter()
            engine_run(compiled, batch_prompts, 4)  # warm-up: compiles the step (or loads it from inductor's cache)
            warmup = time.perf_counter() - started
            engine_run(eager, batch_prompts, 4)
            anchor.run(batch_prompts, 4)
            speeds: dict[str, list[float]] = {"previous": [], "eager": [], "compiled": [], "anchor": []}
            for _ in range(args.rounds):
                found = {}
                for name, side in (("eager", eager), ("compiled", compiled)):
                    tok_s, found[name] = engine_run(side, batch_prompts, args.new)
                    speeds[name].append(tok_s)
                tok_s, found["anchor"] = anchor.run(batch_prompts, args.new)
                speeds["anchor"].append(tok_s)
                if args.previous:
                    previous = previous_rounds(args, shape, batch)
                    speeds["previous"].append(previous["tok_s"])
                    found["previous"] = previous["tokens"]
                agree &= all(tokens == found["eager"] for tokens in found.values())
            previous = speeds["previous"] or [float("nan")] * args.rounds
            rows.append([shape, batch, Spread.of(previous), Spread.of(speeds["eager"]), Spread.of(speeds["compiled"]),
                         Spread.of(speeds["anchor"]), ratios(speeds["compiled"], previous),
                         ratios(speeds["eager"], previous), ratios(speeds["compiled"], speeds["anchor"]),
                         f"{warmup:.1f} s"])
    table(f"Decode, greedy, {args.prompt}-token prompt + {args.new} new tokens, {args.threads} thread(s); tok/s median "
          f"(min-max) of {args.rounds} interleaved rounds", ["model", "batch", "previous", "eager", "compiled",
                                                             "anchor", "compiled/previous", "eager/previous",
                                                             "compiled/anchor", "warm-up"], rows)
    console.print("targets: compiled/previous >= 2, compiled/anchor >= 0.9")
    console.print(f"greedy tokens of every side identical: {'yes' if agree else 'NO'}")


def step_profile(args: argparse.Namespace) -> None:
    """Per step at batch 8 (compiled, decode-only steps): the step, the forward inside it, the rest."""
    from llmcli.generate.engine import Engine
    from llmcli.options.sampling import SamplingParams

    rows = []
    for shape in SHAPES:
        model = build(shape)
        for compile in (False, True):
            engine = Engine(model, max_batch_size=8, compile=compile)
            engine_run(engine, prompts(shape, 8, args.prompt), 4)
            runner = engine.runner
            forward: list[float] = []
            if compile:
                inner = runner.compiled.step
                target, name = runner.compiled, "step"
            else:
                inner = runner.decoder.forward
                target, name = runner.decoder, "forward"

            def timed(*a, inner=inner, forward=forward, **k):
                started = time.perf_counter()
                out = inner(*a, **k)
                forward.append(time.perf_counter() - started)
                return out

            setattr(target, name, timed)
            params = SamplingParams(max_new_tokens=args.new, temperature=0.0, ignore_eot=True)
            for p in prompts(shape, 8, args.prompt):
                engine.add(p, params)
            engine.step()  # the prefill
            steps, forward[:] = [], []
            while engine.has_work():
                started = time.perf_counter()
                engine.step()
                steps.append(time.perf_counter() - started)
            setattr(target, name, inner)
            profile = cProfile.Profile() if compile else None
            if profile is not None:  # the same steps again under cProfile, apart from the timing
                for p in prompts(shape, 8, args.prompt):
                    engine.add(p, params)
                engine.step()
                profile.enable()
                while engine.has_work():
                    engine.step()
                profile.disable()
            overhead = [s - f for s, f in zip(steps, forward, strict=True)]
            rows.append([shape, "compiled" if compile else "eager", Spread.of([s * 1e6 for s in steps]),
                         Spread.of([f * 1e6 for f in forward]), Spread.of([o * 1e6 for o in overhead])])
            if profile is not None:
                console.print(f"where the engine's time outside the forward goes ({shape}, batch 8, compiled; "
                              f"cProfile, so every figure is inflated alike):")
                stats = pstats.Stats(profile)
                stats.sort_stats("tottime").print_stats(r"llmcli/generate", 12)
    table(f"One decode step at batch 8, µs, median (min-max) over {args.new - 1} steps (target: overhead <= 50 µs)",
          ["model", "decode step", "step", "forward", "overhead"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--previous", type=Path, help="a checkout of the previous engine (e.g. a git worktree of "
                                                      "the commit before the split)")
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=48, help="tokens generated per sequence (prompt + new <= 64)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--one", nargs=2, metavar=("SHAPE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        run_previous_once(args)
        return
    torch.set_num_threads(args.threads)
    speed_table(args)
    step_profile(args)


if __name__ == "__main__":
    main()
