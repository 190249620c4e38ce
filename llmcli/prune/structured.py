"""Structured pruning: remove whole attention heads (kv groups), MLP units and recurrent hidden
units, ranked by how much the loss would change without them.

A unit's importance is the first-order Taylor estimate of the loss change when every weight it
owns is zeroed, |sum over those weights of w * dL/dw|, summed over a few calibration batches of the
run's own training data (Molchanov et al., 2019). Within a part (heads, mlp, hidden) the units
with the lowest scores go, ranked across all layers, or within each layer where the family needs
every layer the same size. The family (`LanguageModel.prune_groups` / `pruned`) says which weights
a unit owns and builds the smaller dense model.

Whole layers (`--layers N`) go first: each removable layer's score is the rise of the mean
calibration loss when that layer alone is left out (measured, not estimated: a first-order
estimate is poor for a change that large), and the N lowest go, every stack (a seq2seq model's
encoder and decoder) keeping one. The family (`layer_stacks` / `without_layers`) renumbers the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F

from llmcli.errors import UserError
from llmcli.models.base import LanguageModel, PruneGroup
from llmcli.train.finetune import IGNORE

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]
UNIT_NAMES = {"heads": "attention head", "mlp": "MLP unit", "hidden": "hidden unit"}


def importance(model: LanguageModel, batches: Iterable[Batch]) -> dict[tuple[str, int], torch.Tensor]:
    """Per (part, layer): one score per unit (see the module docstring)."""
    groups = model.prune_groups()
    scores = {(g.part, g.layer): torch.zeros(g.units, dtype=torch.float64) for g in groups}
    was_training = model.training
    model.eval()  # no dropout: the scores are of the model as it predicts
    for inputs, labels in batches:
        model.zero_grad(set_to_none=True)
        logits = model(**inputs)
        F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE).backward()
        for group in groups:
            scores[group.part, group.layer] += _taylor(model, group).abs()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return scores


def _taylor(model: LanguageModel, group: PruneGroup) -> torch.Tensor:
    """sum of w * dL/dw over each unit's weights in `group`: [units]."""
    total = torch.zeros(group.units, dtype=torch.float64)
    for where in group.slices:
        param = model.get_parameter(where.name)
        if param.grad is None:
            continue
        product = (param.detach() * param.grad).double().movedim(where.dim, 0)
        owned = product[where.index(group.units, range(group.units)).to(product.device)]
        total += owned.reshape(where.blocks, group.units, where.size, -1).sum(dim=(0, 2, 3)).cpu()
    return total


def select(groups: list[PruneGroup], scores: dict[tuple[str, int], torch.Tensor],
           fractions: dict[str, float]) -> dict[str, list[list[int]]]:
    """The units to keep, per part and layer: `fractions[part]` of the part's units removed, the
    lowest-scoring first. A layer left with none of a part's units is refused."""
    keep: dict[str, list[list[int]]] = {}
    for part, fraction in fractions.items():
        layers = sorted((g for g in groups if g.part == part), key=lambda g: g.layer)
        if not layers:
            raise UserError(f"--{part}: this model has no {UNIT_NAMES.get(part, part)}s to prune")
        if any(g.uniform for g in layers):  # the same count in every layer, each its own best
            removed = [_lowest(scores[part, g.layer], round(fraction * g.units)) for g in layers]
        else:
            flat = torch.cat([scores[part, g.layer] for g in layers])
            owner = torch.cat([torch.full((g.units,), i) for i, g in enumerate(layers)])
            offset = torch.cat([torch.arange(g.units) for g in layers])
            gone = _lowest(flat, round(fraction * flat.numel()))
            removed = [{int(offset[j]) for j in gone if int(owner[j]) == i} for i in range(len(layers))]
        keep[part] = []
        for g, out in zip(layers, removed, strict=True):
            kept = [u for u in range(g.units) if u not in out]
            if not kept:
                raise UserError(f"--{part} {fraction:g} would remove every {UNIT_NAMES.get(part, part)} of "
                                f"{g.where}; prune less (a layer needs at least one)")
            keep[part].append(kept)
    return keep


def _lowest(scores: torch.Tensor, count: int) -> set[int]:
    """The indices of the `count` lowest scores (ties: the lower index goes first)."""
    order = sorted(range(scores.numel()), key=lambda i: (float(scores[i]), i))
    return set(order[:count])


def parts_of(model: LanguageModel) -> list[str]:
    """The parts ("heads", "mlp", "hidden") a model's structured pruning can remove units of."""
    return list(dict.fromkeys(g.part for g in model.prune_groups()))


def layer_losses(model: LanguageModel, batches: Sequence[Batch]) -> dict[tuple[str, int], float]:
    """Per (stack, layer) that may go: how much the mean calibration loss rises without it alone."""
    base = _loss(model, batches)
    out = {}
    for stack in model.layer_stacks():
        for layer in range(1 if stack.keeps_first else 0, stack.layers if stack.layers > 1 else 0):
            shallower = model.without_layers({stack.name: [i for i in range(stack.layers) if i != layer]})
            out[stack.name, layer] = _loss(shallower, batches) - base
    return out


def _loss(model: LanguageModel, batches: Sequence[Batch]) -> float:
    """The mean cross-entropy over `batches`, without dropout."""
    was_training = model.training
    with torch.no_grad():
        total = sum(float(F.cross_entropy(model.eval()(**inputs).flatten(0, 1), labels.flatten(), ignore_index=IGNORE))
                    for inputs, labels in batches)
    model.train(was_training)
    return total / len(batches)


def select_layers(model: LanguageModel, losses: dict[tuple[str, int], float], count: int) -> dict[str, list[int]]:
    """The layers to keep per stack: `count` removed, those whose removal raises the loss least,
    every stack keeping at least one. Asking for more than can go is refused."""
    stacks = model.layer_stacks()
    left = {stack.name: stack.layers for stack in stacks}
    gone: set[tuple[str, int]] = set()
    for name, layer in sorted(losses, key=lambda key: (losses[key], key)):
        if len(gone) < count and left[name] > 1:
            gone.add((name, layer))
            left[name] -= 1
    if len(gone) < count:
        total = sum(stack.layers for stack in stacks)
        first = "; a first layer that reads the embeddings stays" if any(s.keeps_first for s in stacks) else ""
        keeps = "it keeps one" if len(stacks) == 1 else f"{' and '.join(s.name for s in stacks)} keep one each"
        raise UserError(f"--layers {count}: at most {len(gone)} of this model's {total} layers can go "
                        f"({keeps}{first})")
    return {stack.name: [i for i in range(stack.layers) if (stack.name, i) not in gone] for stack in stacks}


def prune(model: LanguageModel, fractions: dict[str, float], batches: Iterable[Batch], layers: int = 0
          ) -> tuple[LanguageModel, dict[str, list[int]]]:
    """The smaller dense model (see the module docstring) and the layers removed from each stack:
    whole layers first (by the loss their removal adds), then units of what is left."""
    batches = list(batches)
    groups = model.prune_groups() if fractions else []
    fractions = {part: f for part, f in fractions.items() if f > 0}
    missing = [part for part in fractions if not any(g.part == part for g in groups)]
    if missing:
        raise UserError(f"--{missing[0]}: this model has no {UNIT_NAMES.get(missing[0], missing[0])}s to prune")
    removed: dict[str, list[int]] = {}
    if layers:
        keep = select_layers(model, layer_losses(model, batches), layers)
        sizes = {stack.name: stack.layers for stack in model.layer_stacks()}
        removed = {name: [i for i in range(sizes[name]) if i not in kept] for name, kept in keep.items()}
        model = model.without_layers(keep)
    if fractions:
        model = model.pruned(select(model.prune_groups(), importance(model, batches), fractions))
    return model, {name: layers for name, layers in removed.items() if layers}
