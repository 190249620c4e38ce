"""Recurrent encoder-decoders with attention: `gru-seq2seq` and `lstm-seq2seq`.

Encoder: source embedding -> dropout -> torch's nn.GRU / nn.LSTM (n_encoder_layer layers, reading
the source both ways when `bidirectional`; padding never enters it: sources run as a packed
sequence). Decoder: target embedding -> dropout -> nn.GRU / nn.LSTM (n_layer layers) whose initial
hidden state is tanh(W_b [the encoder's final states of its top layer]) (cell state zero), then
Luong's global attention ("general" score h_t . W_a m_s over the encoder outputs m_s, padding
masked) and the attentional state tanh(W_c [context; h_t]) -> dropout -> head. The decoder runs
over the whole target in one fused call when training (no input feeding). `attention_maps` keeps
that attention's softmax (one layer, one head: cross-attention over the encoder states).

For decoding, `RecurrentSeq2SeqState` keeps per slot the decoder's hidden (and cell) state, the
initial state the bridge made from the slot's source, and the attention keys W_a m_s and encoder
outputs m_s of that source (a `SourceMemory`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.models.base import LayerStack, PruneGroup, Rows, UnitSlice, mean_pool
from llmcli.models.recurrent import GATES, ONEDNN_MIN_STEPS, _native_kernels
from llmcli.models.seq2seq_state import CROSS, Record, Seq2SeqModel, SourceMemory, key_padding_mask

CELLS: dict[str, type[nn.RNNBase]] = {"gru-seq2seq": nn.GRU, "lstm-seq2seq": nn.LSTM}


class RecurrentSeq2SeqState:
    """Per slot: the decoder's states `tensors` ((h,) or (h, c), each [n_layer, slots, hidden]),
    the bridge's `initial` states for a sequence that starts over, and the source memory."""

    def __init__(self, model: RecurrentSeq2Seq, max_slots: int, *, dtype: torch.dtype, device: torch.device | str):
        c = model.config
        count = 2 if c.arch == "lstm-seq2seq" else 1
        shape = (c.n_layer, max_slots, c.hidden_size)
        self.tensors = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(count))
        self.initial = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(count))
        self.positions = [0] * max_slots
        self.memory = SourceMemory([(c.source_context, c.hidden_size), (c.source_context, model.memory_size)], [1, 1],
                                   max_slots, c.source_context, dtype=dtype, device=device)

    def read(self, rows: Rows) -> tuple[torch.Tensor, ...]:
        """The rows' decoder states [n_layer, B, hidden]: the slot's initial state at position 0."""
        for slot, start in zip(rows.slots, rows.starts, strict=True):
            if start not in (0, self.positions[slot]):
                raise ValueError(f"slot {slot} holds {self.positions[slot]} tokens; a recurrent state "
                                 f"continues from there or restarts at 0, not at {start}")
        index = torch.tensor(rows.slots, device=self.tensors[0].device)
        fresh = torch.tensor([start == 0 for start in rows.starts], device=index.device)[None, :, None]
        return tuple(torch.where(fresh, init[:, index], now[:, index])
                     for init, now in zip(self.initial, self.tensors, strict=True))

    def write(self, rows: Rows, states: tuple[torch.Tensor, ...], *, initial: bool = False) -> None:
        index = torch.tensor(rows.slots, device=self.tensors[0].device)
        for t, s in zip(self.initial if initial else self.tensors, states, strict=True):
            t[:, index] = s.to(t.dtype)
        for slot, start, length in zip(rows.slots, rows.starts, rows.lengths, strict=True):
            self.positions[slot] = 0 if initial else start + length

    def copy_slots(self, sources: list[int], targets: list[int]) -> None:
        src, dst = torch.tensor(sources), torch.tensor(targets)
        for t in self.tensors + self.initial:
            t[:, dst.to(t.device)] = t[:, src.to(t.device)]
        positions = [self.positions[s] for s in sources]
        for slot, position in zip(targets, positions, strict=True):
            self.positions[slot] = position
        self.memory.copy_slots(sources, targets)


class RecurrentSeq2Seq(Seq2SeqModel):
    """Source embedding -> recurrent encoder; target embedding -> recurrent decoder -> attention -> head."""

    task = "seq2seq"
    pooling = "mean of the encoder's outputs (both directions, when bidirectional) over the source's tokens"
    gguf_refusal = "llama.cpp has no recurrent encoder-decoder; llmcli generate and llmcli serve run it"
    packing_refusal = ("its recurrent encoder and decoder read a row as one sequence, so a pair would start "
                       "from the state the pair before it left")

    def __init__(self, config: ModelConfig):
        super().__init__()
        _check_config(config)
        self.config = config
        d, hidden, cell = config.d_model, config.hidden_size, CELLS[config.arch]
        directions = 2 if config.bidirectional else 1
        self.memory_size = directions * hidden
        self.tgt_embed = nn.Embedding(config.vocab_size, d)
        self.src_embed = None if config.share_embeddings else nn.Embedding(config.source_vocab_size, d)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = cell(d, hidden, num_layers=config.encoder_layers, bias=config.bias, batch_first=True,
                            bidirectional=config.bidirectional,
                            dropout=config.dropout if config.encoder_layers > 1 else 0.0)
        self.bridge = nn.Linear(self.memory_size, config.n_layer * hidden, bias=config.bias)
        self.decoder = cell(d, hidden, num_layers=config.n_layer, bias=config.bias, batch_first=True,
                            dropout=config.dropout if config.n_layer > 1 else 0.0)
        self.attn_key = nn.Linear(self.memory_size, hidden, bias=False)  # Luong's W_a
        self.combine = nn.Linear(self.memory_size + hidden, d, bias=config.bias)  # Luong's W_c
        self.lm_head = nn.Linear(d, config.vocab_size, bias=config.bias)
        for module in (self.tgt_embed, self.src_embed, self.lm_head):
            if module is not None:  # the word-language-model example's initialisation
                nn.init.uniform_(module.weight, -0.1, 0.1)
        self.tie_weights()

    @property
    def context_length(self) -> int | None:
        return None  # the decoder carries its state: no window

    def tie_weights(self) -> None:
        """Also regroups the recurrent weights into one block (cuDNN wants them so after a load)."""
        super().tie_weights()
        for rnn in (self.encoder, self.decoder):
            if isinstance(rnn, nn.RNNBase) and rnn.weight_ih_l0.device.type != "meta":
                rnn.flatten_parameters()

    def prune_groups(self) -> list[PruneGroup]:
        """"hidden": each encoder, then decoder layer's units. Unit j of an encoder layer is unit j of
        both its directions; the top layer's outputs are read by the attention keys, the bridge and
        the context half of `combine`. Decoder unit j of layer k owns row k*hidden + j of the bridge;
        the top layer's outputs are the attention queries (rows of `attn_key`) and the rest of
        `combine`. One d_hidden holds them all, so every layer keeps the same number."""
        c, H = self.config, self.config.hidden_size
        gates, E, D = GATES[c.arch.removesuffix("-seq2seq")], c.encoder_layers, c.n_layer
        directions = ("", "_reverse") if c.bidirectional else ("",)
        both = len(directions)

        def own(rnn: str, layer: int, suffix: str) -> list[UnitSlice]:
            rows = [f"{rnn}.weight_ih_l{layer}{suffix}", f"{rnn}.weight_hh_l{layer}{suffix}"]
            rows += [f"{rnn}.bias_ih_l{layer}{suffix}", f"{rnn}.bias_hh_l{layer}{suffix}"] if c.bias else []
            return [UnitSlice(n, 0, blocks=gates) for n in rows] + [UnitSlice(f"{rnn}.weight_hh_l{layer}{suffix}", 1)]

        groups = []
        for layer in range(E):
            slices = [piece for suffix in directions for piece in own("encoder", layer, suffix)]
            readers = [f"encoder.weight_ih_l{layer + 1}{suffix}" for suffix in directions] if layer + 1 < E \
                else ["attn_key.weight", "combine.weight", "bridge.weight"]
            slices += [UnitSlice(name, 1, blocks=both) for name in readers]
            groups.append(PruneGroup("hidden", layer, H, tuple(slices), uniform=True, label=f"encoder layer {layer}"))
        for layer in range(D):
            slices = own("decoder", layer, "")
            slices += [UnitSlice(f"bridge.{w}", 0, offset=layer * H) for w in ("weight", "bias")[:1 + c.bias]]
            slices += [UnitSlice(f"decoder.weight_ih_l{layer + 1}", 1)] if layer + 1 < D else \
                [UnitSlice("attn_key.weight", 0), UnitSlice("combine.weight", 1, offset=both * H)]
            groups.append(PruneGroup("hidden", E + layer, H, tuple(slices), uniform=True, label=f"decoder layer {layer}"))
        return groups

    def pruned_config(self, kept: dict[str, list[int]]) -> ModelConfig:
        """d_hidden = the units every layer keeps."""
        sizes = set(kept.get("hidden", [self.config.hidden_size]))
        if len(sizes) != 1:
            raise ValueError(f"every recurrent layer keeps the same number of hidden units; got {sorted(sizes)}")
        return dataclasses.replace(self.config, d_hidden=sizes.pop())

    def layer_stacks(self) -> list[LayerStack]:
        """Encoder and decoder layers (a first layer stays unless the embedding is as wide as what the
        next layer reads); decoder layer k owns rows [k*hidden, (k+1)*hidden) of the bridge."""
        c, H = self.config, self.config.hidden_size
        bridge = tuple(UnitSlice(f"bridge.{w}", 0, size=H) for w in ("weight", "bias")[:1 + c.bias])
        return [LayerStack("encoder", c.encoder_layers, r"encoder\.(?:weight|bias)_(?:ih|hh)_l(\d+)(?:_reverse)?",
                           keeps_first=c.d_model != self.memory_size),
                LayerStack("decoder", c.n_layer, r"decoder\.(?:weight|bias)_(?:ih|hh)_l(\d+)", bridge,
                           keeps_first=c.d_model != H)]

    def layers_config(self, keep: dict[str, Sequence[int]]) -> ModelConfig:
        c = self.config
        return dataclasses.replace(c, n_encoder_layer=len(keep.get("encoder", range(c.encoder_layers))),
                                   n_layer=len(keep.get("decoder", range(c.n_layer))))

    def new_decode_state(self, max_slots: int, max_len: int | None = None, *, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu") -> RecurrentSeq2SeqState:
        return RecurrentSeq2SeqState(self, max_slots, dtype=dtype, device=device)

    # -- encoder ---------------------------------------------------------------------------------

    def _encoder(self, source: torch.Tensor, lengths) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor]:
        """(encoder outputs [B, S, memory], the decoder's initial states, source mask [B, S])."""
        B, S = source.shape
        if S > self.config.source_context:
            raise ValueError(f"sources may have at most {self.config.source_context} tokens "
                             f"(model.source_block_size); got {S}")
        lengths = torch.as_tensor(lengths if lengths is not None else [S] * B).cpu()
        table = self.src_embed if self.src_embed is not None else self.tgt_embed
        packed = pack_padded_sequence(self.dropout(table(source)), lengths, batch_first=True, enforce_sorted=False)
        with _kernels(S):
            out, final = self.encoder(packed)
        memory, _ = pad_packed_sequence(out, batch_first=True, total_length=S)
        h = final[0] if isinstance(final, tuple) else final  # [layers * directions, B, hidden]
        top = h[-2:] if self.config.bidirectional else h[-1:]
        init = torch.tanh(self.bridge(torch.cat(list(top), dim=-1)))  # [B, n_layer * hidden]
        init = init.view(B, self.config.n_layer, -1).transpose(0, 1).contiguous()
        states = (init, torch.zeros_like(init)) if isinstance(self.decoder, nn.LSTM) else (init,)
        mask = key_padding_mask(lengths, S, source.device)
        return memory, states, torch.ones(B, S, dtype=torch.bool, device=source.device) if mask is None else mask

    def embed(self, idx: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        memory, _, _ = self._encoder(idx, list(lengths))
        return mean_pool(memory, lengths)

    def encode(self, source: torch.Tensor, *, state: RecurrentSeq2SeqState, rows: Rows) -> None:
        memory, states, _ = self._encoder(source, rows.lengths)
        state.memory.write(rows, [self.attn_key(memory), memory])
        state.write(Rows(rows.slots, [0] * len(rows.slots), [0] * len(rows.slots)), states, initial=True)

    # -- decoder ---------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, *, state: RecurrentSeq2SeqState | None = None, rows: Rows | None = None,
                source: torch.Tensor | None = None, source_lengths=None, record: Record | None = None) -> torch.Tensor:
        """Float32 logits [B, T, target vocab] for the decoder inputs `idx` [B, T]: teacher forcing
        over padded `source` ids, or a decode step of the slots `rows` names (see Transformer's).
        With `record`, the attention weights [B, 1, T, S] are appended to record[CROSS]."""
        B, T = idx.shape
        x = self.dropout(self.tgt_embed(idx))
        if state is None:
            if source is None:
                raise ValueError("a seq2seq model needs its source: forward(idx, source=..., source_lengths=...)")
            memory, states, mask = self._encoder(source, source_lengths)
            keys = self.attn_key(memory)
            out, _ = self._run(x, states, None)
        else:
            if rows is None or len(rows.slots) != B:
                raise ValueError(f"forward with a decode state needs rows: {B} slots, starts and lengths")
            (keys, memory), mask = state.memory.read(rows, idx.device)
            out, final = self._run(x, state.read(rows), rows.lengths)
            state.write(rows, final)
        scores = torch.bmm(out, keys.to(out.dtype).transpose(1, 2))  # [B, T, S]
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        weights = scores.softmax(-1)
        if record is not None:
            record.setdefault(CROSS, []).append(weights[:, None])
        context = torch.bmm(weights, memory.to(out.dtype))
        attentional = torch.tanh(self.combine(torch.cat([context, out], dim=-1)))
        return self.lm_head(self.dropout(attentional)).float()

    def _run(self, x: torch.Tensor, states: tuple[torch.Tensor, ...], lengths) -> tuple[torch.Tensor, tuple]:
        """The decoder over x [B, T, d_model] from `states`: (outputs [B, T, hidden], final states)."""
        T = x.shape[1]
        hx = states if len(states) == 2 else states[0]
        padded = lengths is not None and min(lengths) < T
        inputs = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False) if padded else x
        with _kernels(T):
            out, final = self.decoder(inputs, hx)
        if padded:
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
        return out, final if isinstance(final, tuple) else (final,)

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per target token, for a source as long as the target: 6 * (recurrent weight
        matrices + Linear weights) + 12 * hidden * seq_len for the attention scores and context."""
        seq_len = seq_len or self.config.block_size
        matrices = sum(p.numel() for rnn in (self.encoder, self.decoder) for name, p in rnn.named_parameters()
                       if name.startswith("weight"))
        linear = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * (matrices + linear) + 12 * self.memory_size * seq_len


def _kernels(steps: int):
    """torch's native recurrent kernels for short calls (see recurrent.ONEDNN_MIN_STEPS)."""
    return _native_kernels() if steps < ONEDNN_MIN_STEPS else contextlib.nullcontext()


def _check_config(config: ModelConfig) -> None:
    if not config.vocab_size or not config.source_vocab_size:
        raise UserError("model.vocab_size / model.src_vocab_size is not set (they normally come from the tokenizers)")
    if config.arch not in CELLS:
        raise UserError(f"model.arch={config.arch} is not a recurrent seq2seq family ({', '.join(CELLS)})")
