"""A decoder-only transformer whose maths matches Hugging Face GPT-2 and Llama exactly.

One `ModelConfig` picks the variant: LayerNorm or RMSNorm, learned or rotary positions, GELU or
SwiGLU MLP, biases or not, grouped-query attention, tied or separate LM head. The `gpt2` and `llama`
presets reproduce `GPT2LMHeadModel` and `LlamaForCausalLM` to float rounding, so weights can move
between the two worlds by renaming (and, for GPT-2's Conv1D layers, transposing).

For generation, the decoder's keys/values stay in a `KVCache` (one slot per sequence in flight) or a
`PagedKVCache` (a pool of blocks shared out by block tables), so that a batch's sequences can start
and finish independently (continuous batching; models/kv_cache.py).

Attention runs through SDPA's fused kernels, which keep no attention matrix. When the weights are
asked for (`attention_maps`, for `llmcli attention`), the same forward computes each layer's
attention step by step instead (`explicit_attention`: scores, causal mask, softmax, weighted sum),
keeping the weights; everything around it is the same code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.models.base import (
    AttentionMap,
    BucketRows,
    LanguageModel,
    LayerStack,
    PruneGroup,
    Rows,
    UnitSlice,
    kept_of,
    mean_pool,
    stack_layers,
)
from llmcli.models.kv_cache import CacheStep, KVCache, PagedKVCache, kv_bytes_per_token

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


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       dropout_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """What SDPA computes, step by step, keeping the weights: softmax(q k^T / sqrt(D), masked) v.

    q [B, H, T, D], k/v [B, H, S, D] (kv heads already repeated); `mask` [B, 1, T, S] is True
    where a query may attend, None for plain causal attention (T == S). The weights come back
    [B, H, T, S], each row summing to 1.
    """
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is None:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    weights = torch.softmax(scores.masked_fill(~mask, float("-inf")).float(), dim=-1).to(q.dtype)
    return F.dropout(weights, dropout_p) @ v, weights


class Attention(nn.Module):
    """Multi-head causal self-attention with optional grouped-query (fewer kv heads) and a KV cache;
    a pruned layer has fewer heads of the same size (its q/out projections narrower than d_model)."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = config.heads_in(layer), config.kv_heads_in(layer), config.head_dim
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        self.q_proj = nn.Linear(config.d_model, q_dim, bias=config.bias)
        self.k_proj = nn.Linear(config.d_model, kv_dim, bias=config.bias)
        self.v_proj = nn.Linear(config.d_model, kv_dim, bias=config.bias)
        self.out_proj = nn.Linear(q_dim, config.d_model, bias=config.bias)
        self.qk_norm = config.qk_norm
        # With a value-embedding table (model.value_embeds): v = gate[0] * v + gate[1] * table[token],
        # the two gates learned, starting at 1/2 each (modded-nanogpt's lambdas).
        self.value_gate = nn.Parameter(torch.full((2,), 0.5)) if config.value_embed_of(layer) is not None else None
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: CacheStep | None, record: list[torch.Tensor] | None = None,
                value_embed: torch.Tensor | None = None) -> torch.Tensor:
        """With `record`, attention runs step by step and its weights [B, H, T, S] are appended.
        `value_embed` [B, T, kv width]: this layer's value-embedding rows of the tokens, mixed into
        the values before they are cached, so a cached value already holds its token's row."""
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x)
        if value_embed is not None:
            v = self.value_gate[0] * v + self.value_gate[1] * value_embed.to(v.dtype)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:  # each head's query and key scaled to unit RMS (no gain)
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        attend = getattr(cache, "attend", None) if record is None else None
        if attend is not None:  # the cache step reads its keys/values itself (a paged decode step)
            y = attend(self.layer, q, k, v).transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
            return self.resid_dropout(self.out_proj(y))
        mask = None
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
            k, v, mask = k.to(q.dtype), v.to(q.dtype), cache.mask
        gqa = self.n_kv_head != self.n_head
        # SDPA's enable_gqa only reaches the flash kernel, which takes no mask; with a mask,
        # repeating the kv heads ourselves lets the memory-efficient kernel run instead.
        native_gqa = gqa and _SDPA_HAS_GQA and mask is None and record is None
        if gqa and not native_gqa:
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        dropout_p = self.dropout if self.training else 0.0
        if record is not None:
            y, weights = explicit_attention(q, k, v, mask, dropout_p)
            record.append(weights)
        else:
            extra = {"enable_gqa": True} if native_gqa else {}
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                               is_causal=mask is None, **extra)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.resid_dropout(self.out_proj(y))


class MLP(nn.Module):
    """GPT-2: down(gelu_tanh(up(x))). Llama: down(silu(gate(x)) * up(x)). Or down(relu(up(x))), or
    down(relu(up(x))^2) (relu2, modded-nanogpt's)."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.swiglu, self.relu, self.relu2 = config.act == "swiglu", config.act == "relu", config.act == "relu2"
        ff = config.ff_in(layer)
        if self.swiglu:
            self.gate_proj = nn.Linear(config.d_model, ff, bias=config.bias)
        self.up_proj = nn.Linear(config.d_model, ff, bias=config.bias)
        self.down_proj = nn.Linear(ff, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            hidden = F.silu(self.gate_proj(x)) * self.up_proj(x)
        elif self.relu:
            hidden = F.relu(self.up_proj(x))
        elif self.relu2:
            hidden = F.relu(self.up_proj(x)).square()
        else:
            hidden = F.gelu(self.up_proj(x), approximate="tanh")  # HF's "gelu_new"
        return self.dropout(self.down_proj(hidden))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config, layer)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: CacheStep | None, record: list[torch.Tensor] | None = None,
                value_embed: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, cache, record, value_embed)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(LanguageModel):
    """Token embedding (+ learned positions) → n_layer blocks → final norm → LM head.

    With `model.value_embeds: k`, k more token-embedding tables (`value_embeds.j`, vocab x the kv
    width) feed the attention values of the first k and the last k layers (table j: layer j and layer
    n_layer - k + j; `ModelConfig.value_embed_of`); the layers between have none. A model that lost
    layers (`llmcli prune --layers`) lists each kept layer's table (`layer_value_embeds`).
    """

    exports_to_hf = True  # as GPT2LMHeadModel or LlamaForCausalLM (llmcli/hf/mapping.py)
    gguf_refusal = None  # llama.cpp's gpt2 and llama architectures (llmcli/llamacpp/)
    rewinds_decode_state = True  # a KV cache: attention never reads past a query's position
    pages_decode_state = True  # PagedKVCache
    compiles_decode = True  # BucketRows
    pooling = "mean of the last hidden states (after the final norm) over the input's tokens"

    def __init__(self, config: ModelConfig):
        super().__init__()
        _check_config(config)
        self.config = config
        self.tok_embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = nn.Embedding(config.block_size, config.d_model) if config.pos == "learned" else None
        self.embed_dropout = nn.Dropout(config.dropout)
        # A shared table has its layers' kv width; pruning keeps the heads of a table's layers alike.
        self.value_embeds = nn.ModuleList(nn.Embedding(config.vocab_size, _value_embed_width(config, j))
                                          for j in range(config.value_embeds))
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.tie_weights()
        # Rope tables are a plain attribute, not a buffer, so model.to(bfloat16) cannot coarsen
        # them; they are (re)built in float32 on whichever device the input arrives. Built here
        # already, so a compiled forward (train.compile) sees them from its first call and is not
        # compiled a second time once they exist.
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = \
            rope_tables(config, self.tok_embed.weight.device) if self.pos_embed is None else None
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

    def tied_weights(self) -> dict[str, str]:
        return {"lm_head.weight": "tok_embed.weight"} if self.config.tie_embeddings else {}

    @property
    def shard_units(self) -> tuple[type[nn.Module], ...]:
        return (Block,)

    def prune_groups(self) -> list[PruneGroup]:
        """Per layer: its kv groups ("heads": one kv head and the query heads sharing it; a head
        alone without GQA) and its MLP hidden units ("mlp"). Two layers that share a value-embedding
        table are one "heads" group: kv group h goes from both, with the table's columns of head h."""
        c, groups = self.config, []
        group_dim = c.n_head // c.kv_heads * c.head_dim
        for g, layers in enumerate(self._head_layers()):
            table = c.value_embed_of(layers[0])
            heads = []
            for i in layers:
                a = f"blocks.{i}.attn"
                heads += [UnitSlice(f"{a}.q_proj.weight", 0, size=group_dim),
                          UnitSlice(f"{a}.out_proj.weight", 1, size=group_dim)]
                heads += [UnitSlice(f"{a}.{p}_proj.weight", 0, size=c.head_dim) for p in "kv"]
                if c.bias:
                    heads += [UnitSlice(f"{a}.q_proj.bias", 0, size=group_dim)]
                    heads += [UnitSlice(f"{a}.{p}_proj.bias", 0, size=c.head_dim) for p in "kv"]
            if table is not None:
                heads.append(UnitSlice(f"value_embeds.{table}.weight", 1, size=c.head_dim))
            label = f"layers {' and '.join(map(str, layers))}" if len(layers) > 1 else ""
            groups.append(PruneGroup("heads", g, self.blocks[layers[0]].attn.n_kv_head, tuple(heads), label=label))
        for i, block in enumerate(self.blocks):
            m = f"blocks.{i}.mlp"
            ups = ("gate_proj", "up_proj") if c.act == "swiglu" else ("up_proj",)
            mlp = [UnitSlice(f"{m}.{p}.weight", 0) for p in ups] + [UnitSlice(f"{m}.down_proj.weight", 1)]
            mlp += [UnitSlice(f"{m}.{p}.bias", 0) for p in ups] if c.bias else []
            groups.append(PruneGroup("mlp", i, block.mlp.down_proj.in_features, tuple(mlp)))
        return groups

    def _head_layers(self) -> list[tuple[int, ...]]:
        """The layers of each "heads" prune group, by first layer: a layer alone, or the layers that
        share a value-embedding table."""
        c = self.config
        tables = [c.value_embed_layers(j) for j in range(c.value_embeds)]
        alone = [[i] for i in range(c.n_layer) if c.value_embed_of(i) is None]
        return sorted(tuple(layers) for layers in tables + alone)

    def pruned_config(self, kept: dict[str, list[int]]) -> ModelConfig:
        """Per-layer sizes: `layer_heads` (kv groups kept times the group size) and `layer_ff`."""
        c, heads = self.config, self.config.layer_heads
        if "heads" in kept:
            heads = [0] * c.n_layer
            for layers, count in zip(self._head_layers(), kept["heads"], strict=True):
                for i in layers:
                    heads[i] = count * (c.n_head // c.kv_heads)
        return dataclasses.replace(c, layer_heads=heads, layer_ff=kept.get("mlp", c.layer_ff))

    def layer_stacks(self) -> list[LayerStack]:
        return [LayerStack("layers", self.config.n_layer, r"blocks\.(\d+)\..*")]

    def layers_config(self, keep: dict[str, Sequence[int]]) -> ModelConfig:
        """n_layer and the per-layer sizes of the blocks kept; the value-embedding tables some kept
        layer reads, renumbered in order, with each kept layer's table (null when the rule still holds)."""
        c, kept = self.config, list(keep["layers"])
        used = self._tables_kept(kept)
        tables = [-1 if c.value_embed_of(i) is None else used.index(c.value_embed_of(i)) for i in kept]
        shallower = dataclasses.replace(c, n_layer=len(kept), layer_heads=kept_of(c.layer_heads, kept),
                                        layer_ff=kept_of(c.layer_ff, kept), value_embeds=len(used),
                                        layer_value_embeds=None)
        ruled = [-1 if shallower.value_embed_of(i) is None else shallower.value_embed_of(i) for i in range(len(kept))]
        if 2 * len(used) <= len(kept) and ruled == tables:
            return shallower
        return dataclasses.replace(shallower, layer_value_embeds=tables)

    def _tables_kept(self, kept: Sequence[int]) -> list[int]:
        """The value-embedding tables that some layer in `kept` reads, in order."""
        return sorted({self.config.value_embed_of(i) for i in kept} - {None})

    def layers_state(self, state: dict[str, torch.Tensor], keep: dict[str, Sequence[int]]) -> dict[str, torch.Tensor]:
        """The value-embedding tables of the kept layers, renumbered as `layers_config` does."""
        used = self._tables_kept(list(keep["layers"]))
        out = {k: v for k, v in state.items() if not k.startswith("value_embeds.")}
        out.update({f"value_embeds.{new}.weight": state[f"value_embeds.{old}.weight"] for new, old in enumerate(used)})
        return out

    def lora_targets(self) -> dict[str, list[str]]:
        """q, k, v, o (attention), gate, up, down (MLP) in every block; embed and head when the head is
        untied (a tied table is one tensor for both, which an adapter on either would split)."""
        per_block = {"q": "attn.q_proj", "k": "attn.k_proj", "v": "attn.v_proj", "o": "attn.out_proj",
                     "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
        if self.config.act != "swiglu":
            del per_block["gate"]
        out = {term: [f"blocks.{i}.{name}" for i in range(self.config.n_layer)] for term, name in per_block.items()}
        if not self.config.tie_embeddings:
            out.update(embed=["tok_embed"], head=["lm_head"])
        return out

    @classmethod
    def param_count(cls, config: ModelConfig) -> int:
        d, V, bias = config.d_model, config.vocab_size or 0, int(config.bias)
        norm = d * (2 if config.norm == "layernorm" and config.bias else 1)
        layers = 0
        for layer in range(config.n_layer):
            q, kv, ff = (config.heads_in(layer) * config.head_dim, config.kv_heads_in(layer) * config.head_dim,
                         config.ff_in(layer))
            attention = 2 * d * q + 2 * d * kv + bias * (q + d + 2 * kv)
            mlp = (3 if config.act == "swiglu" else 2) * d * ff + bias * ((2 if config.act == "swiglu" else 1) * ff + d)
            layers += attention + mlp + 2 * norm
        embeddings = V * d + (config.block_size * d if config.pos == "learned" else 0)
        # value-embedding tables (as wide as their layers' values) and two gates per layer reading one
        embeddings += sum(V * _value_embed_width(config, j) + 2 * len(config.value_embed_layers(j))
                          for j in range(config.value_embeds))
        head = 0 if config.tie_embeddings else V * d
        return embeddings + layers + norm + head

    @classmethod
    def activation_bytes(cls, config: ModelConfig, tokens: int) -> int:
        # Per layer and token: ~34 * d_model values kept for the backward pass (projections, MLP,
        # norms, dropout masks); SDPA's fused kernels keep no [T, T] attention matrix. A layer with a
        # value embedding keeps its table rows and the values before the mix: 2 * d_model more.
        value_layers = sum(config.value_embed_of(i) is not None for i in range(config.n_layer))
        return 4 * tokens * (34 * config.n_layer * config.d_model + 2 * value_layers * config.d_model
                             + 3 * (config.vocab_size or 0))

    def new_decode_state(self, max_slots: int, max_len: int | None = None, *, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu") -> KVCache:
        return KVCache(self.config, max_slots, max_len, dtype=dtype, device=device)

    def new_paged_decode_state(self, max_slots: int, num_blocks: int, block_len: int, *, dtype: torch.dtype,
                               device: torch.device | str) -> PagedKVCache:
        return PagedKVCache(self.config, max_slots, num_blocks, block_len, dtype=dtype, device=device)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return kv_bytes_per_token(self.config, dtype)

    def forward(self, idx: torch.Tensor, *, state: KVCache | None = None,
                rows: Rows | BucketRows | None = None) -> torch.Tensor:
        """Float32 logits [B, T, vocab] for token ids `idx` [B, T].

        Without `state`: a plain causal forward over the T tokens at positions 0..T-1. With a
        `KVCache` (or a `PagedKVCache`): row b uses slot `rows.slots[b]` and its tokens sit at positions
        `rows.starts[b]`, +1, ...; their keys/values are written into the slot first, then each
        query attends to the slot's keys at positions <= its own. Rows may be at different
        lengths, and a right-padded prefill is fine: padding writes beyond a row's end, which is
        never read before that row overwrites it. Use under torch.no_grad()/inference_mode.
        """
        logits = self.lm_head(self._forward(idx, state, rows, None)).float()
        if self.config.logit_softcap is not None:  # smoothly bounded to (-cap, cap)
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def embed(self, idx: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """The mean of the last hidden states (after the final norm) over each row's real tokens
        (causal attention: padding after them changes nothing before it)."""
        return mean_pool(self._forward(idx, None, None, None), lengths)

    def attention_maps(self, idx: torch.Tensor, generated: torch.Tensor | None = None) -> list[AttentionMap]:
        """Self-attention weights [n_layer, n_head, T, T] of one causal forward over `idx` [1, T]
        followed by `generated` [1, G] (T + G tokens then), as the model computes them."""
        tokens = idx if generated is None else torch.cat([idx, generated.to(idx.device)], dim=1)
        if tokens.shape[0] != 1:
            raise ValueError(f"attention maps are for one sequence; got a batch of {tokens.shape[0]}")
        record: list[torch.Tensor] = []
        with torch.no_grad():
            self._forward(tokens, None, None, record)
        segments = ("text",) if generated is None else ("text", "generated")
        weights = stack_layers(record, "self-attention")
        return [AttentionMap("self-attention", weights, segments, segments)]

    def _forward(self, idx: torch.Tensor, state: KVCache | None, rows: Rows | BucketRows | None,
                 record: list[torch.Tensor] | None) -> torch.Tensor:
        """The last hidden states [B, T, d_model], after the final norm."""
        B, T = idx.shape
        cache = None
        if state is not None:
            if isinstance(rows, BucketRows):
                if T != 1 or rows.positions.shape[0] != B:
                    raise ValueError(f"a bucket of decode rows takes one token per row; got {B} x {T} tokens")
            elif rows is None or len(rows.slots) != B:
                raise ValueError(f"forward with a decode state needs rows: {B} slots, starts and lengths")
            cache = state.bind(rows, T, idx.device)
            positions = cache.positions
        elif T > self.config.block_size:
            raise ValueError(f"positions must be in [0, {self.config.block_size}) "
                             f"(block_size={self.config.block_size}); got 0..{T - 1}")
        else:
            positions = torch.arange(T, device=idx.device).expand(B, T)

        x = self.tok_embed(idx)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        else:
            rope = self._rope_at(positions, x.dtype)
        x = self.embed_dropout(x)
        tables = [table(idx) for table in self.value_embeds]
        for i, block in enumerate(self.blocks):
            j = self.config.value_embed_of(i)
            x = block(x, rope, cache, record, None if j is None else tables[j])
        return self.final_norm(x)

    def _rope_at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None or self._rope[0].device != positions.device:
            self._rope = rope_tables(self.config, positions.device)
        cos, sin = self._rope
        return cos[positions][:, None].to(dtype), sin[positions][:, None].to(dtype)

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 * matmul params + 12 * (attention width summed over layers) * seq_len.

        The matmul params are every Linear weight (all projections and the LM head, tied or not);
        the second term is the attention score/value products (PaLM, appendix B). 6 = 2 for the
        forward pass + 4 for the backward.
        """
        seq_len = seq_len or self.config.block_size
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        width = sum(self.config.heads_in(layer) * self.config.head_dim for layer in range(self.config.n_layer))
        return 6 * matmul + 12 * width * seq_len


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
    if config.layer_value_embeds is not None:
        tables = config.layer_value_embeds
        if len(tables) != config.n_layer or sorted(set(tables) - {-1}) != list(range(config.value_embeds)):
            raise UserError(f"model.layer_value_embeds={tables}: needs one table per layer (n_layer={config.n_layer}), "
                            f"-1 for none, using every table 0..{config.value_embeds - 1}")
    elif config.value_embeds < 0 or 2 * config.value_embeds > config.n_layer:
        raise UserError(f"model.value_embeds={config.value_embeds}: between 0 and n_layer / 2 = "
                        f"{config.n_layer // 2} tables (each feeds one of the first and one of the last layers)")
    for j in range(config.value_embeds):
        layers = config.value_embed_layers(j)
        heads = [config.heads_in(i) for i in layers]
        if len(set(heads)) > 1:
            raise UserError(f"model.layer_heads: layers {' and '.join(map(str, layers))} share value-embedding table "
                            f"{j}, so they need the same heads; got {' and '.join(map(str, heads))}")


def _value_embed_width(config: ModelConfig, table: int) -> int:
    """The kv width of the layers that read value-embedding table `table` (alike: _check_config)."""
    return config.kv_heads_in(config.value_embed_layers(table)[0]) * config.head_dim
