"""The optimizer a run trains with (`train.optimizer`): AdamW for every parameter, or Muon for the
hidden weight matrices with AdamW for the rest.

Muon (torch.optim.Muon) orthogonalises each matrix's momentum with a few Newton-Schulz steps, so
every direction of the update moves at the same rate; it is meant for the 2-D matrices between
the embeddings and the head (`LanguageModel.hidden_matrices`). Embedding tables, the head, biases
and norm gains keep AdamW. `MuonAdamW` is one torch Optimizer over both, so Accelerate, gradient
accumulation, the learning-rate schedule and the resumable state see a single optimizer.
"""

from __future__ import annotations

from typing import Any

import torch

from llmcli.config import TrainConfig
from llmcli.models.base import LanguageModel

LR_RATIO = "lr_ratio"  # a group's peak lr over train.lr: the schedule scales every group alike


def make_optimizer(model: LanguageModel, t: TrainConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW over model.param_groups, or Muon over the hidden matrices and AdamW over the rest."""
    adamw = dict(lr=t.lr, betas=(t.beta1, t.beta2), fused=fused or None)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(model.param_groups(t.weight_decay), **adamw)
    matrices = model.hidden_matrices()
    chosen = {id(p) for p in matrices}
    rest = [{**group, "params": [p for p in group["params"] if id(p) not in chosen]}
            for group in model.param_groups(t.weight_decay)]
    muon = [{"params": matrices, "weight_decay": t.weight_decay, LR_RATIO: t.muon_lr / t.lr}]
    return MuonAdamW(muon, [g for g in rest if g["params"]], lr=t.muon_lr, adamw=adamw)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's lr for this step: train.lr's groups get `lr`, Muon's its share of it."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get(LR_RATIO, 1.0)


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon over `muon_groups` and torch.optim.AdamW over `adamw_groups`, as one optimizer:
    its param_groups are theirs (Muon's first) and one state dict serves both."""

    def __init__(self, muon_groups: list[dict[str, Any]], adamw_groups: list[dict[str, Any]], *, lr: float,
                 adamw: dict[str, Any]):
        self.muon = torch.optim.Muon(muon_groups, lr=lr)
        self.adamw = torch.optim.AdamW(adamw_groups, **adamw)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})
        self._share()

    def _share(self) -> None:
        """Point both inner optimizers at this one's groups and state (after init and each load)."""
        split = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:split], self.param_groups[split:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss
