"""Training benchmarks: machine limits, training throughput (tok/s, MFU) and learning efficiency.

    python benchmarks/bench_train.py                  # all three tables (about 8 minutes)
    python benchmarks/bench_train.py --skip-learning  # machine + throughput only (about 2 minutes)

MFU = training FLOPs/token (matmuls incl. attention, Transformer.flops_per_token) x tokens/s
divided by the fp32 matmul peak measured in the same run. The baseline is the plain PyTorch path:
eager model, for-loop AdamW, a host sync (`loss.item()`) every step, same model and batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Spread,
    console,
    copy_bandwidth_gbs,
    matmul_peak_gflops,
    median_seconds,
    ratios,
    table,
)

from llmcli.config_loader import load_config
from llmcli.data.prepare import prepare_data
from llmcli.models.transformer import Transformer
from llmcli.options.inference import EvalOptions
from llmcli.train.loop import train
from llmcli.train.run_dir import RunPlan
from llmcli.train.schedule import RandomWindows

REPO = Path(__file__).resolve().parent.parent
LEARNING_RUN = REPO / "runs/bench-learning"
MINIMAL_GPT = ["model.n_layer=4", "model.n_head=4", "model.d_model=128", "model.block_size=64",
               "train.batch_size=12"]


def with_vocab(cfg, vocab_size: int):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))


def plain_tokens_per_second(cfg, tokens, seconds: float) -> float:
    """The baseline: the textbook eager loop a newcomer would write."""
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    windows = RandomWindows(tokens, cfg.model.block_size, cfg.train.batch_size, seed=0)
    step, start = 0, None
    while True:
        if step == 3:
            start = time.perf_counter()
        x, y = windows.batch(step, 0)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        loss.item()
        step += 1
        if start is not None and time.perf_counter() - start > seconds:
            break
    return (step - 3) * cfg.train.batch_size * cfg.model.block_size / (time.perf_counter() - start)


def llmcli_tokens_per_second(overrides: list[str], steps: int, workdir: Path,
                             config: Path = REPO / "configs/shakespeare-char.yaml") -> tuple[float, float]:
    """Steady-state tok/s of `llmcli train` (from its metrics log) and its warm-up seconds."""
    run = workdir / f"run{len(list(workdir.iterdir()))}"
    cfg = load_config(config,
                      [*overrides, f"train.max_steps={steps}", "train.max_minutes=null",
                       "train.log_interval=10", f"train.eval_interval={steps}", "train.eval_batches=1"])
    train(RunPlan(cfg, run), console=_quiet())
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_second" in r]
    steady = sorted(r["tokens_per_second"] for r in rows[2:])
    tok_s = steady[len(steady) // 2]
    tokens_per_step = cfg.train.batch_size * cfg.model.block_size * cfg.train.grad_accum
    warmup = rows[0]["elapsed"] - rows[0]["step"] * tokens_per_step / tok_s
    shutil.rmtree(run, ignore_errors=True)
    return tok_s, max(warmup, 0.0)


def _quiet():
    from rich.console import Console

    return Console(quiet=True)


class Peak:
    """The highest fp32 matmul rate seen so far in this run. Other jobs on a shared machine slow
    it at times; re-measuring next to each throughput figure and keeping the maximum means an MFU
    is never flattered by a peak taken during a slow spell."""

    def __init__(self) -> None:
        self.gflops = 0.0

    def measure(self) -> float:
        self.gflops = max(self.gflops, matmul_peak_gflops())
        return self.gflops


def throughput(peak: Peak, workdir: Path, rounds: int) -> None:
    """The plain loop, `llmcli train` eager and compiled, in interleaved rounds at the 4x128 shape."""
    cfg = load_config(REPO / "configs/shakespeare-char.yaml", MINIMAL_GPT)
    prepared = prepare_data(cfg, console=_quiet())
    cfg = with_vocab(cfg, prepared.vocab_size)
    flops = Transformer(cfg.model).flops_per_token()
    llmcli_tokens_per_second([*MINIMAL_GPT, "train.compile=true"], 20, workdir)  # compile once, cached after
    plain, eager, compiled, warm = [], [], [], []
    for _ in range(rounds):
        plain.append(plain_tokens_per_second(cfg, prepared.tokens("train"), seconds=6))
        eager.append(llmcli_tokens_per_second([*MINIMAL_GPT, "train.compile=false"], 150, workdir)[0])
        tok_s, seconds = llmcli_tokens_per_second([*MINIMAL_GPT, "train.compile=true"], 150, workdir)
        compiled.append(tok_s)
        warm.append(seconds)
        peak.measure()
    rows = [[label, Spread.of(tok_s), Spread.of([100 * flops * t / 1e9 / peak.gflops for t in tok_s]),
             ratios(tok_s, plain), extra]
            for label, tok_s, extra in [("plain PyTorch loop", plain, "-"), ("llmcli train (eager)", eager, "-"),
                                        ("llmcli train (compile)", compiled, f"{min(warm):.0f}s")]]
    table(f"Training throughput, 4x128, block 64, batch 12 (fp32, 1 process; median (min-max) of {rounds} "
          f"interleaved rounds; MFU against the best matmul peak seen: {peak.gflops:.0f} GFLOP/s)",
          ["path", "tok/s", "MFU %", "vs plain", "warm-up (compile cached)"], rows)


def step_profile(peak: Peak) -> None:
    """Where one compiled training step's time goes at the 4x128/block 64/batch 12 shape.

    torch.profiler's self CPU time per op, grouped; then the step's Linear GEMMs (forward and
    both backward products, same shapes) timed alone, which bounds the MFU any implementation
    built on these matmul kernels can reach: every other op only adds time.
    """
    from torch.profiler import ProfilerActivity, profile

    cfg = load_config(REPO / "configs/shakespeare-char.yaml", MINIMAL_GPT)
    cfg = with_vocab(cfg, prepare_data(cfg, console=_quiet()).vocab_size)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    compiled = torch.compile(model)
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3, fused=True)
    shape = (cfg.train.batch_size, cfg.model.block_size)
    x, y = torch.randint(0, cfg.model.vocab_size, shape), torch.randint(0, cfg.model.vocab_size, shape)

    def step() -> None:
        loss = F.cross_entropy(compiled(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    steps = 20
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    groups = {"Linear GEMMs (aten::mm/addmm)": 0.0, "attention (SDPA forward + backward)": 0.0,
              "optimizer + grad clipping": 0.0, "everything else (compiled fused kernels, loss, ...)": 0.0}
    total = 0.0
    for event in prof.key_averages():
        ms = event.self_cpu_time_total / 1e3 / steps
        total += ms
        name = event.key.lower()
        if name in ("aten::mm", "aten::addmm"):
            groups["Linear GEMMs (aten::mm/addmm)"] += ms
        elif "scaled_dot_product" in name:
            groups["attention (SDPA forward + backward)"] += ms
        elif "adamw" in name or "foreach" in name or "vector_norm" in name or "zero_grad" in name:
            groups["optimizer + grad clipping"] += ms
        else:
            groups["everything else (compiled fused kernels, loss, ...)"] += ms
    rows = [[part, ms, 100 * ms / total] for part, ms in groups.items()]

    tokens = shape[0] * shape[1]
    gemms = []
    for linear in (m for m in model.modules() if isinstance(m, torch.nn.Linear)):
        w, inp, grad_out = linear.weight.detach(), torch.randn(tokens, linear.in_features), \
            torch.randn(tokens, linear.out_features)
        gemms += [(inp, w.t()), (grad_out, w), (grad_out.t(), inp)]  # forward, dX, dW
    outs = [torch.empty(a.shape[0], b.shape[1]) for a, b in gemms]
    gemm_flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in gemms)

    def gemms_alone() -> None:
        for (a, b), out in zip(gemms, outs, strict=True):
            torch.mm(a, b, out=out)

    alone = median_seconds(gemms_alone, min_time=1.0)
    best_peak = peak.measure()
    table("One compiled training step, 4x128, block 64, batch 12 (torch.profiler, self CPU time)",
          ["part", "ms/step", "% of step"], rows)
    console.print(f"the step's Linear GEMMs alone, same shapes: {alone * 1e3:.1f} ms, "
                  f"{gemm_flops / alone / 1e9:.0f} GFLOP/s = {100 * gemm_flops / alone / (best_peak * 1e9):.0f}% "
                  f"of the best matmul peak: the MFU ceiling for these kernels at this shape")


def learning(seconds: int) -> None:
    """The run stays in runs/bench-learning: bench_quantize quantizes its best checkpoint."""
    from llmcli.evaluate import evaluate_checkpoint

    run = LEARNING_RUN
    # Evaluating every 125 steps (the recipe: 250) times the first crossing of 2.72 twice as finely;
    # the extra evaluations (about 0.3 s each) count against the budget like any other.
    cfg = load_config(REPO / "configs/shakespeare-char.yaml",
                      [f"train.max_minutes={seconds / 60}", "train.max_steps=null", "train.eval_interval=125"])
    start = time.perf_counter()
    train(RunPlan(cfg, run, overwrite=True), console=_quiet())
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    elapsed_at = {r["step"]: r["elapsed"] for r in rows if "elapsed" in r}
    bits = [(elapsed_at.get(r["step"], math.nan), r["val_loss"] / math.log(2)) for r in evals]
    first = next((t for t, b in bits if b <= 2.72), None)
    at_100 = min((b for t, b in bits if t <= 100), default=math.nan)
    results = {split: evaluate_checkpoint(run / "best", EvalOptions(targets=[str(run / "best")], split=split,
                                                                   batch_size=64), progress=False)
               for split in ("val", "test")}
    table(f"Learning efficiency: shakespeare-char, {seconds} s budget from scratch",
          ["measure", "value", "target"],
          [["val bits/char at 100 s (eval samples)", at_100, "<= 2.72"],
           ["first time val <= 2.72 bits/char", f"{first:.0f} s" if first else "never", "<= 100 s"],
           ["val bits/char, full split (best ckpt)", results["val"].metrics["bits_per_byte"], "<= 2.40"],
           ["test bits/char, full split (best ckpt)", results["test"].metrics["bits_per_byte"], "-"],
           ["steps / wall seconds", f"{rows[-1]['step']} / {wall:.0f}", "-"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-learning", action="store_true")
    parser.add_argument("--learning-seconds", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the throughput comparison")
    args = parser.parse_args()
    os.environ.setdefault("LLMCLI_CACHE_DIR", str(REPO / ".bench-cache"))
    peak, bandwidth = Peak(), copy_bandwidth_gbs()
    table("Machine limits", ["measure", "value"],
          [["fp32 matmul peak (GFLOP/s, 2048^3)", peak.measure()], ["memory copy bandwidth (GB/s)", bandwidth],
           ["torch threads", torch.get_num_threads()]])
    with tempfile.TemporaryDirectory() as tmp:
        throughput(peak, Path(tmp), args.rounds)
        step_profile(peak)
        if not args.skip_learning:
            learning(args.learning_seconds)
    console.print("ratios are measured in this run; absolute numbers vary by machine")


if __name__ == "__main__":
    main()
