"""Quantization arithmetic on plain tensors: int8 per row, int4 group-wise packed two per byte,
per-token int8 activations, and fbgemm's packed int8 weights.

The stored formats these produce are described in llmcli/quantize/modules.py.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from llmcli.errors import UserError

ACT_QMAX = 127  # activations use 0..127 (reduce_range) so AVX2's u8*s8 pair sums cannot saturate


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per row: (q int8 [N, K] in [-127, 127], scale float32 [N]); w ~ q * scale[:, None]."""
    w = w.detach().float()
    absmax = w.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Integers [..., K] (K even) -> uint8 [..., K/2]; column 2j in the low nibble, 2j+1 in the high.

    Each value is stored as its low 4 bits, so 0..15 and -8..7 (two's complement) both fit;
    `unpack_int4(..., signed=...)` says which to read back. The checkpoint format uses 0..15.
    """
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of columns; got {q.shape[-1]}")
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, signed: bool = False) -> torch.Tensor:
    """The inverse of `pack_int4`: int8 [..., 2 * K/2], in [-8, 7] if `signed` else [0, 15]."""
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    if signed:  # sign-extend the 4-bit two's complement values
        low = low - ((low & 8) << 1)
        high = high - ((high & 8) << 1)
    return torch.stack([low, high], dim=-1).flatten(-2)


def _float16_at_least(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float16, upwards where rounding to nearest went down (x >= 0)."""
    if bool((x > torch.finfo(torch.float16).max).any()):
        raise UserError("weights too large for int4's float16 scales (|w| > 4e5)")
    x16 = x.to(torch.float16)
    low = x16.float() < x
    if bool(low.any()):
        x16[low] = torch.nextafter(x16[low], torch.full_like(x16[low], math.inf))
    return x16


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise: (packed uint8 [N, K/2], scale float16 [N, G], packed zero uint8
    [N, ceil(G/2)]), G = K / group_size. Each run of `group_size` input columns of a row shares a
    scale and a 4-bit zero point: w ~ (q - zero) * scale with q in 0..15 (see the module docstring).
    """
    w = w.detach().float()
    rows, cols = w.shape
    if cols % group_size:
        raise ValueError(f"group size {group_size} does not divide {cols} columns")
    groups = w.reshape(rows, cols // group_size, group_size)
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scale = (hi - lo) / 15
    scale16 = _float16_at_least(torch.where(scale > 0, scale, torch.ones_like(scale)))
    scale = scale16.float()
    # min/scale + zero lies in [-0.5, 0.5] and max/scale + zero <= 15.5, so nothing is clamped
    # by more than half a step.
    zero = torch.round(-lo / scale).clamp_(0, 15)
    q = torch.round(groups / scale[..., None] + zero[..., None]).clamp_(0, 15)
    zero = F.pad(zero, (0, zero.shape[1] % 2))  # an odd number of groups: pad to whole bytes
    return pack_int4(q.reshape(rows, cols)), scale16, pack_int4(zero)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = unpack_int4(packed).float()
    rows, cols = q.shape
    zero = unpack_int4(zero)[:, :cols // group_size].float()
    groups = q.reshape(rows, cols // group_size, group_size) - zero[..., None]
    return (groups * scale.float()[..., None]).reshape(rows, cols).to(dtype)


def fbgemm_available() -> bool:
    """torch's fbgemm dynamic-int8 Linear (deprecated in torch 2.13; without it int8 runs on float32
    copies of the weights, same file format)."""
    return ("fbgemm" in torch.backends.quantized.supported_engines
            and hasattr(torch, "_make_per_channel_quantized_tensor")
            and all(hasattr(torch.ops.quantized, op) for op in ("linear_prepack", "linear_dynamic")))


def fbgemm_pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Any:
    """fbgemm's packed weight for the int8 tensor `q` with exactly the per-channel `scale`."""
    with warnings.catch_warnings():  # quantized-tensor constructors warn that they are deprecated
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(
            q, scale.double(), torch.zeros(q.shape[0], dtype=torch.long), 0)
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"
        try:
            return torch.ops.quantized.linear_prepack(qweight, None if bias is None else bias.float())
        finally:
            torch.backends.quantized.engine = previous


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x [M, K]: (q - zero_point as float [M, K], scale [M, 1]); x ~ that * scale.

    PyTorch's dynamic-quantization rule (ChooseQuantizationParams with reduce_range, as fbgemm
    applies it to a whole call): [min(x, 0), max(x, 0)] maps onto 0..127 with an integer zero
    point, so 0 is exact; the scale is at least 6.1e-5 and 0.1 for an all-zero row.
    """
    lo = x.amin(dim=1, keepdim=True).clamp(max=0).double()
    hi = x.amax(dim=1, keepdim=True).clamp(min=0).double()
    raw = (hi - lo) / ACT_QMAX
    nonzero = raw > 0
    zero_point = torch.where(nonzero, torch.round(-lo / torch.where(nonzero, raw, 1.0)), 0.0)
    zero_point = zero_point.clamp_(0, ACT_QMAX).float()
    scale = torch.where(nonzero, raw.clamp(min=6.1e-5), 0.1).float()
    q = torch.round(x * (1.0 / scale) + zero_point).clamp_(0, 255)
    return q - zero_point, scale

