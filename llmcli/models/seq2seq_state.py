"""What a sequence-to-sequence decoder keeps per slot besides its own state: the encoder's memory.

`SourceMemory` holds, for every slot, tensors computed once from that slot's source (a
transformer's cross-attention keys and values per decoder layer; a recurrent model's attention
keys and encoder outputs) and the source's length, so that every decode step attends to the
source without running the encoder again. A new sequence overwrites its slot's memory; positions
past its source length are masked, whatever an earlier occupant left there.

`Seq2SeqModel.attention_maps` runs one teacher-forced forward with a `Record`: each attention
appends its weights [B, heads, queries, keys] under its kind (`ENCODER_SELF`, `DECODER_SELF`,
`CROSS`), in the order the forward computes them (layer by layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmcli.models.base import AttentionMap, LanguageModel, Rows, stack_layers

ENCODER_SELF, DECODER_SELF, CROSS = "encoder self-attention", "decoder self-attention", "cross-attention"
# What each kind attends from and to: the source is "text"; a decoder position is named by the
# target token it produces ("generated") as a query, and by the token it reads ("decoder input") as a key.
AXES = {ENCODER_SELF: (("text",), ("text",)), DECODER_SELF: (("generated",), ("decoder input",)),
        CROSS: (("generated",), ("text",))}
Record = dict[str, list[torch.Tensor]]


class Seq2SeqModel(LanguageModel):
    """What every sequence-to-sequence family shares: `src_embed` (None when the sides share one
    table) and `tgt_embed`, an `lm_head` tied to `tgt_embed` when the config says so, and the
    source's context and vocabulary from the config."""

    @property
    def token_embeddings(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("tgt_embed",) if self.src_embed is None else ("src_embed", "tgt_embed")

    @property
    def source_length(self) -> int:
        return self.config.source_context

    @property
    def source_vocab_size(self) -> int:
        return self.config.source_vocab_size

    def tied_weights(self) -> dict[str, str]:
        return {"lm_head.weight": "tgt_embed.weight"} if self.config.tie_embeddings else {}

    def attention_maps(self, idx: torch.Tensor, generated: torch.Tensor | None = None) -> list[AttentionMap]:
        """The weights of one teacher-forced forward: `idx` is the source [1, S] (its end token
        included) and `generated` the decoder's inputs [1, G] (its start token, then the target
        tokens but the last), so that query t is the step that produces target token t."""
        if idx.shape[0] != 1:
            raise ValueError(f"attention maps are for one sequence; got a batch of {idx.shape[0]}")
        if generated is None or generated.shape[1] == 0:
            raise ValueError("a seq2seq model's maps need the decoder's inputs (its start token first)")
        record: Record = {}
        with torch.no_grad():
            self(generated.to(idx.device), source=idx, record=record)
        return [AttentionMap(kind, stack_layers(weights, kind), *AXES[kind])
                for kind, weights in record.items()]


class SourceMemory:
    """Per-slot tensors over source positions: tensor i has shape [max_slots, *shapes[i]], its
    source positions along dimension `seq_dims[i]` (counting the slot dimension as 0)."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], seq_dims: Sequence[int], max_slots: int, max_source: int,
                 *, dtype: torch.dtype, device: torch.device | str):
        self.max_slots, self.max_source, self.seq_dims = max_slots, max_source, list(seq_dims)
        self.tensors = [torch.zeros(max_slots, *shape, dtype=dtype, device=device) for shape in shapes]
        self.lengths = [0] * max_slots

    def _check(self, rows: Rows) -> None:
        if not rows.slots:
            raise ValueError("a decode step needs rows: one slot, start and length per row")
        if min(rows.slots) < 0 or max(rows.slots) >= self.max_slots:
            raise ValueError(f"slots must be in [0, {self.max_slots}); got {min(rows.slots)}..{max(rows.slots)}")

    def write(self, rows: Rows, tensors: Sequence[torch.Tensor]) -> None:
        """Store each row's tensors (the first `rows.lengths[b]` source positions of row b are real)."""
        self._check(rows)
        longest = max(rows.lengths)
        if min(rows.lengths) < 1 or longest > self.max_source:
            raise ValueError(f"source lengths must be in [1, {self.max_source}]; got {min(rows.lengths)}..{longest}")
        slots = torch.tensor(rows.slots, device=self.tensors[0].device)
        for memory, new, dim in zip(self.tensors, tensors, self.seq_dims, strict=True):
            index = [slice(None)] * memory.dim()
            index[0], index[dim] = slots, slice(0, new.shape[dim])
            memory[tuple(index)] = new.to(memory.dtype)
        for slot, length in zip(rows.slots, rows.lengths, strict=True):
            self.lengths[slot] = length

    def read(self, rows: Rows, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The rows' tensors, cut to the longest of their sources, and mask [B, width] (True = a real
        source position)."""
        self._check(rows)
        lengths = [self.lengths[slot] for slot in rows.slots]
        if min(lengths) < 1:
            raise ValueError("a slot was decoded before its source was encoded")
        width = max(lengths)
        first, count = rows.slots[0], len(rows.slots)
        consecutive = rows.slots == tuple(range(first, first + count))
        index = slice(first, first + count) if consecutive else torch.tensor(rows.slots, device=device)
        out = []
        for memory, dim in zip(self.tensors, self.seq_dims, strict=True):
            cut = [slice(None)] * memory.dim()
            cut[dim] = slice(0, width)
            out.append(memory[index][tuple(cut)])
        mask = torch.arange(width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        return out, mask

    def copy_slots(self, sources: list[int], targets: list[int]) -> None:
        """Slot targets[i] becomes a copy of slot sources[i] (all read before any is written)."""
        src, dst = torch.tensor(sources), torch.tensor(targets)
        for memory in self.tensors:
            memory[dst.to(memory.device)] = memory[src.to(memory.device)]
        lengths = [self.lengths[s] for s in sources]
        for slot, length in zip(targets, lengths, strict=True):
            self.lengths[slot] = length


def key_padding_mask(lengths: torch.Tensor | Sequence[int], width: int, device: torch.device) -> torch.Tensor | None:
    """[B, width] with True at each row's first lengths[b] positions; None when nothing is padding."""
    lengths = torch.as_tensor(lengths, device=device)
    if bool((lengths >= width).all()):
        return None
    return torch.arange(width, device=device)[None, :] < lengths[:, None]
