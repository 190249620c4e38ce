"""Unstructured magnitude pruning with torch.nn.utils.prune: the smallest weights become zeros.

Every weight matrix of the model's layers (projections, MLP, recurrent layers, an untied LM head;
not the embedding tables) is pruned by L1 magnitude, either over all of them at once (`global`:
one threshold, so layers lose different shares) or each by the same share (`layer`). The masks are
then made permanent (`prune.remove`), leaving plain dense tensors with zeros, which the checkpoint
stores as values + bitmask (llmcli/prune/storage.py). On CUDA, `semi_structured` keeps the two
largest of every four weights along each row (2:4), the pattern sparse tensor cores run (stored
the same way).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

from llmcli.errors import UserError
from llmcli.models.base import LanguageModel


def targets(model: LanguageModel) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every weight matrix magnitude pruning applies to."""
    tied = {alias.rpartition(".")[0] for alias in model.tied_weights()}
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) or name in tied:
            continue
        for pname, param in module.named_parameters(recurse=False):
            if param.dim() == 2 and pname.startswith("weight"):
                out.append((module, pname))
    return out


def prune(model: LanguageModel, sparsity: float, scope: str) -> LanguageModel:
    """Zero `sparsity` of the targeted weights in place (see the module docstring); the model."""
    params = targets(model)
    if not params:
        raise UserError(f"model.arch={model.config.arch} has no weight matrices to prune")
    if scope == "global":
        tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=sparsity)
    else:
        for module, name in params:
            tprune.l1_unstructured(module, name, amount=sparsity)
    for module, name in params:
        tprune.remove(module, name)
    _refresh_recurrent(model)
    return model


def semi_structured(model: LanguageModel, device: torch.device) -> LanguageModel:
    """2:4 sparsity, on CUDA only: in every group of four weights along a row of each nn.Linear
    weight (rows a multiple of 4 wide) the two smallest become zeros, the pattern that
    torch.sparse.to_sparse_semi_structured and sparse tensor cores take."""
    if device.type != "cuda":
        raise UserError("--method 2:4 needs a CUDA GPU with sparse tensor cores (semi-structured sparse "
                        "kernels do not run on the CPU); use --method magnitude here")
    with torch.no_grad():
        for module, name in targets(model):
            weight = getattr(module, name)
            if isinstance(module, nn.Linear) and weight.shape[1] % 4 == 0:
                groups = weight.reshape(weight.shape[0], -1, 4)
                keep = groups.abs().topk(2, dim=-1).indices
                mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
                weight.mul_(mask.reshape(weight.shape))
    return model


def sparsity_of(model: LanguageModel) -> float:
    """The share of zeros among the targeted weights."""
    params = [getattr(module, name) for module, name in targets(model)]
    total = sum(p.numel() for p in params)
    return sum(int((p == 0).sum()) for p in params) / max(1, total)


def _refresh_recurrent(model: nn.Module) -> None:
    """Recurrent layers keep a list of their weights for the fused kernel: point it at the new ones."""
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            module._init_flat_weights()
