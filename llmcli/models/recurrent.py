"""Recurrent language models: token embedding → torch's nn.LSTM, nn.GRU or nn.RNN (tanh) → LM head.

The model of the classic word-language-model example: dropout on the embeddings, between the
recurrent layers and on their outputs, an optional tied head (the embedding matrix; with d_hidden
other than d_model a linear projection maps the hidden state to d_model first). Two of AWD-LSTM's
regularisers are options: `embed_dropout` drops whole rows of the embedding table (every use of a
word in the batch), `weight_drop` drops entries of the hidden-to-hidden matrices (DropConnect, one
mask per forward). Training runs on windows of `block_size` tokens (truncated backpropagation
through time), from a zero state or, with train.stateful, from where the previous window of the
same stream stopped; there is no context limit, so `context_length` is None and decoding and
scoring carry the hidden state as far as the text goes.

For decoding, `RecurrentState` keeps one hidden state (and, for an LSTM, one cell state) per slot.
A prefill runs each prompt through the fused recurrent kernel once (right-padded prompts as a
packed sequence, so padding never advances a state); each decode step then feeds one token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from llmcli.config import ModelConfig
from llmcli.errors import UserError
from llmcli.models.base import LanguageModel, LayerStack, PruneGroup, Rows, UnitSlice, mean_pool

RNN_CLASSES: dict[str, type[nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}
STATE_TENSORS = {"lstm": 2, "gru": 1, "rnn": 1}  # (h, c) or h
GATES = {"lstm": 4, "gru": 3, "rnn": 1}  # weight blocks per layer (an LSTM's four gates, a GRU's three)
# Calls of fewer steps than this run torch's native kernel rather than oneDNN's, which reorders
# every weight on each call: a single decode step costs several times the step itself there.
ONEDNN_MIN_STEPS = 16


class RecurrentState:
    """Per-slot recurrent state: `tensors` is (h,) or (h, c), each [n_layer, max_slots, hidden].

    `positions[slot]` counts the tokens the slot has consumed. A row starting at position 0 begins
    from a zero state (a new sequence takes the slot); any other start must continue exactly where
    the slot stopped, since a recurrent state cannot be rewound.
    """

    def __init__(self, count: int, n_layer: int, max_slots: int, hidden: int, *,
                 dtype: torch.dtype, device: torch.device | str):
        self.max_slots = max_slots
        self.tensors = tuple(torch.zeros(n_layer, max_slots, hidden, dtype=dtype, device=device)
                             for _ in range(count))
        self.positions = [0] * max_slots

    def _index(self, rows: Rows) -> slice | torch.Tensor:
        first, count = rows.slots[0], len(rows.slots)
        if rows.slots == tuple(range(first, first + count)):
            return slice(first, first + count)
        return torch.tensor(rows.slots, device=self.tensors[0].device)

    def read(self, rows: Rows) -> tuple[torch.Tensor, ...]:
        """The rows' states [n_layer, B, hidden] (zero for rows that start a sequence): copies, so that
        a training step's backward pass never sees them overwritten."""
        if not rows.slots:
            raise ValueError("forward with a decode state needs rows: one slot, start and length per row")
        if min(rows.slots) < 0 or max(rows.slots) >= self.max_slots:
            raise ValueError(f"slots must be in [0, {self.max_slots}); got {min(rows.slots)}..{max(rows.slots)}")
        for slot, start in zip(rows.slots, rows.starts, strict=True):
            if start not in (0, self.positions[slot]):
                raise ValueError(f"slot {slot} holds {self.positions[slot]} tokens; a recurrent state "
                                 f"continues from there or restarts at 0, not at {start}")
        fresh = [b for b, start in enumerate(rows.starts) if start == 0]
        if len(fresh) == len(rows.slots):
            shape = (self.tensors[0].shape[0], len(rows.slots), self.tensors[0].shape[2])
            return tuple(t.new_zeros(shape) for t in self.tensors)
        index = self._index(rows)
        states = tuple(t[:, index].clone() for t in self.tensors)
        for s in states if fresh else ():
            s[:, fresh] = 0
        return states

    def write(self, rows: Rows, states: tuple[torch.Tensor, ...]) -> None:
        """Store the rows' new states (detached: the carried state of training holds no graph)."""
        index = self._index(rows)
        for t, s in zip(self.tensors, states, strict=True):
            t[:, index] = s.detach().to(t.dtype)
        for slot, start, length in zip(rows.slots, rows.starts, rows.lengths, strict=True):
            self.positions[slot] = start + length

    def copy_slots(self, sources: list[int], targets: list[int]) -> None:
        """Slot targets[i] becomes a copy of slot sources[i] (all read before any is written)."""
        src, dst = torch.tensor(sources), torch.tensor(targets)
        for t in self.tensors:
            t[:, dst.to(t.device)] = t[:, src.to(t.device)]
        positions = [self.positions[s] for s in sources]
        for slot, position in zip(targets, positions, strict=True):
            self.positions[slot] = position


class Recurrent(LanguageModel):
    """Embedding → dropout → n_layer recurrent layers (dropout between) → dropout → LM head."""

    pooling = "mean of the top recurrent layer's outputs over the input's tokens"
    gguf_refusal = ("llama.cpp has no LSTM, GRU or plain RNN language model; llmcli generate and llmcli serve run "
                    "it (quantized with llmcli quantize for a smaller, faster CPU model)")

    def __init__(self, config: ModelConfig):
        super().__init__()
        _check_config(config)
        self.config = config
        hidden = config.hidden_size
        self.tok_embed = nn.Embedding(config.vocab_size, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.rnn = RNN_CLASSES[config.arch](config.d_model, hidden, num_layers=config.n_layer, bias=config.bias,
                                            batch_first=True, dropout=config.dropout if config.n_layer > 1 else 0.0)
        # A tied head reads d_model: a wider hidden state is projected down to it first.
        projected = config.tie_embeddings and hidden != config.d_model
        self.proj = nn.Linear(hidden, config.d_model, bias=False) if projected else None
        self.lm_head = nn.Linear(config.d_model if projected else hidden, config.vocab_size, bias=config.bias)
        # The word-language-model example's initialisation; the recurrent layers keep torch's.
        nn.init.uniform_(self.tok_embed.weight, -0.1, 0.1)
        nn.init.uniform_(self.lm_head.weight, -0.1, 0.1)
        if self.lm_head.bias is not None:
            nn.init.zeros_(self.lm_head.bias)
        self.tie_weights()

    @property
    def context_length(self) -> int | None:
        return None

    def tied_weights(self) -> dict[str, str]:
        return {"lm_head.weight": "tok_embed.weight"} if self.config.tie_embeddings else {}

    def prune_groups(self) -> list[PruneGroup]:
        """Each layer's hidden units ("hidden"): unit j owns row j of every gate's input, recurrent
        and bias weights, column j of its own recurrent weights and of what reads its output (the
        next layer, or the LM head). One fused nn.LSTM/GRU/RNN holds every layer, so every layer
        keeps the same number."""
        c, gates, groups = self.config, GATES[self.config.arch], []
        for layer in range(c.n_layer):
            rows = [f"rnn.weight_ih_l{layer}", f"rnn.weight_hh_l{layer}"]
            rows += [f"rnn.bias_ih_l{layer}", f"rnn.bias_hh_l{layer}"] if c.bias else []
            top = "proj.weight" if self.proj is not None else "lm_head.weight"
            reader = f"rnn.weight_ih_l{layer + 1}" if layer + 1 < c.n_layer else top
            slices = [UnitSlice(name, 0, blocks=gates) for name in rows]
            slices += [UnitSlice(f"rnn.weight_hh_l{layer}", 1), UnitSlice(reader, 1)]
            groups.append(PruneGroup("hidden", layer, c.hidden_size, tuple(slices), uniform=True))
        return groups

    def pruned_config(self, kept: dict[str, list[int]]) -> ModelConfig:
        """d_hidden = the units every layer keeps; a tied head without a projection becomes untied (it
        now reads fewer units than the embedding has)."""
        sizes = set(kept.get("hidden", [self.config.hidden_size]))
        if len(sizes) != 1:
            raise ValueError(f"every recurrent layer keeps the same number of hidden units; got {sorted(sizes)}")
        (hidden,) = sizes
        tied = self.config.tie_embeddings and (self.proj is not None or hidden == self.config.d_model)
        return dataclasses.replace(self.config, d_hidden=hidden, tie_embeddings=tied)

    def layer_stacks(self) -> list[LayerStack]:
        """The fused layers; the first stays unless the embedding is as wide as the hidden state."""
        c = self.config
        return [LayerStack("layers", c.n_layer, r"rnn\.(?:weight|bias)_(?:ih|hh)_l(\d+)",
                           keeps_first=c.d_model != c.hidden_size)]

    def layers_config(self, keep: dict[str, Sequence[int]]) -> ModelConfig:
        return dataclasses.replace(self.config, n_layer=len(keep["layers"]))

    def lora_targets(self) -> dict[str, list[str]]:
        """The recurrent layers under the family's name (`lstm`: peft has no LoRA for them, and says
        so naming the layer type); embed and head when the head is untied (a tied table is one
        tensor for both, which an adapter on either would split)."""
        out = {self.config.arch: ["rnn"]}
        if not self.config.tie_embeddings:
            out.update(embed=["tok_embed"], head=["lm_head"])
        return out

    @classmethod
    def param_count(cls, config: ModelConfig) -> int:
        V, d, H, bias = config.vocab_size or 0, config.d_model, config.hidden_size, int(config.bias)
        gates = GATES[config.arch]
        layers = gates * H * (d - H + config.n_layer * (2 * H + 2 * bias))  # layer 0 reads d, the rest H
        head = (H * d if H != d else 0) if config.tie_embeddings else H * V  # a tied head's projection
        return V * d + layers + head + bias * V

    @classmethod
    def activation_bytes(cls, config: ModelConfig, tokens: int) -> int:
        # Per token: the embedding; per layer its input, the gates and the states kept for the
        # backward pass through time (and dropout masks); then the logits, as for a transformer.
        d, H, gates = config.d_model, config.hidden_size, GATES[config.arch]
        layers = d - H + config.n_layer * (gates + 4) * H
        return 4 * tokens * (d + layers + 3 * (config.vocab_size or 0))

    def tie_weights(self) -> None:
        """Also regroups the recurrent weights into one block (cuDNN wants them so after a load)."""
        super().tie_weights()
        if isinstance(self.rnn, nn.RNNBase) and self.rnn.weight_ih_l0.device.type != "meta":
            self.rnn.flatten_parameters()

    def new_decode_state(self, max_slots: int, max_len: int | None = None, *, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu") -> RecurrentState:
        return RecurrentState(STATE_TENSORS[self.config.arch], self.config.n_layer, max_slots,
                              self.config.hidden_size, dtype=dtype, device=device)

    def forward(self, idx: torch.Tensor, *, state: RecurrentState | None = None,
                rows: Rows | None = None) -> torch.Tensor:
        """Float32 logits [B, T, vocab] for token ids `idx` [B, T].

        Without `state`: every row starts from a zero state. With one: row b continues slot
        `rows.slots[b]` (or restarts it at `rows.starts[b]` = 0), only its first `rows.lengths[b]`
        tokens advance the slot, and its logits beyond them are padding.
        """
        B, T = idx.shape
        x = self.dropout(self._embed(idx))
        if state is None:
            out, _ = self._run(x, None, None)
        else:
            if rows is None or len(rows.slots) != B:
                raise ValueError(f"forward with a decode state needs rows: {B} slots, starts and lengths")
            out, states = self._run(x, state.read(rows), rows.lengths)
            state.write(rows, states)
        out = self.dropout(out)
        return self.lm_head(out if self.proj is None else self.proj(out)).float()

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token embeddings; while training with embed_dropout, whole rows of the table dropped
        (and the rest scaled up), one draw per forward."""
        p = self.config.embed_dropout
        if not (self.training and p > 0):
            return self.tok_embed(idx)
        weight = self.tok_embed.weight
        keep = torch.empty(weight.shape[0], 1, device=weight.device, dtype=weight.dtype).bernoulli_(1 - p) / (1 - p)
        return F.embedding(idx, weight * keep)

    def embed(self, idx: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """The mean of the top layer's outputs over each row's real tokens (from a zero state)."""
        out, _ = self._run(self.tok_embed(idx), None, tuple(lengths))
        return mean_pool(out, lengths)

    def _run(self, x: torch.Tensor, states: tuple[torch.Tensor, ...] | None,
             lengths: tuple[int, ...] | None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The recurrent layers over x [B, T, d_model]: (outputs [B, T, hidden], final states)."""
        T = x.shape[1]
        hx = None if states is None else states if len(states) == 2 else states[0]
        padded = lengths is not None and min(lengths) < T
        inputs = pack_padded_sequence(x, torch.tensor(lengths), batch_first=True, enforce_sorted=False) \
            if padded else x
        with _native_kernels() if T < ONEDNN_MIN_STEPS else contextlib.nullcontext():
            out, final = self._recur(inputs, hx)
        if padded:
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
        return out, final if isinstance(final, tuple) else (final,)

    def _recur(self, inputs: Any, hx: Any) -> tuple[Any, Any]:
        """The recurrent layers; while training with weight_drop, through hidden-to-hidden matrices
        with entries dropped (DropConnect: one mask per matrix and forward, the rest scaled up)."""
        p = self.config.weight_drop
        if not (self.training and p > 0):
            return self.rnn(inputs, hx)
        dropped = {name: F.dropout(w, p) for name, w in self.rnn.named_parameters() if name.startswith("weight_hh")}
        with warnings.catch_warnings():  # the dropped matrices are not one contiguous block: expected
            warnings.filterwarnings("ignore", message=".*not part of single contiguous chunk.*")
            return torch.func.functional_call(self.rnn, dropped, (inputs, hx))

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 * (recurrent weight matrices + projection + LM head); the
        gates' elementwise work is left out."""
        matmul = sum(p.numel() for name, p in self.rnn.named_parameters() if name.startswith("weight"))
        projection = self.proj.weight.numel() if self.proj is not None else 0
        return 6 * (matmul + projection + self.lm_head.weight.numel())


@contextlib.contextmanager
def _native_kernels():
    """torch's own recurrent kernels for the calls inside (oneDNN's off)."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def _check_config(config: ModelConfig) -> None:
    """The cross-field checks build_config does, for configs constructed directly."""
    if not config.vocab_size:
        raise UserError("model.vocab_size is not set (it normally comes from the tokenizer)")
    if config.arch not in RNN_CLASSES:
        raise UserError(f"model.arch={config.arch} is not a recurrent family ({', '.join(RNN_CLASSES)})")
