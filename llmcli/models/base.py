"""The interface every model family provides, so that no command needs to know which one it holds.

A family is an `nn.Module` subclass of `LanguageModel` that:
* maps token ids [B, T] to float32 logits [B, T, vocab] (`forward(idx)`: training and scoring);
* decodes incrementally: `new_decode_state(max_slots, max_len)` makes whatever carries a sequence
  from one step to the next (a KV cache, a recurrent hidden state, an encoder's memory), one slot
  per sequence in flight, and `forward(idx, state=state, rows=rows)` reads and advances the slots
  that `rows` names;
* says how much it costs (`flops_per_token`) and which weights it shares (`tied_weights`);
* where it has attention, shows it (`attention_maps`: the weights of one real forward pass, for
  `llmcli attention`); the default refuses, naming the family;
* names its repeated blocks for sharded training (`shard_units`);
* says why it cannot train on rows of several packed pairs (`packing_refusal`, None where it can);
* says whether it exports to `transformers` (`exports_to_hf`) and why llama.cpp cannot run it
  (`gguf_refusal`, None where it can);
* names what LoRA may adapt in its own terms (`lora_targets`);
* turns token ids into one vector per sequence (`embed`: `llmcli embed`, serve's /v1/embeddings),
  pooled as its `pooling` says, over at most `embedding_input_length` tokens;
* says which units structured pruning may remove (`prune_groups`: attention heads, MLP units,
  recurrent hidden units) and gives the smaller dense model that keeps some of them (`pruned`,
  with the new shape in its config), and which whole layers may go (`layer_stacks`,
  `without_layers`); the defaults refuse, naming the family.

Decode states also provide `copy_slots(sources, targets)` (slot targets[i] becomes a copy of
slot sources[i], all read before any is written): beam search forks and reorders hypotheses so.
Families with `rewinds_decode_state` can go back to an earlier position of a slot by writing from
there again (a KV cache, whose attention never reads past a query's position; not a recurrent
state): speculative decoding rolls rejected guesses back so.
Families with `compiles_decode` also take `BucketRows` (one token for each of the slots 0..n-1,
positions as a device tensor) in place of `Rows`, so that a compiled decode step has no host-side
integers to specialise on. Families with `pages_decode_state` can also keep their keys/values in a pool of blocks
(`new_paged_decode_state`: a paged KV cache whose `set_blocks(slot, blocks)` says which blocks hold
a slot's positions; the engine shares them out) and say what one position costs
(`kv_bytes_per_token`), so that a memory budget becomes a number of blocks.

Sequence-to-sequence families (`task = "seq2seq"`) map a source sequence to a target one. Their
`forward(idx, source=..., source_lengths=...)` gives the target-side logits of the decoder inputs
`idx` given padded sources (teacher forcing: training and scoring), and `encode(source,
state=state, rows=rows)` runs the encoder once per source and keeps its memory (for a transformer
the cross-attention keys and values) in each row's slot, beside the decoder's own state; decoding
then goes through `forward(idx, state=state, rows=rows)` as for a language model. Commands ask
`task` (and `source_length`, `source_vocab_size`) rather than which family they hold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from llmcli.config import ModelConfig
from llmcli.errors import UserError


@dataclass(frozen=True)
class Rows:
    """Where each row of a batch lives in a decode state: its slot, the position of its first
    token, and how many of its tokens are real (the rest is right padding). Plain host-side
    integers, so that a model never reads them back from the device. `adapters`: which LoRA
    adapter each row uses when several are served on one base (llmcli/adapters.py reads it; the
    families never do); None or 0: the base."""

    slots: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    adapters: tuple[int, ...] | None = None

    def __init__(self, slots: Sequence[int], starts: Sequence[int], lengths: Sequence[int],
                 adapters: Sequence[int] | None = None):
        object.__setattr__(self, "slots", tuple(int(s) for s in slots))
        object.__setattr__(self, "starts", tuple(int(s) for s in starts))
        object.__setattr__(self, "lengths", tuple(int(n) for n in lengths))
        object.__setattr__(self, "adapters", None if adapters is None else tuple(int(a) for a in adapters))
        if not len(self.slots) == len(self.starts) == len(self.lengths):
            raise ValueError("rows need one slot, start and length per row")


@dataclass(frozen=True)
class BucketRows:
    """One token for each of the slots 0..n-1 of a decode state, slot b's at position positions[b]
    (a device tensor [n]; -1: the slot does not decode in this step, its row writes nowhere that is
    read and its output means nothing). What a compiled decode step passes (families with
    `compiles_decode`): no host-side integers, so one graph serves every step of n rows."""

    positions: torch.Tensor


@dataclass(frozen=True)
class AttentionMap:
    """One kind of attention in one forward pass (batch of 1): `weights` [layers, heads, queries,
    keys], float32, every row a probability distribution over the keys.

    `queries` and `keys` name the token sequences along each axis, in order: "text" (the tokens
    the maps were asked for) and "generated" (tokens generated after or for them). A decoder-only
    model's self-attention over text + generated tokens has both on both axes; a seq2seq model's
    cross-attention has queries ("generated",) (the target) and keys ("text",) (the source), its
    decoder self-attention keys ("decoder input",) (the tokens the decoder read: its start token,
    then the target but the last).
    """

    name: str  # e.g. "self-attention", "cross-attention"
    weights: torch.Tensor
    queries: tuple[str, ...] = ("text",)
    keys: tuple[str, ...] = ("text",)


@dataclass(frozen=True)
class UnitSlice:
    """Where a parameter holds a layer's prunable units: along `dim`, from entry `offset` on, it is
    `blocks` blocks (an LSTM's four gates, a bidirectional layer's two directions) of `units * size`
    entries, unit i owning entries [i*size, (i+1)*size) of each block (a head owns head_dim rows of
    a projection). Entries outside them belong to other groups or to no unit, and are kept."""

    name: str
    dim: int
    blocks: int = 1
    size: int = 1
    offset: int = 0

    def index(self, units: int, keep: Sequence[int]) -> torch.Tensor:
        """The entries along `dim` that the units `keep` own, block by block, in order."""
        unit = torch.as_tensor(list(keep), dtype=torch.long)[:, None] * self.size + torch.arange(self.size)
        blocks = torch.arange(self.blocks)[:, None] * units * self.size
        return (self.offset + blocks + unit.flatten()[None]).flatten()


@dataclass(frozen=True)
class PruneGroup:
    """One layer's units of one part ("heads", "mlp", "hidden") and the parameter slices each owns.
    `layer` numbers the part's groups (0, 1, ...); `label` names the layer in messages.
    `uniform`: every group of this part must keep the same number (one config size holds them all)."""

    part: str
    layer: int
    units: int
    slices: tuple[UnitSlice, ...]
    uniform: bool = False
    label: str = ""

    @property
    def where(self) -> str:
        return self.label or f"layer {self.layer}"


@dataclass(frozen=True)
class LayerStack:
    """A stack of layers that `llmcli prune --layers` may shorten: its `name` ("layers", "encoder",
    "decoder"), how many `layers` it has, the state-dict names each layer owns (`pattern`, a regular
    expression whose first group is the layer's index), and the `slices` of shared parameters each
    layer owns (UnitSlices whose unit is a whole layer). `keeps_first`: the first layer reads the
    embeddings at another width than the rest take, so it cannot go."""

    name: str
    layers: int
    pattern: str
    slices: tuple[UnitSlice, ...] = ()
    keeps_first: bool = False


def _cut(state: dict[str, torch.Tensor], cuts: Iterable[tuple[UnitSlice, int, Sequence[int]]]) -> None:
    """Drop, in place, the entries that the removed units own: each cut is (slice, units, removed)."""
    kept: dict[tuple[str, int], torch.Tensor] = {}
    for where, units, gone in cuts:
        mask = kept.setdefault((where.name, where.dim), torch.ones(state[where.name].shape[where.dim], dtype=torch.bool))
        mask[where.index(units, gone)] = False
    for (name, dim), mask in kept.items():
        state[name] = state[name].index_select(dim, mask.nonzero().flatten().to(state[name].device))


def _renumbered(name: str, stacks: list[LayerStack], keep: dict[str, Sequence[int]]) -> str | None:
    """`name` with its layer's index among the kept layers; None when its layer is removed."""
    for stack in stacks:
        if (match := re.fullmatch(stack.pattern, name)) is not None:
            kept, layer = list(keep.get(stack.name, range(stack.layers))), int(match.group(1))
            return None if layer not in kept else name[:match.start(1)] + str(kept.index(layer)) + name[match.end(1):]
    return name


def mean_pool(hidden: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """The mean over each row's first lengths[b] positions of `hidden` [B, T, d], as float32 [B, d]."""
    real = (torch.arange(hidden.shape[1], device=hidden.device)[None, :]
            < torch.as_tensor(list(lengths), device=hidden.device)[:, None]).to(hidden.dtype)
    return ((hidden * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)).float()


def kept_of(sizes: list[int] | None, kept: Sequence[int]) -> list[int] | None:
    """The per-layer `sizes` (None: no per-layer sizes) of the layers `kept`."""
    return None if sizes is None else [sizes[i] for i in kept]


def stack_layers(weights: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    """Layers' attention weights [heads, queries, keys] (batch row 0 of each) as one [layers, ...]
    tensor; a structurally pruned model whose layers have different head counts is refused."""
    heads = [w.shape[1] for w in weights]
    if len(set(heads)) > 1:
        raise UserError(f"{name}: the layers of this pruned model have {', '.join(map(str, heads))} heads; attention "
                        "maps need the same number in every layer")
    return torch.stack([w[0].float() for w in weights])


class LanguageModel(nn.Module):
    """Base class of every model family (see the module docstring)."""

    config: ModelConfig
    # Modules holding token embedding tables (`quantize --include-embeddings` applies to these).
    token_embeddings: tuple[str, ...] = ("tok_embed",)
    # Why this family's weights cannot be split across processes (train.strategy=fsdp, DeepSpeed
    # ZeRO-3), or None when they can; a run asking for it is refused with this reason.
    partition_refusal: str | None = None
    # Why rows of several packed (source, target) pairs (train.pack_pairs) cannot train this family,
    # or None when its forward takes them (source_segments / target_segments).
    packing_refusal: str | None = "its forward reads one sequence or pair per row"
    # Whether `llmcli export --format hf` has a `transformers` class to write this family as.
    exports_to_hf: bool = False
    # Why llama.cpp (`llmcli export --format gguf`) cannot run this family, naming what can; None
    # for the families it runs.
    gguf_refusal: str | None = "llama.cpp runs decoder-only transformer language models only"
    # Whether a slot can go back to an earlier position by writing from there (speculative decoding needs it).
    rewinds_decode_state: bool = False
    # Whether new_paged_decode_state gives a block-paged KV cache (memory follows actual lengths).
    pages_decode_state: bool = False
    # Whether forward(idx, state=..., rows=BucketRows(...)) decodes slots 0..n-1 (a compiled decode step).
    compiles_decode: bool = False
    # "lm": continues a sequence; "seq2seq": maps a source sequence to a target (see the module docstring).
    task: str = "lm"

    # How `embed` pools a sequence into one vector, in words (docs and /v1/embeddings say it).
    pooling: str = "none"

    def forward(self, idx: torch.Tensor, *, state: Any = None, rows: Rows | None = None) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, idx: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """Float32 [B, d] sequence embeddings of token ids `idx` [B, T] (row b's first lengths[b] are
        real; the rest is right padding), pooled as `pooling` says. A seq2seq family reads `idx` as
        sources."""
        raise UserError(f"model.arch={self.config.arch!r} has no sequence embeddings")

    @property
    def embedding_input_length(self) -> int | None:
        """The most tokens `embed` takes per sequence (None: no limit)."""
        return self.source_length if self.task == "seq2seq" else self.context_length

    def encode(self, source: torch.Tensor, *, state: Any, rows: Rows) -> None:
        """seq2seq: encode `source` [B, S] (row b's first `rows.lengths[b]` tokens are real) into slot
        `rows.slots[b]` of `state`, ready for the decoder's first step."""
        raise NotImplementedError(f"model.arch={self.config.arch} has no encoder (it is a {self.task} model)")

    @property
    def source_length(self) -> int | None:
        """seq2seq: the most source tokens (its end token included) the encoder takes; None for an LM."""
        return None

    @property
    def source_vocab_size(self) -> int | None:
        """seq2seq: the size of the source vocabulary; None for an LM."""
        return None

    def new_decode_state(self, max_slots: int, max_len: int | None = None, *, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu") -> Any:
        """Room for `max_slots` sequences of up to `max_len` tokens (default: the context length)."""
        raise NotImplementedError

    def new_paged_decode_state(self, max_slots: int, num_blocks: int, block_len: int, *, dtype: torch.dtype,
                               device: torch.device | str) -> Any:
        """A decode state for `max_slots` sequences whose keys/values live in `num_blocks` blocks of
        `block_len` positions (families with `pages_decode_state`)."""
        raise UserError(f"model.arch={self.config.arch} has no paged KV cache (its decode state is a fixed size "
                        "per sequence)")

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of decode state one more token costs, in `dtype` (families with `pages_decode_state`)."""
        raise UserError(f"model.arch={self.config.arch} has no KV cache that grows per token")

    @property
    def shard_units(self) -> tuple[type[nn.Module], ...]:
        """The module classes FSDP wraps one by one (each gathered whole for its own forward and
        backward, then freed again): a family's repeated blocks. Empty: the model is one unit."""
        return ()

    @property
    def context_length(self) -> int | None:
        """The most tokens a sequence can attend to; None if the family has no limit."""
        return self.config.block_size

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward); a forward pass costs a third of it."""
        raise NotImplementedError

    def attention_maps(self, idx: torch.Tensor, generated: torch.Tensor | None = None) -> list[AttentionMap]:
        """The attention weights of a forward pass over token ids `idx` [1, T] (and `generated`
        [1, G], tokens the model produced after or for them), computed by the same code as
        `forward`. A seq2seq family reads `idx` as the source and `generated` as the decoder's
        inputs (see Seq2SeqModel.attention_maps). Families without attention keep this refusal."""
        raise UserError(f"model.arch={self.config.arch!r} has no attention weights to show "
                        "(it is not an attention model)")

    @classmethod
    def param_count(cls, config: ModelConfig) -> int:
        """Parameters a model of `config` has, without allocating it (for the memory check that
        runs before anything is built). Families with a formula override this; this default builds
        the model on the meta device."""
        with torch.device("meta"):
            return cls(config).num_params()

    @classmethod
    def activation_bytes(cls, config: ModelConfig, tokens: int) -> int:
        """About what training keeps for the backward pass of one micro-batch of `tokens` tokens,
        in float32: a rough bound (a few dozen values per token, layer and width), plus the logits."""
        return 4 * tokens * (24 * config.n_layer * config.d_model + 3 * (config.vocab_size or 0))

    def tied_weights(self) -> dict[str, str]:
        """State-dict names that are the same tensor as another: {alias: source}."""
        return {}

    def prune_groups(self) -> list[PruneGroup]:
        """The units structured pruning may remove, per part and layer. Families without any keep
        this refusal."""
        raise UserError(f"model.arch={self.config.arch!r} has no structured pruning (llmcli prune --method "
                        "magnitude works for every family)")

    def pruned_config(self, kept: dict[str, list[int]]) -> ModelConfig:
        """The config of this model with `kept[part][layer]` units left in each group."""
        raise UserError(f"model.arch={self.config.arch!r} has no structured pruning")

    def pruned(self, keep: dict[str, list[Sequence[int]]]) -> LanguageModel:
        """A smaller dense copy keeping units `keep[part][layer]` (sorted indices) of every group:
        each parameter loses the entries that removed units own (along every dim some group cuts)."""
        state = dict(self.state_dict())
        _cut(state, ((where, group.units, sorted(set(range(group.units)) - set(keep[group.part][group.layer])))
                     for group in self.prune_groups() if group.part in keep for where in group.slices))
        return self._rebuilt(self.pruned_config({part: [len(k) for k in layers] for part, layers in keep.items()}),
                             state)

    def layer_stacks(self) -> list[LayerStack]:
        """The stacks whole layers may be removed from. Families without any keep this refusal."""
        raise UserError(f"model.arch={self.config.arch!r} has no layer removal (llmcli prune --layers)")

    def layers_config(self, keep: dict[str, Sequence[int]]) -> ModelConfig:
        """The config of this model with only layers `keep[stack]` of each stack (per-layer sizes follow)."""
        raise UserError(f"model.arch={self.config.arch!r} has no layer removal (llmcli prune --layers)")

    def without_layers(self, keep: dict[str, Sequence[int]]) -> LanguageModel:
        """A shallower copy keeping layers `keep[stack]` (sorted indices) of every stack: a kept layer's
        tensors are renumbered, a removed one's dropped, with their slices of shared parameters."""
        stacks = self.layer_stacks()
        state: dict[str, torch.Tensor] = {}
        for name, tensor in self.state_dict().items():
            if (renamed := _renumbered(name, stacks, keep)) is not None:
                state[renamed] = tensor
        _cut(state, ((where, stack.layers, sorted(set(range(stack.layers)) - set(keep.get(stack.name, ()))))
                     for stack in stacks if stack.name in keep for where in stack.slices))
        return self._rebuilt(self.layers_config(keep), self.layers_state(state, keep))

    def layers_state(self, state: dict[str, torch.Tensor], keep: dict[str, Sequence[int]]) -> dict[str, torch.Tensor]:
        """`state` of the layers `keep`, renumbered, with what else follows the layers (a transformer's
        value-embedding tables); the default keeps the rest as it is."""
        return state

    def _rebuilt(self, config: ModelConfig, state: dict[str, torch.Tensor]) -> LanguageModel:
        """A model of `config` holding `state` (copies), in this model's train/eval mode."""
        with torch.device("meta"):
            model = type(self)(config)
        model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
        model.tie_weights()
        return model.train(self.training)

    def lora_targets(self) -> dict[str, list[str]]:
        """LoRA targets in this family's terms: {term: the names of the modules it adapts}.

        The default offers every leaf module with weights under its own name (`blocks.0.mlp.fc` is
        `fc`); families rename them (a transformer's `q` is every block's query projection). Whether
        peft can adapt a module's layer type is peft's to say when the adapter is added.
        """
        out: dict[str, list[str]] = {}
        for name, module in self.named_modules():
            if name and next(module.children(), None) is None and next(module.parameters(False), None) is not None:
                out.setdefault(name.rpartition(".")[2], []).append(name)
        return out

    def tie_weights(self) -> None:
        """Point every alias back at its source (after loading with `load_state_dict(assign=True)`,
        which gives each name its own Parameter)."""
        for alias, source in self.tied_weights().items():
            owner, _, name = alias.rpartition(".")
            module = self.get_submodule(owner)
            if isinstance(getattr(module, name, None), nn.Parameter):  # a quantized head has none
                setattr(module, name, self.get_parameter(source))

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, tied weights once; `non_embedding` leaves out every embedding table."""
        total = sum(p.numel() for p in self.parameters())  # parameters() already dedups ties
        if non_embedding:
            total -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return total

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The weight matrices between the embeddings and the head (what Muon updates): every 2-D
        trainable parameter except embedding tables and the LM head."""
        outside = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        outside.add(id(self.get_parameter("lm_head.weight")))
        return [p for p in self.parameters() if p.requires_grad and p.dim() == 2 and id(p) not in outside]

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups: decay matrices and embeddings (>= 2-D), not biases or norm weights."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
