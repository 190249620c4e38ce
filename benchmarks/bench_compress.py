"""Compression benchmarks beyond quantization: `llmcli prune` and `llmcli distill` on the
shakespeare-char recipe's model, every figure against the original measured in the same run.

    python benchmarks/bench_compress.py                       # trains its teacher (5 min), ~40 min
    python benchmarks/bench_compress.py --teacher runs/char   # an existing shakespeare-char run
    python benchmarks/bench_compress.py --distill-seconds 60  # shorter distillation runs

1. Structured pruning (25% of the heads, 30% of the MLP units, then 300 fine-tuning steps; and
   the same with 1 of the 4 layers removed too): parameters, file size, val perplexity, decode
   tok/s at batch 1 and 8 (interleaved rounds, median and range of the per-round ratios) and
   greedy agreement, each against the original measured in the same prune run. Targets: val
   perplexity <= +3%, decode >= 1.25x, file <= 0.75x.
2. Magnitude pruning at 50% and 80% (global): perplexity change and file size.
3. Distillation: students of about a quarter of the teacher's parameters (a 2-layer Transformer
   and a 1-layer LSTM), each trained for the same seconds from scratch and distilled from the
   teacher (alpha 0.5, T 2): val bits/char of each (lower is better; target: distilled lower).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ratios, table

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "configs/shakespeare-char.yaml"
EVAL_TOKENS = 65536
STUDENTS = {  # name -> (config, overrides): about a quarter of the recipe model's 874k parameters
    "transformer 2 x 96": (RECIPE, ["model.n_layer=2", "model.d_model=96"]),
    "lstm 1 x 160": (REPO / "configs/shakespeare-lstm.yaml", ["model.d_model=160", "model.d_hidden=160",
                                                              "model.tie_embeddings=true"]),
}


def teacher_run(root: Path, teacher: str | None, minutes: float) -> Path:
    from llmcli.config_loader import load_config
    from llmcli.train.loop import train
    from llmcli.train.run_dir import RunPlan

    if teacher is not None:
        return Path(teacher)
    train(RunPlan(load_config(RECIPE, [f"train.max_minutes={minutes:g}"]), root / "teacher"))
    return root / "teacher"


STRUCTURED = {  # label -> the pruning beyond 25% of the heads and 30% of the MLP units
    "25% heads + 30% MLP": {},
    "25% heads + 30% MLP + 1 of 4 layers": {"layers": 1},
}


def structured(root: Path, teacher: Path, steps: int) -> None:
    from llmcli.options.checkpoints import PruneOptions
    from llmcli.prune.command import print_report, prune_checkpoint

    rows = []
    for n, (label, extra) in enumerate(STRUCTURED.items()):
        report = prune_checkpoint(PruneOptions(run_dir=teacher, out=root / f"pruned-{n}", heads=0.25, mlp=0.3,
                                               finetune_steps=steps, eval_tokens=EVAL_TOKENS, decode_tokens=128,
                                               **extra))
        print_report(report)
        first, pruned, tuned = report.columns
        for c in (pruned, tuned):
            rows.append([f"{label}: {c.name}", c.parameters / first.parameters, c.size_bytes / first.size_bytes,
                         f"{100 * (c.perplexity / first.perplexity - 1):+.2f}%",
                         str(ratios(c.decode[1], first.decode[1])), str(ratios(c.decode[8], first.decode[8])),
                         f"{100 * c.agreement:.0f}%"])
    table("structured pruning vs the original, each measured in its own run (targets after fine-tuning: "
          "ppl <= +3%, decode >= 1.25x, file <= 0.75x)",
          ["model", "params", "file", "val ppl", "decode b1", "decode b8", "greedy same"], rows)


def magnitude(root: Path, teacher: Path) -> None:
    from llmcli.options.checkpoints import PruneOptions
    from llmcli.prune.command import prune_checkpoint

    rows = []
    for sparsity in (0.5, 0.8):
        report = prune_checkpoint(PruneOptions(run_dir=teacher, out=root / f"magnitude-{sparsity:g}",
                                               method="magnitude", sparsity=sparsity, eval_tokens=EVAL_TOKENS,
                                               decode_tokens=0))
        first, pruned = report.columns
        rows.append([f"{sparsity:.0%} global", first.perplexity, pruned.perplexity,
                     f"{100 * (pruned.perplexity / first.perplexity - 1):+.2f}%", pruned.size_bytes / first.size_bytes])
    table("magnitude pruning (no fine-tuning)", ["sparsity", "ppl before", "ppl after", "change", "file"], rows)


def distillation(root: Path, teacher: Path, seconds: float) -> None:
    from llmcli.checkpoint import load_model
    from llmcli.config_loader import load_config
    from llmcli.distill import Distillation, with_teacher
    from llmcli.measure import measure_perplexity
    from llmcli.train.loop import train
    from llmcli.train.run_dir import RunPlan

    teacher_bits = bits(measure_perplexity(teacher, load_model(teacher).eval(), EVAL_TOKENS)[0])
    rows = [["teacher (recipe model)", load_model(teacher).num_params(), "-", f"{teacher_bits:.4f}", ""]]
    for name, (config, overrides) in STUDENTS.items():
        cfg = with_teacher(load_config(config, [*overrides, f"train.max_minutes={seconds / 60:g}",
                                                "distill.alpha=0.5", "distill.temperature=2"]), teacher)
        scratch = with_teacher(load_config(config, [*overrides, f"train.max_minutes={seconds / 60:g}"]), teacher)
        found = {}
        for how, run_cfg, objective in (("from scratch", scratch, None),
                                        ("distilled", cfg, Distillation(load_model(teacher), cfg.distill))):
            out = root / f"{name.split()[0]}-{how.replace(' ', '-')}"
            train(RunPlan(run_cfg, out), objective=objective)
            model = load_model(out / "best").eval()
            found[how] = bits(measure_perplexity(out / "best", model, EVAL_TOKENS)[0])
            rows.append([f"{name}, {how}", model.num_params(), f"{seconds:g} s", f"{found[how]:.4f}", ""])
        rows[-1][-1] = f"{found['distilled'] - found['from scratch']:+.4f}"
    table(f"distillation: val bits/char after the same {seconds:g} s (target: distilled below from scratch)",
          ["model", "params", "budget", "val bits/char", "distilled - scratch"], rows)


def bits(perplexity: float) -> float:
    return math.log2(perplexity)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="an existing shakespeare-char run (default: train one)")
    parser.add_argument("--teacher-minutes", type=float, default=5.0)
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--distill-seconds", type=float, default=300.0)
    parser.add_argument("--only", choices=["prune", "distill"], help="run one half")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-compress-") as tmp:
        root = Path(tmp)
        teacher = teacher_run(root, args.teacher, args.teacher_minutes)
        if args.only != "distill":
            structured(root, teacher, args.finetune_steps)
            magnitude(root, teacher)
        if args.only != "prune":
            distillation(root, teacher, args.distill_seconds)


if __name__ == "__main__":
    main()
