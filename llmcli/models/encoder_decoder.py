"""The Transformer encoder-decoder of "Attention Is All You Need", laid out as Hugging Face's MarianMTModel.

Encoder: token embedding x sqrt(d_model) + positions -> dropout -> encoder layers (self-attention
over the source with its padding masked, then a feed-forward of `act`). Decoder: the same over
the target, each layer with causal self-attention, cross-attention over the encoder's output, and
a feed-forward. Post-norm layers (the paper's and Marian's): x = LayerNorm(x + dropout(f(x))) after
each sublayer; pre-norm layers: x = x + dropout(f(LayerNorm(x))), with one more LayerNorm after each
stack. Positions are sinusoidal (Marian's layout: the sines of a position in the first half of its
vector, the cosines in the second) or learned. The head maps to the target vocabulary with a bias
(Marian's `final_logits_bias`); it may reuse the target embedding, and the source may share it.

Decoding: `EncoderDecoderState` keeps the decoder's self-attention cache (a kv_cache.KVCache, or a
PagedKVCache) and, per slot, the cross-attention keys and values of every decoder layer, computed
once by `encode`.

Packed rows (train.pack_pairs): several pairs share a row, `source_segments` / `target_segments`
numbering each token's pair (1, 2, ...; 0 is padding). Each pair then attends only within itself
(encoder self-attention, causal decoder self-attention, cross-attention to its own source) and its
positions restart at 0, so a packed pair's logits are those it would have alone.

Attention runs through SDPA. When its weights are asked for (`attention_maps`: a forward with a
`record`), every attention computes them step by step instead (transformer.explicit_attention),
the rest of the forward unchanged.
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
from llmcli.models.base import LayerStack, PruneGroup, Rows, UnitSlice, kept_of, mean_pool
from llmcli.models.kv_cache import CacheStep, KVCache, PagedKVCache, kv_bytes_per_token
from llmcli.models.seq2seq_state import (
    CROSS,
    DECODER_SELF,
    ENCODER_SELF,
    Record,
    Seq2SeqModel,
    SourceMemory,
    key_padding_mask,
)
from llmcli.models.transformer import explicit_attention


def sinusoids(positions: int, dim: int, device: torch.device | str) -> torch.Tensor:
    """[positions, dim] float32: position p, column j < dim/2: sin(p / 10000^(2j/dim)); column dim/2 + j:
    the cosine of the same angle (MarianSinusoidalPositionalEmbedding, computed in float64 as it is)."""
    half = (dim + 1) // 2
    exponent = 2 * torch.arange(half, dtype=torch.float64, device=device) / dim
    angles = torch.arange(positions, dtype=torch.float64, device=device)[:, None] / torch.pow(10000.0, exponent)
    return torch.cat([angles.sin(), angles[:, : dim // 2].cos()], dim=1).float()


class Attention(nn.Module):
    """Multi-head attention with separate query, key, value and output projections (as Marian's);
    a pruned one has fewer heads of the same size (its projections narrower than d_model)."""

    def __init__(self, config: ModelConfig, heads: int):
        super().__init__()
        d, self.n_head, self.head_dim = config.d_model, heads, config.head_dim
        inner = heads * config.head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, inner, bias=config.bias) for _ in range(3))
        self.out_proj = nn.Linear(inner, d, bias=config.bias)
        self.dropout = config.dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, heads, S, head_dim] of x [B, S, d_model]."""
        return self._heads(self.k_proj(x)), self._heads(self.v_proj(x))

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               causal: bool = False, record: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Queries from x [B, T, d_model] over k/v; `mask` [B, 1, T or 1, S] True where allowed. With
        `record`, the attention runs step by step and its weights [B, heads, T, S] are appended."""
        q = self._heads(self.q_proj(x))
        k, v = k.to(q.dtype), v.to(q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if record is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p)
        else:
            if mask is None and not causal:  # explicit_attention reads no mask as causal
                mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device)
            y, weights = explicit_attention(q, k, v, mask, dropout_p)
            record.append(weights)
        return self.out_proj(y.transpose(1, 2).reshape(*x.shape[:2], self.n_head * self.head_dim))


class _Layer(nn.Module):
    """Shared parts of both layer kinds: the feed-forward and the residual + norm around a sublayer."""

    def __init__(self, config: ModelConfig, ff: int):
        super().__init__()
        d = config.d_model
        self.pre_norm = config.norm_placement == "pre"
        self.fc1, self.fc2 = nn.Linear(d, ff, bias=config.bias), nn.Linear(ff, d, bias=config.bias)
        self.final_norm = nn.LayerNorm(d, eps=config.norm_eps, bias=config.bias)
        self.act = F.relu if config.act == "relu" else F.gelu  # gelu: the exact erf form, as Marian's
        self.dropout = nn.Dropout(config.dropout)

    def residual(self, x: torch.Tensor, norm: nn.Module, sublayer) -> torch.Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(norm(x)))
        return norm(x + self.dropout(sublayer(x)))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(_Layer):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__(config, config.encoder_ff_in(layer))
        self.self_attn = Attention(config, config.encoder_heads_in(layer))
        self.self_attn_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, record: Record | None = None) -> torch.Tensor:
        weights = None if record is None else record.setdefault(ENCODER_SELF, [])
        x = self.residual(x, self.self_attn_norm, lambda h: self.self_attn.attend(h, *self.self_attn.keys_values(h),
                                                                                  mask, record=weights))
        return self.residual(x, self.final_norm, self.feed_forward)


class DecoderLayer(_Layer):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__(config, config.ff_in(layer))
        self.layer = layer
        self.self_attn = Attention(config, config.heads_in(layer))
        self.cross_attn = Attention(config, config.cross_heads_in(layer))
        self.self_attn_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)
        self.cross_attn_norm = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)

    def forward(self, x: torch.Tensor, memory_k: torch.Tensor, memory_v: torch.Tensor,
                memory_mask: torch.Tensor | None, cache: CacheStep | None, record: Record | None = None,
                self_mask: torch.Tensor | None = None) -> torch.Tensor:
        own, cross = (None, None) if record is None else (record.setdefault(DECODER_SELF, []),
                                                          record.setdefault(CROSS, []))

        def self_attention(h: torch.Tensor) -> torch.Tensor:
            k, v = self.self_attn.keys_values(h)
            if cache is None:  # teacher forcing: causal, or within each packed pair (self_mask)
                return self.self_attn.attend(h, k, v, self_mask, causal=self_mask is None, record=own)
            k, v = cache.update(self.layer, k, v)
            return self.self_attn.attend(h, k, v, cache.mask, record=own)

        x = self.residual(x, self.self_attn_norm, self_attention)
        x = self.residual(x, self.cross_attn_norm,
                          lambda h: self.cross_attn.attend(h, memory_k, memory_v, memory_mask, record=cross))
        return self.residual(x, self.final_norm, self.feed_forward)


class EncoderDecoderState:
    """The decoder's KV cache (slots or paged) and, per slot, every decoder layer's cross-attention keys
    and values."""

    def __init__(self, model: EncoderDecoder, max_slots: int, self_cache: KVCache | PagedKVCache, *,
                 dtype: torch.dtype, device: torch.device | str):
        c = model.config
        self.self_cache = self_cache
        shapes = [(c.cross_heads_in(layer), c.source_context, c.head_dim) for layer in range(c.n_layer) for _ in "kv"]
        self.memory = SourceMemory(shapes, [2] * (2 * c.n_layer), max_slots, c.source_context,
                                   dtype=dtype, device=device)

    def copy_slots(self, sources: list[int], targets: list[int]) -> None:
        self.self_cache.copy_slots(sources, targets)
        self.memory.copy_slots(sources, targets)

    def set_blocks(self, slot: int, blocks: list[int]) -> None:
        """A paged self-attention cache: the blocks holding the slot's decoder positions."""
        self.self_cache.set_blocks(slot, blocks)

    @property
    def blocks_per_slot(self) -> int:
        """A paged self-attention cache: the most blocks one slot's decoder positions take."""
        return self.self_cache.blocks_per_slot


class EncoderDecoder(Seq2SeqModel):
    """Embeddings -> encoder layers; target embeddings -> decoder layers (over the encoder's output) -> head."""

    task = "seq2seq"
    pooling = "mean of the encoder's output states (after its final norm) over the source's tokens"
    exports_to_hf = True  # as MarianMTModel (llmcli/hf/marian.py)
    gguf_refusal = ("llama.cpp has no Marian-style encoder-decoder; llmcli export --format hf writes it as a "
                    "MarianMTModel that transformers (and CTranslate2) run, and llmcli generate / serve run it as it is")
    pages_decode_state = True  # the decoder's self-attention cache; the source memory stays per slot
    packing_refusal = None  # block-diagonal masks and per-pair positions (the module docstring)

    def __init__(self, config: ModelConfig):
        super().__init__()
        _check_config(config)
        self.config = config
        d = config.d_model
        self.tgt_embed = nn.Embedding(config.vocab_size, d)
        self.src_embed = None if config.share_embeddings else nn.Embedding(config.source_vocab_size, d)
        learned = config.pos == "learned"
        self.src_pos_embed = nn.Embedding(config.source_context, d) if learned else None
        self.pos_embed = nn.Embedding(config.block_size, d) if learned else None
        self.embed_scale = math.sqrt(d)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(config, i) for i in range(config.encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(config, i) for i in range(config.n_layer))
        pre = config.norm_placement == "pre"
        self.encoder_norm = nn.LayerNorm(d, eps=config.norm_eps, bias=config.bias) if pre else None
        self.decoder_norm = nn.LayerNorm(d, eps=config.norm_eps, bias=config.bias) if pre else None
        self.lm_head = nn.Linear(d, config.vocab_size, bias=config.bias)
        self._sinusoids: torch.Tensor | None = None  # built on first use, on the input's device
        self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        """nn.Transformer's Xavier-uniform matrices; embeddings N(0, 1/d_model) (scaled by sqrt(d_model))."""
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.d_model ** -0.5)

    def lora_targets(self) -> dict[str, list[str]]:
        """q, k, v, o in every attention (encoder and decoder self-attention, cross-attention), up and
        down (the feed-forward's fc1, fc2) in every layer; embed and head when the head is untied."""
        c = self.config
        layers = [f"encoder.{i}" for i in range(c.encoder_layers)] + [f"decoder.{i}" for i in range(c.n_layer)]
        attentions = [f"{layer}.self_attn" for layer in layers] + [f"decoder.{i}.cross_attn" for i in range(c.n_layer)]
        out = {term: [f"{a}.{proj}" for a in attentions]
               for term, proj in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj"))}
        out.update(up=[f"{layer}.fc1" for layer in layers], down=[f"{layer}.fc2" for layer in layers])
        if not c.tie_embeddings:
            out.update(embed=list(self.token_embeddings), head=["lm_head"])
        return out

    def _attentions(self) -> list[tuple[str, str]]:
        """(module name, label) of every attention, in the order of the "heads" groups."""
        c = self.config
        return ([(f"encoder.{i}.self_attn", f"encoder layer {i} (self-attention)") for i in range(c.encoder_layers)]
                + [(f"decoder.{i}.self_attn", f"decoder layer {i} (self-attention)") for i in range(c.n_layer)]
                + [(f"decoder.{i}.cross_attn", f"decoder layer {i} (cross-attention)") for i in range(c.n_layer)])

    def prune_groups(self) -> list[PruneGroup]:
        """"heads": the heads of every attention (encoder self, decoder self, then cross-attention,
        layer by layer); "mlp": the feed-forward units of every encoder, then decoder layer."""
        c, groups = self.config, []
        biases = ("weight", "bias") if c.bias else ("weight",)
        for n, (a, label) in enumerate(self._attentions()):
            heads = [UnitSlice(f"{a}.{p}_proj.{w}", 0, size=c.head_dim) for p in "qkv" for w in biases]
            heads.append(UnitSlice(f"{a}.out_proj.weight", 1, size=c.head_dim))
            groups.append(PruneGroup("heads", n, self.get_submodule(a).n_head, tuple(heads), label=label))
        layers = [f"encoder.{i}" for i in range(c.encoder_layers)] + [f"decoder.{i}" for i in range(c.n_layer)]
        for n, layer in enumerate(layers):
            mlp = [UnitSlice(f"{layer}.fc1.{w}", 0) for w in biases] + [UnitSlice(f"{layer}.fc2.weight", 1)]
            groups.append(PruneGroup("mlp", n, self.get_submodule(layer).fc1.out_features, tuple(mlp),
                                     label=layer.replace(".", " layer ")))
        return groups

    def pruned_config(self, kept: dict[str, list[int]]) -> ModelConfig:
        """Per-layer sizes: encoder_layer_heads, layer_heads (decoder self-attention), cross_layer_heads,
        encoder_layer_ff and layer_ff (decoder)."""
        c, E, D = self.config, self.config.encoder_layers, self.config.n_layer
        sizes = {}
        if "heads" in kept:
            heads = kept["heads"]
            sizes.update(encoder_layer_heads=heads[:E], layer_heads=heads[E:E + D], cross_layer_heads=heads[E + D:])
        if "mlp" in kept:
            sizes.update(encoder_layer_ff=kept["mlp"][:E], layer_ff=kept["mlp"][E:])
        return dataclasses.replace(c, **sizes)

    def layer_stacks(self) -> list[LayerStack]:
        return [LayerStack("encoder", self.config.encoder_layers, r"encoder\.(\d+)\..*"),
                LayerStack("decoder", self.config.n_layer, r"decoder\.(\d+)\..*")]

    def layers_config(self, keep: dict[str, Sequence[int]]) -> ModelConfig:
        """n_encoder_layer, n_layer and the per-layer sizes of the layers kept."""
        c = self.config
        enc, dec = list(keep.get("encoder", range(c.encoder_layers))), list(keep.get("decoder", range(c.n_layer)))
        return dataclasses.replace(c, n_encoder_layer=len(enc), n_layer=len(dec),
                                   encoder_layer_heads=kept_of(c.encoder_layer_heads, enc),
                                   encoder_layer_ff=kept_of(c.encoder_layer_ff, enc),
                                   layer_heads=kept_of(c.layer_heads, dec), layer_ff=kept_of(c.layer_ff, dec),
                                   cross_layer_heads=kept_of(c.cross_layer_heads, dec))

    def new_decode_state(self, max_slots: int, max_len: int | None = None, *, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu") -> EncoderDecoderState:
        cache = KVCache(self.config, max_slots, max_len, dtype=dtype, device=device)
        return EncoderDecoderState(self, max_slots, cache, dtype=dtype, device=device)

    def new_paged_decode_state(self, max_slots: int, num_blocks: int, block_len: int, *, dtype: torch.dtype,
                               device: torch.device | str) -> EncoderDecoderState:
        cache = PagedKVCache(self.config, max_slots, num_blocks, block_len, dtype=dtype, device=device)
        return EncoderDecoderState(self, max_slots, cache, dtype=dtype, device=device)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return kv_bytes_per_token(self.config, dtype)

    # -- embeddings ------------------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor, table: nn.Module, positions: torch.Tensor,
               learned: nn.Module | None) -> torch.Tensor:
        x = table(ids) * self.embed_scale
        if learned is not None:
            return self.dropout(x + learned(positions))
        if self._sinusoids is None or self._sinusoids.device != ids.device:
            rows = max(self.config.block_size, self.config.source_context)
            self._sinusoids = sinusoids(rows, self.config.d_model, ids.device)
        return self.dropout(x + self._sinusoids[positions].to(x.dtype))

    # -- encoder ---------------------------------------------------------------------------------

    def _encoder(self, source: torch.Tensor, lengths, record: Record | None = None,
                 segments: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoder's output [B, S, d_model] and the source mask [B, 1, 1, S] (None: no padding);
        packed rows (`segments`): the mask is [B, 1, S, S], each pair over itself."""
        B, S = source.shape
        if S > self.config.source_context:
            raise ValueError(f"sources may have at most {self.config.source_context} tokens "
                             f"(model.source_block_size); got {S}")
        if segments is None:
            mask = key_padding_mask(lengths if lengths is not None else [S] * B, S, source.device)
            mask = None if mask is None else mask[:, None, None, :]
            positions = torch.arange(S, device=source.device).expand(B, S)
        else:
            mask, positions = segment_mask(segments, segments), segment_positions(segments)
        x = self._embed(source, self.src_embed if self.src_embed is not None else self.tgt_embed, positions,
                        self.src_pos_embed)
        for layer in self.encoder:
            x = layer(x, mask, record)
        return (self.encoder_norm(x) if self.encoder_norm is not None else x), mask

    def embed(self, idx: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        memory, _ = self._encoder(idx, list(lengths))
        return mean_pool(memory, lengths)

    def encode(self, source: torch.Tensor, *, state: EncoderDecoderState, rows: Rows) -> None:
        memory, _ = self._encoder(source, rows.lengths)
        tensors = []
        for layer in self.decoder:
            tensors += layer.cross_attn.keys_values(memory)
        state.memory.write(rows, tensors)

    # -- decoder ---------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, *, state: EncoderDecoderState | None = None, rows: Rows | None = None,
                source: torch.Tensor | None = None, source_lengths=None, record: Record | None = None,
                source_segments: torch.Tensor | None = None,
                target_segments: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits [B, T, target vocab] for the decoder inputs `idx` [B, T].

        Teacher forcing: `source` [B, S] padded source ids (`source_lengths` real tokens per row;
        default all), decoder inputs at positions 0..T-1. Packed rows: `source_segments` [B, S] and
        `target_segments` [B, T] number each token's pair (0: padding); see the module docstring.
        With a `state`: row b continues slot `rows.slots[b]` from position `rows.starts[b]` over
        the source `encode` stored there.
        With `record`, each attention's weights are appended to record[its kind] (see the module
        docstring).
        """
        B, T = idx.shape
        if (source_segments is None) != (target_segments is None) or (state is not None and source_segments is not None):
            raise ValueError("packed rows take both source_segments and target_segments, and teacher forcing (no state)")
        if state is not None:
            if rows is None or len(rows.slots) != B:
                raise ValueError(f"forward with a decode state needs rows: {B} slots, starts and lengths")
            cache = state.self_cache.bind(rows, T, idx.device)
            memory, mask = state.memory.read(rows, idx.device)
            memory_mask, positions = mask[:, None, None, :], cache.positions
        else:
            if source is None:
                raise ValueError("an encoder-decoder needs its source: forward(idx, source=..., source_lengths=...)")
            if T > self.config.block_size:
                raise ValueError(f"positions must be in [0, {self.config.block_size}) "
                                 f"(block_size={self.config.block_size}); got 0..{T - 1}")
            encoded, memory_mask = self._encoder(source, source_lengths, record, source_segments)
            memory = [t for layer in self.decoder for t in layer.cross_attn.keys_values(encoded)]
            cache, positions = None, torch.arange(T, device=idx.device).expand(B, T)
        self_mask = None
        if target_segments is not None:
            # 1) each decoder position over its own pair's earlier positions; 2) over its own source
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            self_mask = segment_mask(target_segments, target_segments) & causal
            memory_mask = segment_mask(target_segments, source_segments)
            positions = segment_positions(target_segments)
        x = self._embed(idx, self.tgt_embed, positions, self.pos_embed)
        for i, layer in enumerate(self.decoder):
            x = layer(x, memory[2 * i], memory[2 * i + 1], memory_mask, cache, record, self_mask)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        return self.lm_head(x).float()

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per target token, for a source as long as the target (`seq_len`, default
        block_size): 6 * every Linear weight + 12 * its width * seq_len per attention (encoder self,
        decoder self and cross)."""
        seq_len = seq_len or self.config.block_size
        matmul = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        width = sum(m.n_head * m.head_dim for m in self.modules() if isinstance(m, Attention))
        return 6 * matmul + 12 * width * seq_len


def segment_mask(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """[B, 1, Tq, Tk] True where query and key belong to the same pair (segments [B, Tq], [B, Tk]);
    a padding query (segment 0) sees every key, so that no row of the softmax is empty."""
    return ((queries[:, :, None] == keys[:, None, :]) | (queries[:, :, None] == 0))[:, None]


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """[B, T] each token's position within its pair: its index minus that of its pair's first token."""
    index = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    first = torch.ones_like(segments, dtype=torch.bool)
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return index - torch.where(first, index, 0).cummax(dim=1).values


def _check_config(config: ModelConfig) -> None:
    """The cross-field checks build_config does, for configs constructed directly."""
    if not config.vocab_size or not config.source_vocab_size:
        raise UserError("model.vocab_size / model.src_vocab_size is not set (they normally come from the tokenizers)")
    if config.d_model % config.n_head:
        raise UserError(f"model.n_head={config.n_head} must divide model.d_model={config.d_model}")
    if config.pos not in ("sinusoidal", "learned") or config.act not in ("relu", "gelu"):
        raise UserError(f"model.arch=encoder-decoder takes pos sinusoidal|learned and act relu|gelu; got "
                        f"pos={config.pos}, act={config.act}")
