"""Where a model runs: device and dtype choice, and CPU weight packing for decoding.

Decoding multiplies a few rows (one per running sequence) by every weight matrix. On the CPUs we
measured, torch's default sgemm reads a large weight well below memory bandwidth at that shape,
while oneDNN's kernel on a weight reordered once into its blocked layout is several times faster
(docs/benchmarks.md). Small weights live in the CPU caches, where oneDNN's per-call overhead
loses, so they keep nn.Linear.
"""

from __future__ import annotations

import copy
import os
import time

import torch
import torch.nn as nn

from llmcli.errors import FieldError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
# 256K elements packs GPT-2-124M's 768x768 layers too (one-row decoding 1.19x faster than from 1M
# up) and nothing of a 4x128 model.
PACK_MIN_WEIGHTS = 1 << 18


def configure_threads(requested: int | None) -> int:
    """Set torch's CPU threads: `requested`, else OMP_NUM_THREADS when set, else one per core that
    other processes leave free (sampled for a moment now; at least one). Threads beyond the free
    cores only wait on each other's time slices (docs/training.md, "CPU threads")."""
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    threads = requested or (int(from_env) if from_env.isdigit() and int(from_env) > 0 else 0) or \
        max(1, _cores() - _busy_cores())
    torch.set_num_threads(threads)
    return threads


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _busy_cores(seconds: float = 0.2) -> int:
    """Cores other processes kept busy over the last `seconds` (from /proc/stat; 0 where unknown)."""
    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as fh:
                values = [int(v) for v in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return sum(values), values[3] + values[4]  # total, idle + iowait (in clock ticks)

    first = sample()
    time.sleep(seconds)
    second = sample()
    if first is None or second is None or second[0] == first[0]:
        return 0
    busy = 1 - (second[1] - first[1]) / (second[0] - first[0])
    return round(busy * os.cpu_count())


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FieldError("device", f": unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FieldError("device", f"{name}: no CUDA GPU is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise FieldError("device", f"{name}: MPS is not available")
    return device


def select_dtype(name: str, device: torch.device, auto: torch.dtype | None = None) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that supports it (unless `auto` says otherwise), else float32."""
    if name == "auto":
        if auto is not None:
            return auto
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise FieldError("dtype", f": unknown dtype {name!r} (use auto, float32, bfloat16 or float16)")
    return DTYPES[name]


class PackedLinear(nn.Module):
    """Inference-only stand-in for a float32 CPU nn.Linear: its weight reordered once into oneDNN's
    blocked layout (a copy: the nn.Linear it was made from keeps its own weight)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


def _can_pack(module: nn.Module) -> bool:
    return (type(module) is nn.Linear and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32 and module.weight.numel() >= PACK_MIN_WEIGHTS)


def packed_for_decoding(model: nn.Module) -> nn.Module:
    """A copy of `model` for decoding whose large float32 CPU nn.Linear layers are `PackedLinear`s.

    Only the modules on the way to a packed layer are copied (shallowly: parameters, buffers and
    hooks are shared with `model`), so `model` itself is unchanged: it reports, saves and trains
    as before. The packed weights are one more copy of those matrices. `model` itself comes back
    where nothing packs: no oneDNN, not the CPU, other dtypes, quantized layers (their own kernels
    apply). Numerically equal to nn.Linear up to float32 summation order.
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return model
    targets = [name for name, m in model.named_modules() if _can_pack(m)]
    if not targets:
        return model
    copies: dict[str, nn.Module] = {}

    def copied(name: str) -> nn.Module:
        """The copy of the module `name` (made, and linked into its copied parent, on first use)."""
        if name not in copies:
            module = copy.copy(model.get_submodule(name))
            module._modules = dict(module._modules)
            copies[name] = module
            if name:
                parent, _, child = name.rpartition(".")
                copied(parent)._modules[child] = module
        return copies[name]

    for name in targets:
        parent, _, child = name.rpartition(".")
        copied(parent)._modules[child] = PackedLinear(model.get_submodule(name))
    return copies[""]
