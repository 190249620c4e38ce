"""Quantized layers and whole-model quantization: what `llmcli quantize` writes and the loader swaps in.

Stored format (safetensors, no pickles). For every quantized Linear `name` (every nn.Linear of the
model except a tied head) and, with `--include-embeddings`, every token embedding table:

* int8: `name.weight` int8 [out, in] and `name.weight_scale` float32 [out]; the weight is
  `weight * weight_scale[:, None]`. Symmetric per output channel, scale = max|w| / 127.
* int4: `name.weight` uint8 [out, in / 2], two weights per byte (column 2j in the low nibble,
  2j + 1 in the high one, each an unsigned 4-bit q in 0..15), `name.weight_scale` float16
  [out, groups] and `name.weight_zero` uint8 [out, ceil(groups / 2)] (the 4-bit zero points,
  packed the same way; groups = in / group_size): weight = (q - zero) * scale for the group of
  `group_size` consecutive input columns it is in. Asymmetric: scale = (max(w, 0) - min(w, 0)) / 15
  per group, rounded *up* to float16, zero = round(-min / scale), so 0 is exact and every weight
  is within scale / 2 of its original.
* every weight matrix of a recurrent layer (nn.LSTM / nn.GRU / nn.RNN), the same way, under the
  layer's own parameter names (see recurrent.py).
* biases, norms and position embeddings stay float. A tied head stays the float embedding matrix
  unless the embedding is quantized too; then it uses that one quantized matrix (and its own bias).

model.json gets `"quantization": {"method", "group_size", "include_embeddings"}` (group_size is
null for int8); `quantization_of(model)` reads it back off the modules.

Runtime, chosen by measurement (docs/benchmarks.md): int8 on the CPU in models of at least
`FBGEMM_MIN_MODEL_WEIGHTS` quantized weights quantizes activations per token and runs fbgemm's
dynamic int8 kernel, row by row up to `ROW_LOOP_MAX_TOKENS` tokens and as the same arithmetic in
float32 beyond, so a token's output never depends on the rest of the batch. Smaller int8 models
and int4 run float32 matmuls on a weight dequantized once (int4 buys size, not speed). Inside a
compiled decode step (generate/compiled.py) an int8 layer is one reduction over its int8 weight
with float activations, which inductor fuses into a loop that converts each weight as it reads it
(weight-only int8; `torch._weight_int8pack_mm` measured 5-12x slower than float32 on this AVX2
CPU, and int4 written the same way 2.6-4.5x slower than float32: it stays on its float copy). Other
devices (unverified here) try `torch._weight_int8pack_mm`, else a dequantized matmul.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcli.errors import FieldError, UserError
from llmcli.models.base import LanguageModel
from llmcli.models.registry import build_model
from llmcli.quantize.kernels import (
    dequantize_int4,
    dequantize_int8,
    fbgemm_available,
    fbgemm_pack,
    quantize_activations,
    quantize_int4,
    quantize_int8,
)
from llmcli.quantize.recurrent import QuantizedRecurrent, empty_recurrent, matrix_names, quantize_recurrent

METHODS = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
# Models with fewer quantized weights than this run int8 layers on float32 copies: their weights
# stay in the CPU caches, where a float32 matmul beats fbgemm's per-call overhead.
FBGEMM_MIN_MODEL_WEIGHTS = 4_000_000
ROW_LOOP_MAX_TOKENS = 8  # up to this many tokens per call, fbgemm row by row; more: the fp32 emulation


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
        self.dynamic_activations = dynamic_activations and method == "int8" and fbgemm_available()
        self._runtime: dict[str, Any] = {}

    @property
    def compiles(self) -> bool:
        """Whether a compiled decode step runs this layer inside its graph (int8: `_int8_reduction`);
        int4 reads its float copy through `_cached`, a break out of the graph at every call."""
        return self.method == "int8"

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
        return fbgemm_pack(self.weight, self.weight_scale, self.bias)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., cols] -> x @ W^T (+ bias) [..., rows], in x's dtype."""
        if torch.is_grad_enabled():  # training through the frozen layer (LoRA on a quantized base)
            return _FrozenMatmul.apply(x, self)
        if not x.is_cpu:
            return self._matmul_accelerator(x)
        if self.method == "int8" and torch.compiler.is_compiling():
            return self._int8_reduction(x)
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

    def _int8_reduction(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T written as one reduction over the int8 weight, for a compiled decode step:
        inductor converts each weight to float inside its loop, so a step reads one byte a weight
        and keeps no float copy (float activations: weight-only int8)."""
        y = (x[..., None, :] * self.weight.to(x.dtype)).sum(-1) * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

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


class _FrozenMatmul(torch.autograd.Function):
    """x @ W^T (+ bias) for a frozen quantized W, differentiable in x only. W is dequantized for the
    forward and again for the backward and never kept: the memory of QLoRA, not of a float copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedWeight) -> torch.Tensor:
        ctx.layer = layer
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, layer.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantize(grad.dtype), None


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
    """The LM head of a tied model with --include-embeddings: x @ table^T of the quantized embedding
    (+ the head's own bias, if it has one).

    Holds no weight of its own (the table is saved once, under the embedding's name).
    """

    def __init__(self, embedding: QuantizedEmbedding, bias: nn.Parameter | None = None):
        super().__init__()
        self._embedding = (embedding,)  # a tuple, so it is not registered (and saved) twice
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._embedding[0].matmul(x)
        return y if self.bias is None else y + self.bias.to(y.dtype)



# --------------------------------------------------------------------------------------------
# Whole models


def quantization_entry(method: str, group_size: int | None = None, include_embeddings: bool = False) -> dict:
    """The model.json `quantization` value (validated)."""
    if method not in METHODS:
        raise FieldError("method", f": unknown quantization method {method!r} (use {' or '.join(METHODS)})")
    if method == "int8":
        if group_size is not None:
            raise FieldError("group_size", "applies to int4 only (int8 uses one scale per output channel)")
    else:
        group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
        if group_size not in GROUP_SIZES:
            raise FieldError("group_size", f"must be one of {', '.join(map(str, GROUP_SIZES))}; got {group_size}")
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


QUANTIZED_LAYERS = (QuantizedWeight, QuantizedRecurrent)


def quantized_layer_count(model: nn.Module) -> int:
    """Quantized layers: Linear and embedding layers, and each layer of a recurrent stack."""
    return sum(m.options["num_layers"] if isinstance(m, QuantizedRecurrent) else 1
               for m in model.modules() if isinstance(m, QUANTIZED_LAYERS))


def quantization_of(model: nn.Module) -> dict | None:
    """The `quantization` entry that describes `model`'s layers, or None for a float model."""
    layers = [m for m in model.modules() if isinstance(m, QUANTIZED_LAYERS)]
    if not layers:
        return None
    method = layers[0].method
    return {"method": method, "group_size": layers[0].group_size if method == "int4" else None,
            "include_embeddings": any(isinstance(m, QuantizedEmbedding) for m in layers)}


def _targets(model: LanguageModel, include_embeddings: bool) -> list[tuple[str, nn.Module]]:
    """(name, module) to quantize: every nn.Linear except one whose weight is tied to another
    tensor (a tied LM head), every recurrent layer stack, plus the token embeddings if asked."""
    tied = {alias.rpartition(".")[0] for alias in model.tied_weights()}
    out = [(name, m) for name, m in model.named_modules()
           if isinstance(m, (nn.Linear, nn.RNNBase)) and name not in tied]
    if include_embeddings:
        out += [(name, model.get_submodule(name)) for name in model.token_embeddings]
    return out


def _matrices(name: str, module: nn.Module) -> list[tuple[str, torch.Size]]:
    """(name, shape) of each weight matrix a target quantizes."""
    if isinstance(module, nn.RNNBase):
        return [(f"{name}.{m}", getattr(module, m).shape) for m in matrix_names(module)]
    return [(name, module.weight.shape)]


def check_quantizable(model: LanguageModel, entry: dict) -> None:
    """A one-line UserError if int4's group size does not divide some matrix's input size."""
    if entry["method"] != "int4":
        return
    group = entry["group_size"]
    for name, module in _targets(model, entry["include_embeddings"]):
        for matrix, (rows, cols) in _matrices(name, module):
            if cols % group:
                kind = {nn.Embedding: "embedding dim", nn.Linear: "in_features"}.get(type(module), "input size")
                raise UserError(f"--group-size {group} does not divide {matrix}'s {kind} {cols} "
                                f"(weight {rows}x{cols}); use a group size that divides it")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(model: LanguageModel, entry: dict) -> LanguageModel:
    """Quantize a float model in place (see the module docstring); returns it."""
    with torch.no_grad():
        _swap_modules(model, entry, quantize_weights=True)
    return model


def swap_in_quantized_modules(model: LanguageModel, entry: dict, dtype: torch.dtype | None = None) -> None:
    """Replace the float layers of a freshly built (e.g. meta) model by empty quantized ones, so
    that `load_state_dict` can fill them from a quantized checkpoint whose float tensors are loaded
    as `dtype` (None: float32). Quantized layers compute in float32 and return their input's
    dtype; a quantized embedding returns `dtype`."""
    _swap_modules(model, entry, quantize_weights=False, dtype=dtype or torch.float32)


def _swap_modules(model: LanguageModel, entry: dict, quantize_weights: bool,
                  dtype: torch.dtype = torch.float32) -> None:
    check_quantizable(model, entry)
    method, group = entry["method"], entry["group_size"]
    targets = _targets(model, entry["include_embeddings"])
    # One runtime for all int8 Linear layers of a model, by its size (see FBGEMM_MIN_MODEL_WEIGHTS);
    # recurrent layers use theirs whatever the size (recurrent.py).
    dynamic = sum(shape.numel() for name, m in targets for _, shape in _matrices(name, m)) >= FBGEMM_MIN_MODEL_WEIGHTS
    for name, module in targets:
        if isinstance(module, nn.RNNBase):
            make = quantize_recurrent if quantize_weights else empty_recurrent
            new: nn.Module = make(module, method, group, dynamic_activations=True)
        elif isinstance(module, nn.Embedding):
            if quantize_weights:
                new = QuantizedEmbedding.from_embedding(module, method, group,
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
    for alias, source in model.tied_weights().items():  # a head tied to a now quantized table
        table = model.get_submodule(source.rpartition(".")[0])
        if isinstance(table, QuantizedEmbedding):
            head = alias.rpartition(".")[0]
            _set_module(model, head, TiedQuantizedHead(table, getattr(model.get_submodule(head), "bias", None)))


def quantized_tensor_names(model: nn.Module) -> set[str]:
    """State-dict names whose dtype is part of the format (integer weights and their scales):
    a loader's `dtype` must not cast them."""
    names = {f"{name}.{buf}" for name, m in model.named_modules() if isinstance(m, QuantizedWeight)
             for buf in ("weight", "weight_scale", "weight_zero")}
    return names | {f"{name}.{buf}" for name, m in model.named_modules() if isinstance(m, QuantizedRecurrent)
                    for buf in m.quantized_names()}


def dequantize_state_dict(tensors: dict[str, torch.Tensor], entry: dict,
                          dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A quantized checkpoint's tensors -> the float state dict of the same model.

    Every `X` with an `X_scale` beside it (`lm_head.weight`, `rnn.weight_hh_l0`) is dequantized
    (int8 per row, or int4 groups of `entry["group_size"]` with `X_zero`); scales and zero points
    disappear; other float tensors are cast to `dtype`. A tied head stays implicit, as in a float
    checkpoint.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(("_scale", "_zero")) and name.rpartition("_")[0] in tensors:
            continue
        scale = tensors.get(name + "_scale")
        if scale is None:
            out[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        elif entry["method"] == "int8":
            out[name] = dequantize_int8(tensor, scale, dtype)
        else:
            out[name] = dequantize_int4(tensor, scale, tensors[name + "_zero"], entry["group_size"], dtype)
    return out


def dequantize_model(model: LanguageModel) -> LanguageModel:
    """A new float32 model of the same family with the quantized model's weights dequantized."""
    entry = quantization_of(model)
    if entry is None:
        raise ValueError("the model is not quantized")
    aliases = model.tied_weights()
    state = {k: t.detach() for k, t in model.state_dict().items() if k not in aliases}
    tensors = dequantize_state_dict(state, entry)
    with torch.device("meta"):
        plain = build_model(model.config)
    for alias, source in plain.tied_weights().items():
        tensors[alias] = tensors[source]
    plain.load_state_dict(tensors, assign=True)
    plain.tie_weights()
    return plain
