"""A decoder-only transformer whose maths matches Hugging Face GPT-2 and Llama exactly.

One `ModelConfig` picks the variant: LayerNorm or RMSNorm, learned or rotary positions, GELU or
SwiGLU MLP, biases or not, grouped-query attention, tied or separate LM head. The `gpt2` and `llama`
presets reproduce `GPT2LMHeadModel` and `LlamaForCausalLM` to float rounding, so weights can move
between the two worlds by renaming (and, for GPT-2's Conv1D layers, transposing).

`KVCache` holds keys/values in fixed "slots" so that a generator can run a batch whose sequences
start and finish independently (continuous batching); see `Transformer.forward`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcli.config import ModelConfig, build_config
from llmcli.errors import UserError
from llmcli.io import atomic_write, atomic_write_json, read_json_object

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"

# SDPA learned to broadcast grouped kv heads itself in torch 2.5; before that we repeat them.
_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class RMSNorm(nn.Module):
    """Llama's norm: scale by the root-mean-square, computed in float32 for stability."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)  # same order of casts as HF


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


def rope_tables(config: ModelConfig, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin for every position < block_size, shape [block_size, head_dim], float32.

    HF's non-interleaved layout: frequency i drives dims i and i + head_dim/2.
    """
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    angles = torch.arange(config.block_size, dtype=torch.float32, device=device)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, 1, T, D] already in x's dtype."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Multi-head causal self-attention with optional grouped-query (fewer kv heads) and a KV cache."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        kv_dim = self.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.k_proj = nn.Linear(config.d_model, kv_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.d_model, kv_dim, bias=config.bias)
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rope=None, cache_k=None, cache_v=None, slots=None, positions=None, mask=None,
                kv_rows=None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache_k is not None:
            # Write this step's keys/values at each row's own positions, then read the row's
            # whole history (up to the mask's width) back; `mask` hides what lies in the future.
            rows = slots[:, None]
            cache_k[rows, :, positions] = k.transpose(1, 2).to(cache_k.dtype)
            cache_v[rows, :, positions] = v.transpose(1, 2).to(cache_v.dtype)
            width = mask.shape[-1]
            if isinstance(kv_rows, slice):  # consecutive slots: a view, nothing copied
                k, v = cache_k[kv_rows, :, :width], cache_v[kv_rows, :, :width]
            else:  # gather only the `width` positions that can be attended
                k = cache_k[:, :, :width].index_select(0, kv_rows)
                v = cache_v[:, :, :width].index_select(0, kv_rows)
            k, v = k.to(q.dtype), v.to(q.dtype)
        dropout = self.dropout if self.training else 0.0
        gqa = self.n_kv_head != self.n_head
        # SDPA's enable_gqa only reaches the flash kernel, which takes no mask; with a mask,
        # repeating the kv heads ourselves lets the memory-efficient kernel run instead.
        native_gqa = gqa and _SDPA_HAS_GQA and mask is None
        if gqa and not native_gqa:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        extra = {"enable_gqa": True} if native_gqa else {}
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                           is_causal=mask is None, **extra)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.out_proj(y))


class MLP(nn.Module):
    """GPT-2: down(gelu_tanh(up(x))). Llama: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.swiglu = config.act == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(config.d_model, config.ff_dim, bias=config.bias)
        self.up_proj = nn.Linear(config.d_model, config.ff_dim, bias=config.bias)
        self.down_proj = nn.Linear(config.ff_dim, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            hidden = F.gelu(self.up_proj(x), approximate="tanh")  # HF's "gelu_new"
        return self.dropout(self.down_proj(hidden))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache_k=None, cache_v=None, slots=None, positions=None, mask=None,
                kv_rows=None):
        x = x + self.attn(self.attn_norm(x), rope, cache_k, cache_v, slots, positions, mask, kv_rows)
        return x + self.mlp(self.mlp_norm(x))


class KVCache:
    """Preallocated keys/values, one row ("slot") per sequence in flight.

    Per layer, `k[layer]` and `v[layer]` have shape [max_slots, n_kv_head, max_len, head_dim]. A
    slot holds one sequence's keys at their absolute positions; a sequence that finishes simply
    gives its slot to the next one, which overwrites it from position 0 (stale entries further
    along are never attended, because attention only looks at key positions <= query position).
    """

    def __init__(self, config: ModelConfig, max_slots: int, max_len: int | None = None, *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_slots = max_slots
        self.max_len = max_len or config.block_size
        shape = (max_slots, config.kv_heads, self.max_len, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]


class Transformer(nn.Module):
    """Token embedding (+ learned positions) → n_layer blocks → final norm → LM head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        _check_config(config)
        self.config = config
        self.tok_embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = nn.Embedding(config.block_size, config.d_model) if config.pos == "learned" else None
        self.embed_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_embed.weight
        # Rope tables are a plain attribute, not a buffer, so model.to(bfloat16) cannot coarsen
        # them; they are (re)built in float32 on whichever device the input arrives.
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)  # keeps the residual stream's variance flat
        for block in self.blocks:
            nn.init.normal_(block.attn.out_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.down_proj.weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, *, cache: KVCache | None = None, slots: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits [B, T, vocab] for token ids `idx` [B, T].

        Without `cache`: a plain causal forward over the T tokens (positions default to 0..T-1).
        With `cache`: batch row b uses cache slot `slots[b]`, its tokens sit at absolute positions
        `positions[b]`; their keys/values are written into the slot first, then each query attends
        to the slot's keys at positions <= its own. Rows may be at different lengths, and a
        right-padded prefill is fine: padding writes beyond a row's end, which is never read before
        that row overwrites it. Use under torch.no_grad()/inference_mode.
        """
        B, T = idx.shape
        limit = self.config.block_size
        mask, kv_rows = None, None
        if cache is not None:
            if slots is None or positions is None:
                raise ValueError("forward with a cache needs both slots [B] and positions [B, T]")
            if slots.shape != (B,) or positions.shape != (B, T):
                raise ValueError(f"slots must be [{B}] and positions [{B}, {T}]; got "
                                 f"{tuple(slots.shape)} and {tuple(positions.shape)}")
            limit = min(limit, cache.max_len)
            increasing = (slots[1:] > slots[:-1]).all() if B > 1 else torch.tensor(True)
            lo, hi, slot_lo, slot_hi, increasing = torch.stack(
                [positions.min(), positions.max(), slots.min(), slots.max(), increasing.to(slots.device)]
            ).tolist()
            if slot_lo < 0 or slot_hi >= cache.max_slots:
                raise ValueError(f"slots must be in [0, {cache.max_slots}); got {slot_lo}..{slot_hi}")
            # Rows reading slots lo, lo+1, ... can see the cache as a slice instead of a gather.
            kv_rows = slice(slot_lo, slot_hi + 1) if increasing and slot_hi - slot_lo + 1 == B else slots
            # key_pos <= query_pos, over keys 0..hi only: nothing later can be attended anyway.
            key_positions = torch.arange(hi + 1, device=idx.device)
            mask = (key_positions <= positions[:, :, None])[:, None]  # [B, 1, T, hi+1]
        elif positions is None:
            lo, hi = 0, T - 1
            positions = torch.arange(T, device=idx.device).expand(B, T)
        else:
            lo, hi = torch.stack([positions.min(), positions.max()]).tolist()
        if lo < 0 or hi >= limit:
            raise ValueError(f"positions must be in [0, {limit}) (block_size={self.config.block_size}"
                             f"{f', cache max_len={cache.max_len}' if cache is not None else ''}); "
                             f"got {lo}..{hi}")

        x = self.tok_embed(idx)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        else:
            if self._rope is None or self._rope[0].device != idx.device:
                self._rope = rope_tables(self.config, idx.device)
            cos, sin = self._rope
            rope = (cos[positions][:, None].to(x.dtype), sin[positions][:, None].to(x.dtype))
        x = self.embed_dropout(x)
        for layer, block in enumerate(self.blocks):
            cache_k = cache.k[layer] if cache is not None else None
            cache_v = cache.v[layer] if cache is not None else None
            x = block(x, rope, cache_k, cache_v, slots, positions, mask, kv_rows)
        return self.lm_head(self.final_norm(x)).float()

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, tied weights once; `non_embedding` leaves out token and position tables."""
        total = sum(p.numel() for p in self.parameters())  # parameters() already dedups ties
        if non_embedding:
            total -= self.tok_embed.weight.numel()
            if self.pos_embed is not None:
                total -= self.pos_embed.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 * matmul params + 12 * n_layer * d_model * seq_len.

        The matmul params are every Linear weight (all projections and the LM head, tied or not);
        the second term is the attention score/value products (PaLM, appendix B). 6 = 2 for the
        forward pass + 4 for the backward; a forward-only pass costs one third of this.
        """
        seq_len = seq_len or self.config.block_size
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * matmul + 12 * self.config.n_layer * self.config.d_model * seq_len

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups: decay matrices and embeddings (>= 2-D), not biases or norm weights."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]


def _check_config(config: ModelConfig) -> None:
    """The cross-field checks build_config does, for configs constructed directly."""
    if not config.vocab_size:
        raise UserError("model.vocab_size is not set (it normally comes from the tokenizer)")
    if config.d_model % config.n_head:
        raise UserError(f"model.n_head={config.n_head} must divide model.d_model={config.d_model}")
    if config.n_head % config.kv_heads:
        raise UserError(f"model.n_kv_head={config.kv_heads} must divide model.n_head={config.n_head}")
    if config.pos == "rope" and config.head_dim % 2:
        raise UserError(f"rope needs an even head size; d_model/n_head = {config.head_dim}")


# --------------------------------------------------------------------------------------------
# Checkpoints: model.safetensors (weights, tied embedding stored once) + model.json (config)


def save_model(model: Transformer, directory: str | Path) -> None:
    """Write `model.safetensors` and `model.json` into `directory`, each atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_embeddings:
        del tensors["lm_head.weight"]  # the same tensor as tok_embed.weight
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_FILE, dataclasses.asdict(model.config))


def model_config_from_json(path: str | Path) -> ModelConfig:
    """Read and validate a model.json; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model config not found: {path}")
    raw = read_json_object(path, what="a JSON object of model settings")
    raw.pop("quantization", None)  # not a model setting: load_model reads it (llmcli/quantize.py)
    return build_config({"model": raw}, {f"model.{key}": str(path) for key in raw}).model


def load_model(directory: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> Transformer:
    """Rebuild a Transformer saved by `save_model`, optionally casting floating weights to `dtype`.

    A checkpoint written by `llmcli quantize` (model.json has a `quantization` entry) comes back
    with its layers swapped for llmcli.quantize's modules; its integer weights and their scales
    keep their stored dtypes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from llmcli import quantize

    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"model directory not found: {directory}")
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise UserError(f"model weights not found: {weights_path}")
    config = model_config_from_json(directory / CONFIG_FILE)
    quantization = quantize.read_quantization(directory / CONFIG_FILE)
    try:
        tensors = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{weights_path}: cannot read weights ({exc})") from None

    with torch.device("meta"):  # no memory, no random init: every weight comes from the file
        model = Transformer(config)
        if quantization is not None:
            quantize.swap_in_quantized_modules(model, quantization, dtype)
    expected = model.state_dict()
    keep_dtype = quantize.quantized_tensor_names(model)
    if config.tie_embeddings and "tok_embed.weight" in tensors and "lm_head.weight" in expected:
        tensors["lm_head.weight"] = tensors["tok_embed.weight"]
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(f"{weights_path} does not match {CONFIG_FILE}: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise UserError(f"{weights_path}: {name} has shape {tuple(tensor.shape)}, "
                            f"{CONFIG_FILE} implies {tuple(expected[name].shape)}")
        if name in keep_dtype and tensor.dtype != expected[name].dtype:
            raise UserError(f"{weights_path}: {name} is {tensor.dtype}; this quantized checkpoint "
                            f"needs {expected[name].dtype}")
        if dtype is not None and tensor.is_floating_point() and name not in keep_dtype:
            tensors[name] = tensor.to(dtype)
    model.load_state_dict(tensors, assign=True)
    if config.tie_embeddings and isinstance(model.lm_head, nn.Linear):
        model.lm_head.weight = model.tok_embed.weight  # assign=True gave them separate Parameters
    return model


# --------------------------------------------------------------------------------------------
# CPU decoding: large float32 Linear weights prepacked for oneDNN
#
# Decoding multiplies a few rows (one per running sequence) by every weight matrix. On the CPUs
# we measured, torch's default sgemm reads a large weight well below memory bandwidth at that
# shape (GPT-2-124M: 14 GB/s at one row, 4-7 GB/s at eight, with 26 GB/s available), while
# oneDNN's kernel on a weight reordered once into its blocked layout runs the same product
# 1.4x (one row) to 2.5-3.5x (eight rows) faster (`benchmarks/bench_decode.py`). Small weights
# live in the CPU caches, where oneDNN's per-call overhead loses, so they keep nn.Linear: 256K
# elements packs GPT-2-124M's 768x768 layers too (one-row decoding 1.19x faster than from 1M up)
# and nothing of a 4x128 model.

PACK_MIN_WEIGHTS = 1 << 18


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
