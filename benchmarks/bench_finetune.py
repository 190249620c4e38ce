"""Fine-tuning benchmarks: LoRA (and LoRA over an int8 base) against full fine-tuning of the same model.

    python benchmarks/bench_finetune.py                 # both tables (about 8 minutes)
    python benchmarks/bench_finetune.py --budget 30     # shorter quality runs

1. Cost, on a GPT-2-small shape (12 x 768, char vocabulary, random weights): trainable parameters,
   peak memory and tokens/s of `llmcli train` doing full fine-tuning, LoRA and LoRA on an int8 copy
   of the base. Each variant runs in its own process; peak memory is that process's peak resident
   set above what it held before training (the imports), so it counts weights, gradients,
   optimizer state, activations and saving.
2. Quality in the same budget: the Shakespeare char model fine-tuned on data/instructions.json for
   the same wall-clock seconds each way: val loss on the response tokens and lm-eval accuracy on
   data/tasks/shakespeare_plays.yaml (which asks, as multiple choice, the same facts).
Every ratio is against full fine-tuning measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import console, table

REPO = Path(__file__).resolve().parent.parent
LEARNING_RUN = REPO / "runs/bench-learning"  # bench_train.py's 300-second char model, when it exists
DATA = ["data.source=data/instructions.json", "data.format=alpaca", "data.val_fraction=0.15"]
TASK = REPO / "data/tasks/shakespeare_plays.yaml"
VARIANTS = {  # name -> (overrides, whether the base is the int8 copy)
    "full fine-tuning": (["train.lr=1e-3"], False),
    "LoRA r=8 q,v": (["train.lora.r=8", "train.lora.targets=[q,v]", "train.lr=1e-2"], False),
    "LoRA r=8 all linear": (["train.lora.r=8", "train.lora.targets=[q,k,v,o,gate,up,down]", "train.lr=5e-3"], False),
    "LoRA r=8 all linear, int8 base": (["train.lora.r=8", "train.lora.targets=[q,k,v,o,gate,up,down]",
                                        "train.lr=5e-3"], True),
}


def rss_kib() -> int:
    """This process's resident set now (KiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(base: str, out: str, overrides: list[str]) -> None:
    """One `llmcli train` in this process; prints its trainable parameters, peak memory and tok/s."""
    import accelerate  # noqa: F401  (imported before the baseline is read, by every variant alike)
    import datasets  # noqa: F401
    import peft  # noqa: F401

    from llmcli import lora
    from llmcli.options.training import TrainOptions
    from llmcli.train import loop
    from llmcli.train.run_dir import plan_run

    before = rss_kib()
    trainer = loop.Trainer(plan_run(TrainOptions(init_from=Path(base), out=Path(out), overrides=overrides)))
    trainable = lora.trainable_parameters(trainer.model)
    summary = trainer.run()
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    speeds = sorted(r["tokens_per_second"] for r in rows if "tokens_per_second" in r)[1:]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"trainable": trainable, "peak_mib": (peak - before) / 1024, "val_loss": summary["best_val_loss"],
                      "tokens_per_second": speeds[len(speeds) // 2], "steps": summary["steps"]}))


def run_variant(base: Path, out: Path, overrides: list[str]) -> dict:
    command = [sys.executable, __file__, "--child", str(base), str(out), *overrides]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def quantized_copy(base: Path, out: Path) -> Path:
    from llmcli.options.checkpoints import QuantizeOptions
    from llmcli.quantize.command import quantize_command

    quantize_command(QuantizeOptions(run_dir=base, method="int8", out=out, eval_tokens=0, decode_tokens=0))
    return out


def cost_table(work: Path, steps: int) -> None:
    from llmcli.checkpoint import write_checkpoint
    from llmcli.config import PRESETS, Config, ModelConfig
    from llmcli.config_loader import load_config
    from llmcli.data.prepare import prepare_data
    from llmcli.models.transformer import Transformer

    tokenizer = prepare_data(load_config(REPO / "configs/shakespeare-char.yaml")).tokenizer_path.read_bytes()
    torch.manual_seed(0)
    shape = ModelConfig(**PRESETS["llama"], n_layer=12, n_head=12, d_model=768, block_size=64, vocab_size=82)
    base = work / "gpt2-shape"
    write_checkpoint(base, Transformer(shape), Config(model=shape), tokenizer, {"step": 0})
    int8 = quantized_copy(base, work / "gpt2-shape-int8")
    common = [*DATA, "train.batch_size=8", f"train.max_steps={steps}", "train.max_minutes=null",
              "train.warmup_steps=1", "train.log_interval=1", f"train.eval_interval={steps}", "train.eval_batches=1"]
    rows, full = [], None
    for name, (overrides, quantized) in VARIANTS.items():
        result = run_variant(int8 if quantized else base, work / f"cost-{len(rows)}", [*common, *overrides])
        full = full or result
        rows.append([name, f"{result['trainable']:,}", f"{result['trainable'] / full['trainable']:.4f}",
                     f"{result['peak_mib']:,.0f}", f"{result['peak_mib'] / full['peak_mib']:.2f}",
                     f"{result['tokens_per_second']:,.0f}", f"{result['tokens_per_second'] / full['tokens_per_second']:.2f}"])
    table(f"Fine-tuning cost, Llama-style 12x768 (85M parameters), block 64, batch 8, {steps} steps, fp32, CPU",
          ["variant", "trainable", "vs full", "peak MiB", "vs full", "tok/s", "vs full"], rows)


def quality_table(work: Path, budget: float) -> None:
    from llmcli.lm_eval_adapter import evaluate_tasks
    from llmcli.options.inference import EvalOptions
    from llmcli.options.training import TrainOptions
    from llmcli.train.loop import train
    from llmcli.train.run_dir import plan_run

    base = LEARNING_RUN / "best"
    if not base.is_dir():
        base = work / "char-base"
        opts = TrainOptions(config=REPO / "configs/shakespeare-char.yaml", out=base, overrides=["train.max_minutes=2"])
        train(plan_run(opts))
    int8 = quantized_copy(base, work / "char-int8")
    common = [*DATA, "train.batch_size=16", "train.max_steps=null", f"train.max_minutes={budget / 60}",
              "train.warmup_steps=20", "train.log_interval=10", "train.eval_interval=100", "train.eval_batches=8"]
    task = EvalOptions(targets=[], tasks=str(TASK), batch_size=32)
    accuracy = {r["checkpoint"]: r["value"] for r in evaluate_tasks([str(base)], task) if r["metric"] == "acc"}
    rows = [["base model (no fine-tuning)", "-", "-", "-", f"{accuracy[str(base)]:.3f}"]]
    full = None
    for name, (overrides, quantized) in VARIANTS.items():
        out = work / f"quality-{len(rows)}"
        result = run_variant(int8 if quantized else base, out, [*common, *overrides])
        full = full or result
        acc = next(r["value"] for r in evaluate_tasks([str(out / "best")], task) if r["metric"] == "acc")
        rows.append([name, f"{result['steps']:,}", f"{result['tokens_per_second']:,.0f}",
                     f"{result['val_loss']:.4f}", f"{acc:.3f}"])
    table(f"Quality in the same budget: the char model ({base.relative_to(REPO) if base.is_relative_to(REPO) else 'a 2-minute base'}) "
          f"fine-tuned on data/instructions.json for {budget:.0f} s each",
          ["variant", "steps", "tok/s", "val loss (responses)", "shakespeare_plays acc"], rows)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4:])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of fine-tuning per quality run")
    parser.add_argument("--steps", type=int, default=12, help="steps per cost run")
    args = parser.parse_args()
    os.chdir(REPO)  # the task's data file is named relative to the repository
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        cost_table(Path(tmp), args.steps)
        quality_table(Path(tmp), args.budget)
    console.print("ratios are against full fine-tuning measured in this run")


if __name__ == "__main__":
    main()
