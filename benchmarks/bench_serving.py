"""Speculative decoding at batch 1: tokens/s against plain greedy decoding, and acceptance.

    python benchmarks/bench_serving.py                                   # trains a target and a draft
    python benchmarks/bench_serving.py --target runs/demo/best --draft-minutes 1
    python benchmarks/bench_serving.py --target-arg model.n_layer=6 --target-arg model.d_model=384  # larger

Without --target it trains the shakespeare-char recipe (with any --target-arg key=value overrides)
for --target-minutes; the draft (unless
--draft) is a quarter-size model (2 layers x 96 against 4 x 128) trained with `llmcli train` on the
target's own config, so it shares its tokenizer, for --draft-minutes. Then, in interleaved rounds,
it generates --tokens greedy tokens from each prompt with the plain engine, with the draft
proposing --draft-tokens, and with prompt lookup (--lookup), on Shakespeare prompts and on
repetitive text (a passage given twice, so the continuation is in the context), and reports
tokens/s per mode, its ratio to plain decoding in the same round, the acceptance rate, and whether
the tokens equal plain greedy decoding's (they must). Target: >= 1.8x with the draft. A second
table gives the milliseconds of one forward of each kind, which is what a round costs: k draft
forwards and one target forward over k + 1 tokens, against 1 + accepted tokens out.

The paged KV cache and prefix caching are measured in bench_paged.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Spread, ratios, table

REPO = Path(__file__).resolve().parent.parent
PASSAGE = ("ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n")


def train(out: Path, minutes: float, *args: str) -> Path:
    """`llmcli train` into `out` for `minutes`; its best checkpoint."""
    subprocess.run([sys.executable, "-m", "llmcli", "train", *args, "--out", str(out), "--overwrite",
                    f"train.max_minutes={minutes}", "train.max_steps=null"], check=True)
    return out / "best"


def prompts(tokenizer, kind: str) -> list[list[int]]:
    from llmcli.generate.text import encode_prompt

    text = (REPO / "data" / "sample.txt").read_text()
    if kind == "shakespeare":
        return [encode_prompt(tokenizer, text[i:i + 40]) for i in (0, 1500, 3000)]
    return [encode_prompt(tokenizer, (PASSAGE * 2)[:-20])]


def timed(engine, prompt: list[int], tokens: int) -> tuple[list[int], float]:
    from llmcli.options.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=tokens, temperature=0)
    started = time.perf_counter()
    request = engine.add(prompt, params)
    out = []
    while engine.has_work():
        out += [ev.token for ev in engine.step() if ev.id == request]
    return out, time.perf_counter() - started


def measure(target, draft, args) -> list[list[object]]:
    from llmcli.generate.engine import Engine
    from llmcli.generate.speculator import Speculation
    from llmcli.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Path(args.target_dir) / "tokenizer.json")
    modes = {"plain": lambda: Engine(target, max_batch_size=1),
             f"draft k={args.draft_tokens}": lambda: Engine(
                 target, speculation=Speculation(tokens=args.draft_tokens, draft=draft), max_batch_size=1),
             f"prompt lookup n={args.lookup}": lambda: Engine(
                 target, speculation=Speculation(tokens=args.draft_tokens, lookup=args.lookup), max_batch_size=1)}
    rows = []
    for kind in ("shakespeare", "repetitive"):
        texts = prompts(tokenizer, kind)
        speed = {m: [] for m in modes}
        accepted = {m: [0, 0] for m in modes}
        same = {m: True for m in modes}
        for _ in range(args.rounds):
            reference = None
            for mode, make in modes.items():
                engine, total, seconds, outs = make(), 0, 0.0, []
                for prompt in texts:
                    out, took = timed(engine, prompt, args.tokens)
                    outs.append(out)
                    total, seconds = total + len(out), seconds + took
                speed[mode].append(total / seconds)
                reference = outs if reference is None else reference
                same[mode] &= outs == reference
                if mode != "plain":
                    accepted[mode][0] += engine.stats.accepted_tokens
                    accepted[mode][1] += engine.stats.proposed_tokens
        for mode in modes:
            a, p = accepted[mode]
            rows.append([kind, mode, Spread.of(speed[mode]), ratios(speed[mode], speed["plain"]),
                         f"{a / p:.0%} of {p}" if p else "-", "yes" if same[mode] else "NO"])
    return rows


def forward_costs(target, draft, k: int) -> list[list[object]]:
    """Milliseconds per forward at batch 1 (KV cache, position 32): what one speculative round costs."""
    from common import median_seconds

    from llmcli.models.base import Rows

    rows = []
    for name, model, length in (("target, 1 token", target, 1), (f"target, {k + 1} tokens (verify)", target, k + 1),
                                ("draft, 1 token", draft, 1)):
        state = model.new_decode_state(1, model.context_length)
        idx = torch.ones(1, length, dtype=torch.long)
        rows_at = Rows([0], [32], [length])
        with torch.inference_mode():
            seconds = median_seconds(lambda m=model, i=idx, s=state, r=rows_at: m(i, state=s, rows=r), min_time=1.0)
        rows.append([name, seconds * 1e3])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="A trained run to use as the target (default: train one).")
    parser.add_argument("--draft", help="A draft run with the target's tokenizer (default: train one).")
    parser.add_argument("--target-minutes", type=float, default=3.0)
    parser.add_argument("--target-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="An override of the recipe for the trained target (repeatable).")
    parser.add_argument("--draft-minutes", type=float, default=1.5)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--lookup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from llmcli.checkpoint import resolve_checkpoint
    from llmcli.load import load_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    target_dir = Path(args.target) if args.target else train(
        work / "target", args.target_minutes, "-c", str(REPO / "configs" / "shakespeare-char.yaml"), *args.target_arg)
    target_dir = resolve_checkpoint(target_dir)
    config = target_dir / "config.yaml" if (target_dir / "config.yaml").is_file() else target_dir.parent / "config.yaml"
    draft_dir = Path(args.draft) if args.draft else train(
        work / "draft", args.draft_minutes, "-c", str(config), "model.n_layer=2", "model.d_model=96")
    args.target_dir = target_dir
    print(f"target {target_dir}, draft {resolve_checkpoint(draft_dir)}", flush=True)
    torch.set_num_threads(args.threads)
    target, draft = load_checkpoint(target_dir).model, load_checkpoint(draft_dir).model
    sizes = target.num_params(), draft.num_params()
    rows = measure(target, draft, args)
    table(f"speculative decoding at batch 1: {args.tokens} greedy tokens per prompt, target "
          f"{sizes[0]:,} parameters, draft {sizes[1]:,}, {args.threads} thread(s), "
          f"median (min-max) of {args.rounds} interleaved rounds (target >= 1.8x with the draft)",
          ["text", "mode", "tok/s", "x plain", "accepted", "= greedy"], rows)
    table("cost of one forward at batch 1 (median)", ["forward", "ms"], forward_costs(target, draft, args.draft_tokens))


if __name__ == "__main__":
    main()
