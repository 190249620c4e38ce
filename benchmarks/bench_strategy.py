"""Per-process memory under each train.strategy with 2 CPU (gloo) processes (about 2 minutes).

    python benchmarks/bench_strategy.py

Each strategy trains the same ~6M-parameter model for 2 steps under torchrun; `llmcli train`
prints, after its first step, the most any process holds: its weights (its shards under FSDP),
its optimizer state (AdamW's moments, plus the float32 master copy DeepSpeed keeps) and the
process's peak resident memory (libraries and data included). Ratios are against DDP, where every
process holds everything. DeepSpeed runs only when it is installed.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table

STRATEGIES = {"ddp": [], "fsdp": ["train.strategy=fsdp"], "fsdp shard_grad_op": [
    "train.strategy=fsdp", "train.fsdp_sharding=shard_grad_op"]}
if importlib.util.find_spec("deepspeed") is not None:
    STRATEGIES["deepspeed ZeRO-2"] = ["train.strategy=deepspeed", "train.zero_stage=2"]
    STRATEGIES["deepspeed ZeRO-3"] = ["train.strategy=deepspeed", "train.zero_stage=3"]
MODEL = ["model.n_layer=4", "model.n_head=4", "model.d_model=320", "model.block_size=64", "train.batch_size=2",
         "train.max_steps=2", "train.eval_interval=2", "train.eval_batches=1", "train.log_interval=1"]
LINE = re.compile(r"weights ([\d.]+ \w+), optimizer state ([\d.]+ \w+), peak ([\d.]+ \w+)")
UNITS = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def run(root: Path, name: str, extra: list[str]) -> tuple[float, float, float]:
    """(weights, optimizer state, peak) bytes of the largest process."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "llmcli", "train", "--out", str(root / name.replace(" ", "-")),
           f"data.source={root / 'corpus.txt'}", f"data.cache_dir={root / 'cache'}", *MODEL, *extra]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    found = LINE.search(proc.stderr)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return tuple(float(n) * UNITS[unit] for n, unit in (g.split() for g in found.groups()))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "corpus.txt").write_text("".join(f"line {i}: {'the quick brown fox ' * (i % 5 + 1)}\n"
                                                 for i in range(3000)))
        results = {name: run(root, name, extra) for name, extra in STRATEGIES.items()}
    base = results["ddp"]
    mib = 1 << 20
    rows = [[name, f"{w / mib:.1f}", f"{o / mib:.1f}", f"{(w + o) / (base[0] + base[1]):.2f}", f"{p / mib:.0f}"]
            for name, (w, o, p) in results.items()]
    table("Per-process memory, 2 CPU processes (largest process; 'vs ddp' = weights + optimizer state)",
          ["strategy", "weights MiB", "optimizer MiB", "vs ddp", "peak RSS MiB"], rows)


if __name__ == "__main__":
    main()
