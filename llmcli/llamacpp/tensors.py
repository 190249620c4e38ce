"""Our weights as llama.cpp's: GGUF tensor names, layouts and types.

Names: our parameter -> its transformers name (`tensor_pairs`, hf/mapping.py) -> llama.cpp's, through
the gguf package's table of transformers names (the one llama.cpp's own converter reads).
Layouts: GGUF keeps a matrix as nn.Linear does, [out, in], so nothing is transposed; GPT-2's q, k, v
are stacked into one attn_qkv, and Llama's q and k rows are reordered per head from transformers'
rotate-half rope (dims i and i + d/2 turn together) to llama.cpp's (dims 2i and 2i + 1).
Types: 1-D tensors, norms and position embeddings stay float32 (as llama.cpp's converter writes
them); every other matrix gets the asked type, or float32 where its rows are not whole 32-value
blocks. A checkpoint of `llmcli quantize` needs no float round trip for the type that matches it:
int8 -> q8_0 copies the int8 values and gives each 32-value block its row's scale rounded to
float16; int4 -> q4_1 copies the 4-bit values, each block's scale is our float16 group scale and
its minimum -zero * scale rounded to float16. Any other type dequantizes first (reported in `notes`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from llmcli.config import ModelConfig
from llmcli.hf.mapping import GPT2, LLAMA, tensor_pairs
from llmcli.quantize.kernels import dequantize_int4, dequantize_int8, unpack_int4

BLOCK = 32  # values per block of q8_0, q4_0 and q4_1
FLOAT_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
TORCH_TYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
# The GGML type a quantized llmcli matrix keeps without dequantizing.
NATIVE = {"int8": "Q8_0", "int4": "Q4_1"}


@dataclass(frozen=True)
class IntMatrix:
    """A matrix of a quantized checkpoint as stored (llmcli/quantize/modules.py): every component
    holds the matrix's rows along dim 0, so stacking and reordering rows keeps it exact."""

    method: str  # "int8" or "int4"
    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    group_size: int | None

    @property
    def cols(self) -> int:
        return self.q.shape[1] * (2 if self.method == "int4" else 1)

    def take(self, rows: torch.Tensor) -> IntMatrix:
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return IntMatrix(self.method, self.q[rows], self.scale[rows], pick(self.zero), self.group_size)

    @staticmethod
    def stack(parts: list[IntMatrix]) -> IntMatrix:
        zero = None if parts[0].zero is None else torch.cat([p.zero for p in parts])
        return IntMatrix(parts[0].method, torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                         zero, parts[0].group_size)

    def dequantize(self) -> torch.Tensor:
        if self.method == "int8":
            return dequantize_int8(self.q, self.scale)
        return dequantize_int4(self.q, self.scale, self.zero, self.group_size)


Weight = torch.Tensor | IntMatrix


@dataclass
class GGUFTensor:
    name: str
    data: np.ndarray  # float32/float16 values, or the packed bytes of a block type (one row per row)
    qtype: str  # a gguf.GGMLQuantizationType name: F32, F16, BF16, Q8_0, Q4_0, Q4_1


@dataclass
class Plan:
    """The tensors to write, and what the user should know about how they were made."""

    tensors: list[GGUFTensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def file_type(self) -> str:
        """The type most matrix rows have (norms and kept-float tensors aside): a gguf.LlamaFileType name."""
        counts: dict[str, int] = {}
        for t in self.tensors:
            if t.data.ndim == 2 and not _kept_float(t.name):
                counts[t.qtype] = counts.get(t.qtype, 0) + t.data.shape[0]
        main = max(counts, key=counts.get, default="F32")
        return {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}.get(main, f"MOSTLY_{main}")


def weights_of(state: dict[str, torch.Tensor], quantization: dict | None) -> dict[str, Weight]:
    """A model's state dict with each quantized matrix (`X` beside `X_scale`) as one IntMatrix."""
    out: dict[str, Weight] = {}
    for name, tensor in state.items():
        if name.endswith(("_scale", "_zero")) and name.rpartition("_")[0] in state:
            continue
        if name + "_scale" in state and quantization is not None:
            out[name] = IntMatrix(quantization["method"], tensor, state[name + "_scale"], state.get(name + "_zero"),
                                  quantization["group_size"])
        else:
            out[name] = tensor.detach()
    return out


def gguf_names(config: ModelConfig, family: str) -> Callable[[str], str]:
    """transformers tensor name -> llama.cpp's."""
    import gguf

    arch = {GPT2: gguf.MODEL_ARCH.GPT2, LLAMA: gguf.MODEL_ARCH.LLAMA}[family]
    table = gguf.get_tensor_name_map(arch, config.n_layer)

    def name(hf: str) -> str:
        found = table.get_name(hf, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ValueError(f"gguf has no llama.cpp name for {hf}")
        return found

    return name


def rope_rows(heads: int, head_dim: int) -> torch.Tensor:
    """The row order taking a q/k projection from rotate-half rope pairs to llama.cpp's adjacent ones:
    new row h*d + 2j + t is old row h*d + t*d/2 + j."""
    return torch.arange(heads * head_dim).reshape(heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)


def row_order(config: ModelConfig, family: str, gguf_name: str) -> torch.Tensor | None:
    """How the rows of tensor `gguf_name` are reordered (Llama's q and k), or None."""
    if family != LLAMA:
        return None
    if gguf_name.endswith("attn_q.weight"):
        return rope_rows(config.n_head, config.head_dim)
    if gguf_name.endswith("attn_k.weight"):
        return rope_rows(config.kv_heads, config.head_dim)
    return None


def plan_tensors(weights: dict[str, Weight], config: ModelConfig, family: str, want: str) -> Plan:
    """The GGUF tensors of a model (`weights_of` its state dict) with matrices of type `want`:
    "auto" (as stored: a float dtype, or q8_0 / q4_1 for int8 / int4), float32, float16, bfloat16,
    q8_0, q4_0 or q4_1."""
    plan, name_of = Plan(), gguf_names(config, family)
    converted: dict[str, int] = {}
    for ours, hf, _ in tensor_pairs(config, family):
        name = name_of(hf)
        parts = [weights[n] for n in ours]
        value = parts[0] if len(parts) == 1 else _stack(parts)
        order = row_order(config, family, name)
        if order is not None:
            value = value.take(order) if isinstance(value, IntMatrix) else value[order]
        tensor, change = _encode(name, value, want)
        plan.tensors.append(tensor)
        if change:
            converted[change] = converted.get(change, 0) + 1
    plan.notes += [f"{count} {what}" for what, count in converted.items()]
    return plan


def _stack(parts: list[Weight]) -> Weight:
    if isinstance(parts[0], IntMatrix):
        return IntMatrix.stack(parts)  # type: ignore[arg-type]
    return torch.cat(parts)  # type: ignore[arg-type]


def _kept_float(name: str) -> bool:
    """Tensors llama.cpp keeps in float32 whatever the file's type."""
    return name.endswith((".bias", "_norm.weight")) or name.startswith("position_embd")


def _encode(name: str, value: Weight, want: str) -> tuple[GGUFTensor, str | None]:
    """The tensor in its GGUF type, and a note when it is not what `want` asked for."""
    if isinstance(value, IntMatrix):
        target = NATIVE[value.method] if want == "auto" else FLOAT_TYPES.get(want, want.upper())
        if target == NATIVE[value.method] and value.cols % BLOCK == 0:
            pack = _q8_0 if value.method == "int8" else _q4_1
            return GGUFTensor(name, pack(value), target), None
        change = f"{value.method} matrices dequantized to {target}"
        if value.cols % BLOCK and target in ("Q8_0", "Q4_0", "Q4_1"):
            target, change = "F32", f"{value.method} matrices dequantized to F32 (rows not whole {BLOCK}-value blocks)"
        return _from_float(name, value.dequantize(), target), change
    if value.dim() < 2 or _kept_float(name):
        return GGUFTensor(name, value.float().numpy(), "F32"), None
    target = TORCH_TYPES.get(value.dtype, "F32") if want == "auto" else FLOAT_TYPES.get(want, want.upper())
    if target in ("Q8_0", "Q4_0", "Q4_1") and value.shape[1] % BLOCK:
        return _from_float(name, value, "F32"), f"matrices kept F32 (rows not whole {BLOCK}-value blocks)"
    return _from_float(name, value, target), None


def _from_float(name: str, value: torch.Tensor, target: str) -> GGUFTensor:
    """Float values in `target` (F32, F16, or a block type quantized by gguf, as llama.cpp's converter does)."""
    import gguf

    data = value.detach().float().contiguous().numpy()
    if target == "F32":
        return GGUFTensor(name, data, target)
    return GGUFTensor(name, gguf.quants.quantize(data, gguf.GGMLQuantizationType[target]), target)


def _q8_0(m: IntMatrix) -> np.ndarray:
    """int8 rows -> q8_0 blocks: [float16 scale, 32 int8 values] per block, the values as stored."""
    rows, blocks = m.q.shape[0], m.cols // BLOCK
    scale = m.scale.to(torch.float16).view(torch.uint8).reshape(rows, 1, 2).expand(rows, blocks, 2)
    values = m.q.view(torch.uint8).reshape(rows, blocks, BLOCK)
    return torch.cat([scale, values], dim=2).reshape(rows, -1).numpy()


def _q4_1(m: IntMatrix) -> np.ndarray:
    """int4 rows -> q4_1 blocks: [float16 scale d, float16 minimum m, 16 bytes] per block, value = d*q + m;
    byte j holds value j in its low nibble and value j + 16 in its high one (ggml's order)."""
    rows, blocks = m.q.shape[0], m.cols // BLOCK
    q = unpack_int4(m.q).to(torch.uint8).reshape(rows, blocks, 2, BLOCK // 2)
    packed = q[:, :, 0] | (q[:, :, 1] << 4)
    group = torch.arange(blocks) * BLOCK // m.group_size  # the group each block lies in
    scale = m.scale.float()[:, group]
    zero = unpack_int4(m.zero)[:, group].float()
    d = scale.to(torch.float16).view(torch.uint8).reshape(rows, blocks, 2)
    low = (-zero * scale).to(torch.float16).view(torch.uint8).reshape(rows, blocks, 2)
    return torch.cat([d, low, packed], dim=2).reshape(rows, -1).numpy()
