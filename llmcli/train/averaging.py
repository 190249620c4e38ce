"""Weight averaging (`train.ema_decay`): an exponential moving average of the parameters, which the
run evaluates and writes to its checkpoints while training goes on with the live weights.

After optimizer step n (counting from 1) the average moves towards the live weights by 1 - d_n,
d_n = min(ema_decay, n / (n + 9)): early on, while the weights move fast, it follows them closely,
later it averages over about 1 / (1 - ema_decay) steps. The average is part of the resumable state
(`state/average.safetensors`), so a resumed run averages exactly as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from llmcli.errors import UserError
from llmcli.io import atomic_write

FILE = "average.safetensors"


def decay_at(step: int, decay: float) -> float:
    """The decay applied after optimizer step `step` (1, 2, ...)."""
    return min(decay, step / (step + 9))


class WeightAverage:
    """The moving average of `model`'s trainable parameters (tied ones once)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names, self.params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
        self.average = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average after optimizer step `step`."""
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay_at(step, self.decay))

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own again after it."""
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self.params], self.average)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], live)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        tensors = {name: t.contiguous() for name, t in zip(self.names, self.average, strict=True)}
        atomic_write(directory / FILE, lambda tmp: save_file(tensors, str(tmp)))

    def load(self, directory: Path) -> None:
        from llmcli.train.state import read_tensors

        path = directory / FILE
        tensors = read_tensors(path)
        if set(tensors) != set(self.names):
            raise UserError(f"{path} does not hold this model's parameters (was train.ema_decay turned on "
                            "after the run started?)")
        for name, average in zip(self.names, self.average, strict=True):
            if tensors[name].shape != average.shape:
                raise UserError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, the model "
                                f"{tuple(average.shape)}")
            average.copy_(tensors[name])
