"""Weight quantization: int8 per channel or int4 group-wise, stored as an ordinary checkpoint.

`llmcli quantize RUN_DIR --method int8|int4 --out OUT_DIR` writes a checkpoint directory with the
usual files; `llmcli.model.load_model` sees the `quantization` entry in its model.json and swaps
in the modules below, so eval, generate and serve work on it unchanged.

Stored format (safetensors, no pickles). For every quantized Linear `name` (all of
blocks.*.attn.{q,k,v,out}_proj, blocks.*.mlp.{gate,up,down}_proj, and an untied lm_head):

* int8: `name.weight` int8 [out, in] and `name.weight_scale` float32 [out]; the weight is
  `weight * weight_scale[:, None]`. Symmetric per output channel, scale = max|w| / 127, so the
  rounding error of every weight is at most scale / 2.
* int4: `name.weight` uint8 [out, in / 2], two weights per byte (column 2j in the low nibble,
  2j + 1 in the high one, each an unsigned 4-bit q in 0..15), `name.weight_scale` float16
  [out, groups] and `name.weight_zero` uint8 [out, ceil(groups / 2)] (the 4-bit zero points,
  packed the same way; groups = in / group_size): weight = (q - zero) * scale for the group of
  `group_size` consecutive input columns it is in. Asymmetric: scale = (max(w, 0) - min(w, 0)) / 15
  per group, rounded *up* to float16, zero = round(-min / scale), so 0 is exact and every weight
  is within scale / 2 of its original. That is 4 + 20 / group_size bits per weight (4.625 at 32,
  4.31 at 64). Asymmetric beat symmetric (scale only, q in -8..7) on the trained char model: val
  perplexity +0.39% vs +0.63% at group 32, +0.23% vs +0.63% at 64 (a float16 minimum instead of
  the integer zero point: +0.19% / +0.23%, for 12 more bits a group).
* biases, norms and (by default) the token/position embeddings stay float32. A tied lm_head stays
  the float32 embedding matrix unless `--include-embeddings`, which quantizes the token embedding
  table row by row with the same method (int8 per row, or int4 groups along d_model) and uses
  that one quantized matrix for the head as well. Learned position embeddings always stay float32.

model.json gets `"quantization": {"method", "group_size", "include_embeddings"}` (group_size is
null for int8). `dequantize_state_dict` turns such tensors back into a float32 state dict (for
export); `dequantize_model` does the same for a loaded model.

Runtime (chosen by measurement on a 2-core AVX2 CPU: benchmarks/bench_quant_kernels.py for single
layers, benchmarks/bench_quantize.py for whole models):

* int8 on CPU, models with at least `FBGEMM_MIN_MODEL_WEIGHTS` quantized weights: dynamic int8
  activations. Each token's activations are quantized to 7-bit unsigned integers with their own
  scale and zero point (PyTorch's dynamic-quantization rule with reduce_range, which AVX2's u8*s8
  instructions need to avoid int16 saturation), multiplied with the int8 weight in integers, and
  rescaled. One-token calls (decoding at batch 1) run fbgemm's kernel
  (`torch.ops.quantized.linear_dynamic`: 2-2.6x faster than float32 for GPT-2-small's 768x3072
  layers, 1.3x for 768x768, at one token; whole-model decoding 1.9-2.4x); its packed weight is
  built from the stored int8 tensor and the exact stored scales, so it adds no rounding. fbgemm picks one activation scale per call, so calls with up to
  `ROW_LOOP_MAX_TOKENS` tokens run it row by row, and longer calls (prefill, eval) compute the
  same per-token arithmetic in float32 against the weight converted for that call. So a token's
  output never depends on the other tokens in the batch (generate's batch-invariance holds) and
  eval measures the arithmetic that decoding uses. Per-token scales matter: one scale per call
  over an eval batch cost +0.32% perplexity on the char model, per token +0.02%.
  Batched decoding and prefill run at about float32 speed; batch-1 decoding is the fast path.
* int8 in smaller models (their weights stay in the CPU caches, where fbgemm's per-call overhead
  costs more than it saves) and int4 everywhere: the weight is dequantized once to float32 when
  first used and the layer runs float32 matmuls. int4 maths stays exact (no re-quantization to
  int8); int4 buys size, not speed. `torch._weight_int4pack_mm_for_cpu` and
  `torch._weight_int8pack_mm` measured 5-30x *slower* than float32 here, and torchao 0.18's eager
  CPU paths (Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig) 0.1-0.8x of float32.
* CUDA and other devices (not verified here: no GPU): int8 tries `torch._weight_int8pack_mm`
  (weight-only) and falls back to a per-call dequantized matmul; int4 uses the dequantized weight.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcli.errors import UserError

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
QUANTIZATION_KEY = "quantization"  # the model.json entry

# Runtime tuning, from benchmarks/bench_quant_kernels.py on the 2-core AVX2 machine.
# Models with fewer quantized weights than this run int8 layers on float32 copies: their weights
# stay in the CPU caches, where a float32 matmul beats fbgemm's per-call overhead (measured at one
# token: 2.2M weights 0.99x vs fbgemm 0.84x of float32; 4.9M weights 0.97x vs fbgemm 1.21x).
FBGEMM_MIN_MODEL_WEIGHTS = 4_000_000
ROW_LOOP_MAX_TOKENS = 8  # up to this many tokens per call, fbgemm row by row; more: the fp32 emulation
ACT_QMAX = 127  # activations use 0..127 (reduce_range) so AVX2's u8*s8 pair sums cannot saturate


# --------------------------------------------------------------------------------------------
# Quantize / dequantize / pack: plain tensor functions


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


# --------------------------------------------------------------------------------------------
# Modules


def _fbgemm_available() -> bool:
    """torch's fbgemm dynamic-int8 Linear (deprecated in torch 2.13; without it int8 runs on float32
    copies of the weights, same file format)."""
    return ("fbgemm" in torch.backends.quantized.supported_engines
            and hasattr(torch, "_make_per_channel_quantized_tensor")
            and all(hasattr(torch.ops.quantized, op) for op in ("linear_prepack", "linear_dynamic")))


def _fbgemm_pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> Any:
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


class QuantizedWeight(nn.Module):
    """A quantized [out, in] matrix (buffers `weight`, `weight_scale`, int4: `weight_zero`) and x @ W^T.

    `matmul` picks the runtime kernel (see the module docstring). Runtime copies (fbgemm's packed
    weight, a float32 dequantized weight) are built on first use and rebuilt if the buffers change.
    """

    def __init__(self, rows: int, cols: int, method: str, group_size: int | None, *,
                 bias: bool = False, device: torch.device | str | None = None,
                 dynamic_activations: bool = False):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown quantization method {method!r}")
        self.rows, self.cols, self.method, self.group_size = rows, cols, method, group_size
        if method == "int8":
            self.register_buffer("weight", torch.zeros(rows, cols, dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.ones(rows, dtype=torch.float32, device=device))
            self.register_buffer("weight_zero", None)
        else:
            groups = cols // group_size
            self.register_buffer("weight", torch.zeros(rows, cols // 2, dtype=torch.uint8, device=device))
            self.register_buffer("weight_scale", torch.ones(rows, groups, dtype=torch.float16, device=device))
            self.register_buffer("weight_zero", torch.zeros(rows, (groups + 1) // 2, dtype=torch.uint8,
                                                            device=device))
        self.register_parameter("bias", nn.Parameter(torch.zeros(rows, device=device)) if bias else None)
        # int8 with dynamic int8 activations (fbgemm), or float32 on the dequantized weight: fixed
        # per layer, so the arithmetic never depends on the batch (see quantize_model).
        self.dynamic_activations = dynamic_activations and method == "int8" and _fbgemm_available()
        self._runtime: dict[str, Any] = {}

    def _set_weight(self, w: torch.Tensor) -> None:
        """Quantize the float matrix `w` into this module's buffers."""
        if self.method == "int8":
            self.weight, self.weight_scale = quantize_int8(w)
        else:
            self.weight, self.weight_scale, self.weight_zero = quantize_int4(w, self.group_size)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.method == "int4" else ""
        kernel = ", dynamic int8 activations" if self.dynamic_activations else ""
        return f"in={self.cols}, out={self.rows}, {self.method}{group}{kernel}"

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle without the runtime caches
        state = self.__dict__.copy()
        state["_runtime"] = {}
        return state

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.method == "int8":
            return dequantize_int8(self.weight, self.weight_scale, dtype)
        return dequantize_int4(self.weight, self.weight_scale, self.weight_zero, self.group_size, dtype)

    def rows_of(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows `index` (any shape) -> [*index.shape, cols]: an embedding lookup."""
        if self.method == "int8":
            return (self.weight[index].float() * self.weight_scale[index].float()[..., None]).to(dtype)
        return F.embedding(index, self._cached("dense", self._dense)[0]).to(dtype)

    def _cached(self, name: Any, build: Callable[[], Any]) -> Any:
        """A runtime copy of the weights, rebuilt when a tensor was replaced (load_state_dict,
        .to()) or the integer weight was changed in place. Checked on every call, so kept cheap."""
        weight, scale = self._buffers["weight"], self._buffers["weight_scale"]
        bias = self._parameters["bias"]
        entry = self._runtime.get(name)
        if (entry is None or entry[0]() is not weight or entry[1]() is not scale
                or (bias is not None and entry[2]() is not bias)
                or (entry[3] is not None and entry[3] != weight._version)):
            with torch.inference_mode(False), torch.no_grad():
                value = build()
            version = None if weight.is_inference() else weight._version  # inference tensors have none
            entry = (weakref.ref(weight), weakref.ref(scale), weakref.ref(bias) if bias is not None else None,
                     version, value)
            self._runtime[name] = entry
        return entry[4]

    def _dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(float32 weight, float32 bias or None): F.linear's arguments."""
        return self.dequantize(torch.float32), None if self.bias is None else self.bias.float()

    def _fbgemm(self) -> Any:
        return _fbgemm_pack(self.weight, self.weight_scale, self.bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., cols] -> x @ W^T (+ bias) [..., rows], in x's dtype."""
        if not x.is_cpu:
            return self._matmul_accelerator(x)
        x32 = x if x.dtype == torch.float32 else x.float()
        if not self.dynamic_activations:
            y = F.linear(x32, *self._cached("dense", self._dense))
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        tokens = x.numel() // self.cols
        if tokens == 1:  # decoding: this is the hot path
            y = torch.ops.quantized.linear_dynamic(x32, self._cached("fbgemm", self._fbgemm), True)
        elif tokens <= ROW_LOOP_MAX_TOKENS:
            packed = self._cached("fbgemm", self._fbgemm)
            rows = x32.reshape(tokens, self.cols).split(1)
            y = torch.cat([torch.ops.quantized.linear_dynamic(r, packed, True) for r in rows])
            y = y.reshape(*x.shape[:-1], self.rows)
        else:
            # The same per-token integer arithmetic in float32 (exact for these integer ranges
            # up to float32 rounding of the sums), with the weight dequantized for this call.
            xq, x_scale = quantize_activations(x32.reshape(tokens, self.cols))
            y = F.linear(xq, self.weight.float()) * (x_scale * self.weight_scale)
            if self.bias is not None:
                y = y + self.bias.float()
            y = y.reshape(*x.shape[:-1], self.rows)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _matmul_accelerator(self, x: torch.Tensor) -> torch.Tensor:
        # Not verified (no GPU here): weight-only int8 via torch's kernel when it accepts the
        # call, else a dequantize-per-call matmul; int4 uses the dequantized weight.
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.method == "int8":
            if self._runtime.get("int8pack_ok", True):
                try:
                    x2 = x.reshape(-1, self.cols)
                    y = torch._weight_int8pack_mm(x2, self.weight, self.weight_scale.to(x.dtype))
                    y = y.reshape(*x.shape[:-1], self.rows)
                    return y if bias is None else y + bias
                except (RuntimeError, NotImplementedError):
                    self._runtime["int8pack_ok"] = False
            return F.linear(x, self.dequantize(x.dtype), bias)
        w = self._cached(("dense", x.dtype), lambda: self.dequantize(x.dtype))
        return F.linear(x, w, bias)


class QuantizedLinear(QuantizedWeight):
    """Drop-in for nn.Linear: state `weight` (int), `weight_scale`, optional `bias` (float)."""

    def __init__(self, in_features: int, out_features: int, method: str, group_size: int | None, *,
                 bias: bool = True, device: torch.device | str | None = None,
                 dynamic_activations: bool = False):
        super().__init__(out_features, in_features, method, group_size, bias=bias, device=device,
                         dynamic_activations=dynamic_activations)
        self.in_features, self.out_features = in_features, out_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str, group_size: int | None, *,
                    dynamic_activations: bool = False) -> QuantizedLinear:
        module = cls(linear.in_features, linear.out_features, method, group_size,
                     bias=linear.bias is not None, device=linear.weight.device,
                     dynamic_activations=dynamic_activations)
        module._set_weight(linear.weight)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().float().clone())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


class QuantizedEmbedding(QuantizedWeight):
    """Drop-in for nn.Embedding: the [num_embeddings, dim] table quantized row by row."""

    def __init__(self, num_embeddings: int, embedding_dim: int, method: str, group_size: int | None, *,
                 device: torch.device | str | None = None, dynamic_activations: bool = False,
                 output_dtype: torch.dtype = torch.float32):
        super().__init__(num_embeddings, embedding_dim, method, group_size, device=device,
                         dynamic_activations=dynamic_activations)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.output_dtype = output_dtype  # what the float table's lookups gave: the model's dtype

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, method: str, group_size: int | None, *,
                       dynamic_activations: bool = False) -> QuantizedEmbedding:
        module = cls(embedding.num_embeddings, embedding.embedding_dim, method, group_size,
                     device=embedding.weight.device, dynamic_activations=dynamic_activations,
                     output_dtype=embedding.weight.dtype)
        module._set_weight(embedding.weight)
        return module

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.rows_of(idx, self.output_dtype)


class TiedQuantizedHead(nn.Module):
    """The LM head of a tied model with --include-embeddings: x @ table^T of the quantized embedding.

    Holds no state of its own (the table is saved once, under tok_embed).
    """

    def __init__(self, embedding: QuantizedEmbedding):
        super().__init__()
        self._embedding = (embedding,)  # a tuple, so it is not registered (and saved) twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._embedding[0].matmul(x)


# --------------------------------------------------------------------------------------------
# Whole models


def quantization_entry(method: str, group_size: int | None = None, include_embeddings: bool = False) -> dict:
    """The model.json `quantization` value (validated)."""
    if method not in METHODS:
        raise UserError(f"unknown quantization method {method!r} (use {' or '.join(METHODS)})")
    if method == "int8":
        if group_size is not None:
            raise UserError("--group-size applies to int4 only (int8 uses one scale per output channel)")
    else:
        group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
        if group_size not in GROUP_SIZES:
            raise UserError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}; got {group_size}")
    return {"method": method, "group_size": group_size, "include_embeddings": bool(include_embeddings)}


def parse_quantization(value: Any, where: str) -> dict:
    """Validate a `quantization` entry read from `where` (a model.json)."""
    if not isinstance(value, dict) or set(value) != {"method", "group_size", "include_embeddings"}:
        raise UserError(f"{where}: 'quantization' must be an object with method, group_size and "
                        f"include_embeddings; got {value!r}")
    try:
        entry = quantization_entry(value["method"], value["group_size"], value["include_embeddings"])
    except UserError as exc:
        raise UserError(f"{where}: bad 'quantization' entry: {exc}") from None
    if entry != value:
        raise UserError(f"{where}: bad 'quantization' entry {value!r}")
    return entry


def read_quantization(model_json: str | Path) -> dict | None:
    """The `quantization` entry of a model.json, or None for a float checkpoint (or no file)."""
    path = Path(model_json)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # model_config_from_json reports unreadable files
    if not isinstance(raw, dict) or QUANTIZATION_KEY not in raw:
        return None
    return parse_quantization(raw[QUANTIZATION_KEY], str(path))


def _targets(model: nn.Module, include_embeddings: bool) -> list[tuple[str, nn.Module]]:
    """(name, module) to quantize: every nn.Linear except a tied head, plus tok_embed if asked."""
    tied = model.config.tie_embeddings
    out = [(name, m) for name, m in model.named_modules()
           if isinstance(m, nn.Linear) and not (tied and name == "lm_head")]
    if include_embeddings:
        out.append(("tok_embed", model.tok_embed))
    return out


def check_quantizable(model: nn.Module, entry: dict) -> None:
    """A one-line UserError if int4's group size does not divide some layer's input size."""
    if entry["method"] != "int4":
        return
    group = entry["group_size"]
    for name, module in _targets(model, entry["include_embeddings"]):
        rows, cols = module.weight.shape
        if cols % group:
            kind = "embedding dim" if isinstance(module, nn.Embedding) else "in_features"
            raise UserError(f"--group-size {group} does not divide {name}'s {kind} {cols} "
                            f"(weight {rows}x{cols}); use a group size that divides it")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(model: nn.Module, entry: dict) -> nn.Module:
    """Quantize a float Transformer in place (see the module docstring); returns it."""
    with torch.no_grad():
        _swap_modules(model, entry, quantize_weights=True)
    return model


def swap_in_quantized_modules(model: nn.Module, entry: dict, dtype: torch.dtype | None = None) -> None:
    """Replace the float layers of a freshly built (e.g. meta) Transformer by empty quantized ones,
    so that `load_state_dict` can fill them from a quantized checkpoint whose float tensors are
    loaded as `dtype` (None: float32). Quantized layers compute in float32 and return their
    input's dtype; a quantized embedding returns `dtype`."""
    _swap_modules(model, entry, quantize_weights=False, dtype=dtype or torch.float32)


def _swap_modules(model: nn.Module, entry: dict, quantize_weights: bool,
                  dtype: torch.dtype = torch.float32) -> None:
    check_quantizable(model, entry)
    method, group = entry["method"], entry["group_size"]
    targets = _targets(model, entry["include_embeddings"])
    # One runtime for all int8 layers of a model, by its size (see FBGEMM_MIN_MODEL_WEIGHTS).
    dynamic = sum(m.weight.numel() for _, m in targets) >= FBGEMM_MIN_MODEL_WEIGHTS
    for name, module in targets:
        if isinstance(module, nn.Embedding):
            if quantize_weights:
                new: nn.Module = QuantizedEmbedding.from_embedding(module, method, group,
                                                                   dynamic_activations=dynamic)
            else:
                new = QuantizedEmbedding(module.num_embeddings, module.embedding_dim, method, group,
                                         device=module.weight.device, dynamic_activations=dynamic,
                                         output_dtype=dtype)
        elif quantize_weights:
            new = QuantizedLinear.from_linear(module, method, group, dynamic_activations=dynamic)
        else:
            new = QuantizedLinear(module.in_features, module.out_features, method, group,
                                  bias=module.bias is not None, device=module.weight.device,
                                  dynamic_activations=dynamic)
        _set_module(model, name, new)
    if entry["include_embeddings"] and model.config.tie_embeddings:
        model.lm_head = TiedQuantizedHead(model.tok_embed)
    model.quantization = dict(entry)


def quantized_tensor_names(model: nn.Module) -> set[str]:
    """State-dict names whose dtype is part of the format (integer weights and their scales):
    load_model's `dtype` must not cast them."""
    return {f"{name}.{buf}" for name, m in model.named_modules() if isinstance(m, QuantizedWeight)
            for buf in ("weight", "weight_scale", "weight_zero")}


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to save: a tied float lm_head is left out (it is tok_embed.weight)."""
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    return tensors


def dequantize_state_dict(tensors: dict[str, torch.Tensor], entry: dict,
                          dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A quantized checkpoint's tensors -> the float state dict `save_model` would have written.

    Every `X.weight` with an `X.weight_scale` beside it is dequantized (int8 per row, or int4
    groups of `entry["group_size"]` with `X.weight_zero`); scales and zero points disappear; other
    float tensors are cast to `dtype`.
    A tied head stays implicit (no `lm_head.weight`), as in a float checkpoint.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith((".weight_scale", ".weight_zero")):
            continue
        scale = tensors.get(name + "_scale") if name.endswith(".weight") else None
        if scale is None:
            out[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        elif entry["method"] == "int8":
            out[name] = dequantize_int8(tensor, scale, dtype)
        else:
            out[name] = dequantize_int4(tensor, scale, tensors[name + "_zero"], entry["group_size"], dtype)
    return out


def dequantize_model(model: nn.Module) -> nn.Module:
    """A new float32 Transformer with the quantized model's weights dequantized."""
    from llmcli.model import Transformer

    entry = getattr(model, "quantization", None)
    if entry is None:
        raise ValueError("the model is not quantized")
    tensors = dequantize_state_dict(quantized_state_dict(model), entry)
    with torch.device("meta"):
        plain = Transformer(model.config)
    if model.config.tie_embeddings:
        tensors["lm_head.weight"] = tensors["tok_embed.weight"]
    plain.load_state_dict(tensors, assign=True)
    if model.config.tie_embeddings:
        plain.lm_head.weight = plain.tok_embed.weight
    return plain


def load_dequantized_model(directory: str | Path, dtype: torch.dtype | None = None,
                           device: torch.device | str = "cpu") -> nn.Module:
    """A checkpoint as a plain float Transformer: a quantized one with its weights dequantized
    (float32, or `dtype`). For `llmcli export --dequantize`."""
    from llmcli.model import load_model

    model = load_model(directory, device=device)
    if getattr(model, "quantization", None) is not None:
        model = dequantize_model(model)
    return model.to(dtype) if dtype is not None else model


# --------------------------------------------------------------------------------------------
# The `llmcli quantize` command


@dataclass
class Measurement:
    size_bytes: int
    perplexity: float | None = None
    eval_tokens: int = 0
    decode_tokens_per_second: float | None = None


@dataclass
class QuantizeReport:
    source: Path
    out: Path
    entry: dict
    before: Measurement
    after: Measurement
    layers: int
    source_dtype: str = "float32"
    greedy_agreement: float | None = None  # share of the greedy tokens that match the original


def _weights_size(directory: Path) -> int:
    from llmcli.checkpoint import WEIGHTS

    return (directory / WEIGHTS).stat().st_size


def _check_paths(run_dir: Path, out: Path, overwrite: bool) -> Path:
    from llmcli.checkpoint import resolve_checkpoint

    source = resolve_checkpoint(run_dir)
    out = Path(out).expanduser()
    resolved_out = out.resolve()
    for protected in {Path(run_dir).expanduser().resolve(), source.resolve()}:
        if resolved_out == protected or protected.is_relative_to(resolved_out):
            raise UserError(f"--out {out} would overwrite the checkpoint being quantized ({protected}); "
                            "choose another directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it")
    return source


def quantize_checkpoint(run_dir: str | Path, out: str | Path, *, method: str, group_size: int | None = None,
                        include_embeddings: bool = False, overwrite: bool = False, measure: bool = True,
                        eval_tokens: int = 32768, decode_tokens: int = 64,
                        log=None) -> QuantizeReport:
    """Quantize a run's (or checkpoint's) weights into a new checkpoint directory `out`."""
    from llmcli.checkpoint import INFO, MODEL_CONFIG, RUN_CONFIG, TOKENIZER, read_info
    from llmcli.io import atomic_replace_dir, atomic_write, atomic_write_json
    from llmcli.model import load_model

    log = log or (lambda message: None)
    entry = quantization_entry(method, group_size, include_embeddings)
    if eval_tokens < 0 or decode_tokens < 0:
        raise UserError("--eval-tokens and --decode-tokens must be >= 0")
    out = Path(out).expanduser()
    source = _check_paths(Path(run_dir), out, overwrite)
    existing = read_quantization(source / MODEL_CONFIG)
    if existing is not None:
        raise UserError(f"{source} is already quantized ({existing['method']}); quantize the float "
                        "checkpoint it was made from")
    for name in (TOKENIZER, RUN_CONFIG):
        if not (source / name).is_file():
            raise UserError(f"{source} has no {name}; is it a checkpoint written by llmcli train?")

    model = load_model(source).eval()
    try:
        check_quantizable(model, entry)
    except UserError as exc:
        if method == "int4" and group_size is None:
            raise UserError(f"{exc} ({DEFAULT_GROUP_SIZE} is the default)") from None
        raise
    source_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    before = Measurement(size_bytes=_weights_size(source))
    if measure:
        log(f"measuring the {source_dtype} model's perplexity")
        before.perplexity, before.eval_tokens = measure_perplexity(source, model, eval_tokens)

    quantize_model(model, entry)
    tensors = quantized_state_dict(model)
    model_json = json.loads((source / MODEL_CONFIG).read_text(encoding="utf-8"))
    model_json[QUANTIZATION_KEY] = entry
    info = {**read_info(source), "quantization": entry, "quantized_from": str(source.resolve()),
            "quantized_at": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def build(tmp: Path) -> None:
        from safetensors.torch import save_file

        from llmcli.checkpoint import WEIGHTS

        atomic_write(tmp / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        atomic_write_json(tmp / MODEL_CONFIG, model_json)
        shutil.copyfile(source / TOKENIZER, tmp / TOKENIZER)
        shutil.copyfile(source / RUN_CONFIG, tmp / RUN_CONFIG)
        atomic_write_json(tmp / INFO, info)

    atomic_replace_dir(out, build)
    layers = sum(isinstance(m, QuantizedWeight) for m in model.modules())
    del model
    report = QuantizeReport(source=source, out=out, entry=entry, before=before,
                            after=Measurement(size_bytes=_weights_size(out)), layers=layers,
                            source_dtype=source_dtype)
    if measure:
        log("measuring the quantized model's perplexity")
        quantized = load_model(out).eval()  # exactly what eval / generate will load
        report.after.perplexity, report.after.eval_tokens = measure_perplexity(out, quantized, eval_tokens)
        if decode_tokens:
            log("timing decoding, both models in turn")
            original = load_model(source).eval()
            (before.decode_tokens_per_second, reference), (report.after.decode_tokens_per_second, tokens) = \
                measure_decode_pair(original, quantized, decode_tokens, [_eot(source)])
            same = sum(a == b for a, b in zip(reference, tokens, strict=False))
            report.greedy_agreement = same / max(1, len(reference))
    return report


def _eot(directory: Path) -> int:
    from llmcli.checkpoint import TOKENIZER
    from llmcli.tokenizer import eot_id, load_tokenizer

    return eot_id(load_tokenizer(directory / TOKENIZER))


def measure_perplexity(directory: Path, model: nn.Module, eval_tokens: int) -> tuple[float | None, int]:
    """Perplexity on the first `eval_tokens` tokens of the run's own val split, scored by
    llmcli.evaluate (sliding windows, as `llmcli eval`); (None, 0) when eval_tokens is 0."""
    if eval_tokens == 0:
        return None, 0
    from llmcli import ui
    from llmcli.data import prepare_data
    from llmcli.evaluate import data_config, metrics_from_sums, score_tokens

    try:
        prepared = prepare_data(data_config(directory, None, []), console=ui.stderr)
    except UserError as exc:
        raise UserError(f"{exc} (measuring perplexity needs the run's data; --eval-tokens 0 skips it)") from None
    if "val" not in prepared.splits:
        raise UserError("the run's data has no val split to measure perplexity on; pass --eval-tokens 0")
    tokens = prepared.tokens("val")[:eval_tokens]
    metrics = metrics_from_sums(score_tokens(model, tokens, first_token=_eot(directory)))
    return metrics["perplexity"], int(metrics["tokens"])


def measure_decode(model: nn.Module, new_tokens: int, prompt_ids: list[int]) -> tuple[float, list[int]]:
    """One greedy generation of `new_tokens` at batch 1 with llmcli.generate's engine:
    (decode tok/s, the tokens)."""
    from llmcli.generate import Engine, SamplingParams

    new_tokens = max(1, min(new_tokens, model.config.block_size - len(prompt_ids)))
    engine = Engine(model, max_batch_size=1)
    request = engine.add(prompt_ids, SamplingParams(max_new_tokens=new_tokens + 1, temperature=0.0,
                                                    ignore_eot=True))
    tokens = []
    while engine.has_work():
        tokens += [ev.token for ev in engine.step() if ev.id == request]
    stats = engine.stats
    return (stats["decode_tokens"] / stats["decode_seconds"] if stats["decode_seconds"] > 0 else 0.0), tokens


def measure_decode_pair(a: nn.Module, b: nn.Module, new_tokens: int, prompt_ids: list[int], *,
                        repeats: int = 2) -> tuple[tuple[float, list[int]], tuple[float, list[int]]]:
    """Decode speed of two models timed in turn (a, b, a, b, ...) after a warm-up run of each,
    best of `repeats` each, so that load from other jobs on the machine hits both alike.
    Returns ((tok/s, tokens) of a, (tok/s, tokens) of b)."""
    results = []
    for model in (a, b):  # warm-up: builds the runtime weights
        results.append([0.0, measure_decode(model, new_tokens, prompt_ids)[1]])
    for _ in range(repeats):
        for result, model in zip(results, (a, b), strict=True):
            result[0] = max(result[0], measure_decode(model, new_tokens, prompt_ids)[0])
    return (results[0][0], results[0][1]), (results[1][0], results[1][1])


def print_report(report: QuantizeReport, console=None) -> None:
    from rich.table import Table

    from llmcli import ui

    console = console or ui.stdout
    entry = report.entry
    method = entry["method"] + (f" g{entry['group_size']}" if entry["group_size"] else "")
    if entry["include_embeddings"]:
        method += " + embeddings"
    table = Table(title=f"quantize {method}: {report.layers} layers")
    table.add_column("")
    table.add_column(report.source_dtype, justify="right")
    table.add_column(entry["method"], justify="right")
    table.add_column("change", justify="right")
    b, a = report.before, report.after
    table.add_row("weights file", _mib(b.size_bytes), _mib(a.size_bytes), f"{a.size_bytes / b.size_bytes:.3f}x")
    if b.perplexity is not None and a.perplexity is not None:
        table.add_row(f"val perplexity ({a.eval_tokens:,} tokens)", f"{b.perplexity:.4f}", f"{a.perplexity:.4f}",
                      f"{100 * (a.perplexity / b.perplexity - 1):+.2f}%")
    if b.decode_tokens_per_second and a.decode_tokens_per_second:
        table.add_row("decode tok/s (batch 1, greedy)", f"{b.decode_tokens_per_second:.1f}",
                      f"{a.decode_tokens_per_second:.1f}",
                      f"{a.decode_tokens_per_second / b.decode_tokens_per_second:.2f}x")
    if report.greedy_agreement is not None:
        table.add_row(f"greedy tokens equal to {report.source_dtype}'s", "",
                      f"{100 * report.greedy_agreement:.0f}%", "")
    console.print(table)
    console.print(f"wrote {report.out}", markup=False, soft_wrap=True)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


__all__ = [
    "METHODS", "GROUP_SIZES", "QUANTIZATION_KEY", "quantize_int8", "dequantize_int8", "quantize_int4",
    "dequantize_int4", "pack_int4", "unpack_int4", "QuantizedLinear", "QuantizedEmbedding",
    "quantization_entry", "read_quantization", "quantize_model", "dequantize_model", "dequantize_state_dict",
    "load_dequantized_model",
    "quantize_checkpoint", "print_report",
]
