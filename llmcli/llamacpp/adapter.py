"""A LoRA run as a GGUF LoRA adapter: what `llama-cli -m BASE.gguf --lora ADAPTER.gguf` applies.

llama.cpp adds, to each adapted matrix W of the base, scale * lora_b @ (lora_a @ x), the pair stored as
`<W's GGUF name>.lora_a` [r, in] and `.lora_b` [out, r]; an adapted token embedding stores its
pair the other way round (lora_a [tokens, r] is gathered by token, lora_b is [dim, r]). Its scale is
the adapter's `adapter.lora.alpha` / r, or the user's scale alone (1 by default) when alpha is 0:
we write 0 and fold alpha / r into the factors, which stays exact where a GGUF tensor holds several of
our matrices. GPT-2's attn_qkv is one tensor for q, k and v: its pair stacks their A factors and
places each B on its own rows (rank = the sum of theirs; a projection without an adapter adds
none). Llama's q and k rows are reordered as in the base (tensors.py).
"""

from __future__ import annotations

import torch

from llmcli.config import ModelConfig
from llmcli.hf.mapping import tensor_pairs
from llmcli.llamacpp.tensors import FLOAT_TYPES, GGUFTensor, Plan, gguf_names, row_order

EMBEDDING = "token_embd.weight"


def plan_adapter(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], config: ModelConfig, family: str,
                 want: str) -> Plan:
    """The GGUF tensors of an adapter given as `lora.low_rank_factors` ({module: (B, A)}), in
    float32 (`want` "auto"/"float32"), float16 or bfloat16."""
    import gguf

    qtype = "F32" if want == "auto" else FLOAT_TYPES[want]
    plan, name_of = Plan(), gguf_names(config, family)
    for ours, hf, _ in tensor_pairs(config, family):
        modules = [n.removesuffix(".weight") for n in ours if n.endswith(".weight")]
        if not any(m in factors for m in modules):
            continue
        name = name_of(hf)
        # GPT-2's fused q, k, v each have d_model rows (its n_kv_head is n_head)
        b, a = _stacked([factors.get(m) for m in modules], [config.d_model] * len(modules))
        order = row_order(config, family, name)
        if order is not None:
            b = b[order]
        lora_a, lora_b = (b, a.T) if name == EMBEDDING else (a, b)
        for suffix, value in ((".lora_a", lora_a), (".lora_b", lora_b)):
            data = value.contiguous().numpy()
            if qtype != "F32":
                data = gguf.quants.quantize(data, gguf.GGMLQuantizationType[qtype])
            plan.tensors.append(GGUFTensor(name + suffix, data, qtype))
    return plan


def _stacked(pairs: list[tuple[torch.Tensor, torch.Tensor] | None], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One (B, A) for matrices stacked by rows: A's stacked, each B on its rows and its A's columns."""
    present = [p for p in pairs if p is not None]
    if len(pairs) == 1:
        return present[0]
    a = torch.cat([p[1] for p in present])
    b = torch.zeros(sum(rows), a.shape[0])
    row = col = 0
    for pair, height in zip(pairs, rows, strict=True):
        if pair is not None:
            b[row:row + height, col:col + pair[0].shape[1]] = pair[0]
            col += pair[0].shape[1]
        row += height
    return b, a
