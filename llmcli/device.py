"""Where a model runs: device and dtype choice, and CPU weight packing for decoding.

Decoding multiplies a few rows (one per running sequence) by every weight matrix. On the CPUs we
measured, torch's default sgemm reads a large weight well below memory bandwidth at that shape,
while oneDNN's kernel on a weight reordered once into its blocked layout is several times faster
(README, Benchmarks). Small weights live in the CPU caches, where oneDNN's per-call overhead
loses, so they keep nn.Linear.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llmcli.errors import FieldError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
# 256K elements packs GPT-2-124M's 768x768 layers too (one-row decoding 1.19x faster than from 1M
# up) and nothing of a 4x128 model.
PACK_MIN_WEIGHTS = 1 << 18


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
    """Inference-only stand-in for a float32 CPU nn.Linear, its weight in oneDNN's layout.

    The dense weight is dropped (a tied embedding keeps its own); `state_dict()` still yields it
    (unpacked), so a packed model saves and compares like the original. No gradients flow to
    the packed weight, so pack only a model that will not be trained again.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.packed.to_dense()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


def _can_pack(module: nn.Module) -> bool:
    return (type(module) is nn.Linear and module.weight.device.type == "cpu"
            and module.weight.dtype == torch.float32 and module.weight.numel() >= PACK_MIN_WEIGHTS)


def pack_for_cpu_decoding(model: nn.Module) -> int:
    """Swap `model`'s large float32 CPU nn.Linear layers for `PackedLinear`, in place.

    Returns how many were swapped: none where oneDNN is missing, or off the CPU, or for other
    dtypes and quantized layers (their own kernels apply). Numerically equal to nn.Linear up to
    float32 summation order.
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return 0
    targets = [(name, m) for name, m in model.named_modules() if _can_pack(m)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, PackedLinear(linear))
    return len(targets)
