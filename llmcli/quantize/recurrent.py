"""Quantized recurrent layers: a drop-in for nn.LSTM / nn.GRU / nn.RNN with int8 or int4 weight matrices.

Stored format (see modules.py for the Linear one, which this follows): every weight matrix
`weight_ih_l{k}` / `weight_hh_l{k}` of the layer named `name` is stored as `name.weight_ih_l0` (int8
[rows, cols], or int4 packed two per byte) with `name.weight_ih_l0_scale` (and, for int4,
`name.weight_ih_l0_zero`), exactly as a Linear weight; the biases stay float under their own names.

Runtime, chosen by measurement (docs/benchmarks.md): int8 LSTM and GRU layers with biases run
PyTorch's dynamic int8 kernels (`torch.quantized_lstm` / `quantized_gru`, fbgemm) on our exact
integer weights and scales. Those quantize activations over a whole call, so each row of a batch
runs alone: a sequence's tokens never depend on what else is in the batch. Other layers (tanh RNNs,
no biases, int4, no fbgemm, other devices) run torch's float kernel on weights dequantized once.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from llmcli.quantize.kernels import (
    dequantize_int4,
    dequantize_int8,
    fbgemm_available,
    fbgemm_pack,
    quantize_int4,
    quantize_int8,
)

FLOAT_CLASSES = {"LSTM": nn.LSTM, "GRU": nn.GRU, "RNN_TANH": nn.RNN, "RNN_RELU": nn.RNN}
DYNAMIC_MODES = ("LSTM", "GRU")  # the recurrent kernels torch has in dynamic int8


def matrix_names(rnn: nn.RNNBase) -> list[str]:
    """The weight matrices of a recurrent layer stack: weight_ih_l0, weight_hh_l0, (weight_ih_l0_reverse, ...)"""
    return [name for name in rnn._flat_weights_names if name.startswith("weight")]


class QuantizedRecurrent(nn.Module):
    """nn.LSTM / nn.GRU / nn.RNN (batch_first, one direction or both) with quantized weight matrices.

    Built from a float layer (or an empty one on the meta device, to load into). `forward(input,
    hx)` takes and returns what the float layer does, PackedSequence included.
    """

    def __init__(self, rnn: nn.RNNBase, method: str, group_size: int | None, *, dynamic_activations: bool = False,
                 quantize_weights: bool = True):
        super().__init__()
        if not rnn.batch_first or rnn.proj_size:
            raise ValueError("only batch-first recurrent layers without projections are supported")
        self.mode, self.method, self.group_size = rnn.mode, method, group_size
        self.options = dict(input_size=rnn.input_size, hidden_size=rnn.hidden_size, num_layers=rnn.num_layers,
                            bias=rnn.bias, batch_first=True, dropout=rnn.dropout, bidirectional=rnn.bidirectional)
        if self.mode.startswith("RNN"):
            self.options["nonlinearity"] = self.mode[4:].lower()
        self.matrices = matrix_names(rnn)
        device = rnn.weight_ih_l0.device
        for name in self.matrices:
            rows, cols = getattr(rnn, name).shape
            self._register_matrix(name, rows, cols, device)
            if quantize_weights:
                self._set_matrix(name, getattr(rnn, name))
        for name in rnn._flat_weights_names:
            if name.startswith("bias"):
                self.register_parameter(name, nn.Parameter(getattr(rnn, name).detach().float().clone()))
        self.dynamic_activations = (dynamic_activations and method == "int8" and rnn.bias
                                    and self.mode in DYNAMIC_MODES and fbgemm_available())
        self._runtime: dict[str, Any] = {}

    def _register_matrix(self, name: str, rows: int, cols: int, device: torch.device) -> None:
        if self.method == "int8":
            self.register_buffer(name, torch.zeros(rows, cols, dtype=torch.int8, device=device))
            self.register_buffer(f"{name}_scale", torch.ones(rows, dtype=torch.float32, device=device))
        else:
            groups = cols // self.group_size
            self.register_buffer(name, torch.zeros(rows, cols // 2, dtype=torch.uint8, device=device))
            self.register_buffer(f"{name}_scale", torch.ones(rows, groups, dtype=torch.float16, device=device))
            self.register_buffer(f"{name}_zero", torch.zeros(rows, (groups + 1) // 2, dtype=torch.uint8,
                                                             device=device))

    def _set_matrix(self, name: str, w: torch.Tensor) -> None:
        if self.method == "int8":
            q, scale = quantize_int8(w)
            setattr(self, name, q)
            setattr(self, f"{name}_scale", scale)
        else:
            q, scale, zero = quantize_int4(w, self.group_size)
            setattr(self, name, q)
            setattr(self, f"{name}_scale", scale)
            setattr(self, f"{name}_zero", zero)

    def quantized_names(self) -> list[str]:
        """State names whose dtype is part of the format (integer matrices and their scales)."""
        suffixes = ("", "_scale") if self.method == "int8" else ("", "_scale", "_zero")
        return [name + suffix for name in self.matrices for suffix in suffixes]

    def dequantize(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q, scale = self._buffers[name], self._buffers[f"{name}_scale"]
        if self.method == "int8":
            return dequantize_int8(q, scale, dtype)
        return dequantize_int4(q, scale, self._buffers[f"{name}_zero"], self.group_size, dtype)

    def float_state(self) -> dict[str, torch.Tensor]:
        """The float layer's state dict (matrices dequantized)."""
        state = {name: self.dequantize(name) for name in self.matrices}
        return {**state, **{name: p.detach().float() for name, p in self._parameters.items()}}

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.method == "int4" else ""
        kernel = ", dynamic int8 activations" if self.dynamic_activations else ""
        return f"{self.mode}, {self.options['num_layers']} layers, {self.method}{group}{kernel}"

    def __getstate__(self) -> dict[str, Any]:  # deepcopy / pickle without the runtime caches
        state = self.__dict__.copy()
        state["_runtime"] = {}
        return state

    # -- runtime -----------------------------------------------------------------------------

    def _cached(self, name: str, build) -> Any:
        """A runtime copy built from the current tensors (rebuilt after a load replaced them)."""
        tensors = [self._buffers[n] for n in self.matrices] + list(self._parameters.values())
        entry = self._runtime.get(name)
        if entry is None or any(ref() is not t for ref, t in zip(entry[0], tensors, strict=True)):
            with torch.inference_mode(False), torch.no_grad():
                entry = ([weakref.ref(t) for t in tensors], build())
            self._runtime[name] = entry
        return entry[1]

    def _float_layer(self) -> nn.RNNBase:
        device = self._buffers[self.matrices[0]].device
        layer = FLOAT_CLASSES[self.mode](**self.options, device=device).eval()
        layer.load_state_dict(self.float_state())
        layer.requires_grad_(False)
        return layer

    def _cell_params(self) -> list[Any]:
        """fbgemm's packed cell parameters per layer, from our exact int8 matrices and scales."""
        params = []
        suffixes = ("", "_reverse") if self.options["bidirectional"] else ("",)
        for layer in range(self.options["num_layers"]):
            for suffix in suffixes:  # torch's order: layer by layer, forward then reverse
                packed, biases = [], []
                for kind in ("ih", "hh"):
                    name = f"weight_{kind}_l{layer}{suffix}"
                    bias = self._parameters[f"bias_{kind}_l{layer}{suffix}"].detach()
                    packed.append(fbgemm_pack(self._buffers[name], self._buffers[f"{name}_scale"], bias))
                    biases.append(bias)
                params.append(torch.ops.quantized.make_quantized_cell_params_dynamic(*packed, *biases, True))
        return params

    def forward(self, input: torch.Tensor | PackedSequence, hx: Any = None) -> tuple[Any, Any]:
        if not self.dynamic_activations or not self._buffers[self.matrices[0]].is_cpu:
            return self._float_forward(input, hx)
        packed = isinstance(input, PackedSequence)
        x, lengths = pad_packed_sequence(input, batch_first=True) if packed else (input, None)
        B, T = x.shape[:2]
        lengths = lengths.tolist() if lengths is not None else [T] * B
        states = hx if isinstance(hx, tuple) else (hx,) if hx is not None else None
        outs, finals = [], []
        for b, n in enumerate(lengths):  # each row alone: see the module docstring
            row_states = None if states is None else tuple(s[:, b:b + 1].contiguous() for s in states)
            out, final = self._dynamic(x[b:b + 1, :n].contiguous(), row_states)
            outs.append(nn.functional.pad(out, (0, 0, 0, T - n)))
            finals.append(final)
        out = torch.cat(outs)
        final = tuple(torch.cat(parts, dim=1) for parts in zip(*finals, strict=True))
        if packed:
            out = pack_padded_sequence(out, torch.tensor(lengths), batch_first=True, enforce_sorted=False)
        return out, final if self.mode == "LSTM" else final[0]

    def _float_forward(self, input: torch.Tensor | PackedSequence, hx: Any) -> tuple[Any, Any]:
        """torch's float kernel on the dequantized matrices (in float32, returned in the input's dtype)."""
        dtype = input.data.dtype
        if dtype != torch.float32:
            input = input.to(torch.float32)
            hx = tuple(h.float() for h in hx) if isinstance(hx, tuple) else hx.float() if hx is not None else None
        out, final = self._cached("float", self._float_layer)(input, hx)
        if dtype != torch.float32:
            out = out.to(dtype)
            final = tuple(h.to(dtype) for h in final) if isinstance(final, tuple) else final.to(dtype)
        return out, final

    def _dynamic(self, x: torch.Tensor, states: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, tuple]:
        """One row [1, T, in] through fbgemm's dynamic int8 kernel: (output, (h,) or (h, c))."""
        params = self._cached("fbgemm", self._cell_params)
        layers, hidden, both = self.options["num_layers"], self.options["hidden_size"], self.options["bidirectional"]
        if states is None:
            zeros = x.new_zeros(layers * (2 if both else 1), 1, hidden)
            states = (zeros, zeros) if self.mode == "LSTM" else (zeros,)
        x32 = x.float()
        if self.mode == "LSTM":
            out, h, c = torch.quantized_lstm(x32, [s.float() for s in states], params, True, layers, 0.0, False,
                                             both, True, dtype=torch.qint8, use_dynamic=True)
            return out.to(x.dtype), (h.to(x.dtype), c.to(x.dtype))
        out, h = torch.quantized_gru(x32, states[0].float(), params, True, layers, 0.0, False, both, True)
        return out.to(x.dtype), (h.to(x.dtype),)


def quantize_recurrent(rnn: nn.RNNBase, method: str, group_size: int | None, *,
                       dynamic_activations: bool = False) -> QuantizedRecurrent:
    return QuantizedRecurrent(rnn, method, group_size, dynamic_activations=dynamic_activations)


def empty_recurrent(rnn: nn.RNNBase, method: str, group_size: int | None, *,
                    dynamic_activations: bool = False) -> QuantizedRecurrent:
    """A QuantizedRecurrent shaped like `rnn` to load a checkpoint into (no weights computed)."""
    return QuantizedRecurrent(rnn, method, group_size, dynamic_activations=dynamic_activations,
                              quantize_weights=False)
