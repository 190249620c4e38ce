"""Weight averaging: the run evaluates an average of its weights and writes it to its checkpoints,
while training goes on with the live weights.

* `WeightAverage` (`train.ema_decay`): an exponential moving average. After optimizer step n
  (counting from 1) it moves towards the live weights by 1 - d_n, d_n = min(ema_decay, n / (n + 9)):
  early on, while the weights move fast, it follows them closely, later it averages over about
  1 / (1 - ema_decay) steps.
* `SnapshotAverage` (`train.average_last`): the plain mean of the weights at the last K
  evaluations (fairseq's average_checkpoints over the last K checkpoints, kept in memory).

The average (and the snapshots) are part of the resumable state (`state/average.safetensors`), so
a resumed run averages exactly as an uninterrupted one.
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


class Average:
    """An average of `model`'s trainable parameters (tied ones once); the subclasses say which."""

    def __init__(self, model: torch.nn.Module):
        self.names, self.params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
        self.average = [p.detach().clone() for p in self.params]

    def after_step(self, step: int) -> None:
        """Called after optimizer step `step`."""

    def before_evaluation(self) -> None:
        """Called before the run evaluates (and saves) the average."""

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

    def tensors(self) -> dict[str, torch.Tensor]:
        """What `save` writes, by name."""
        return dict(zip(self.names, self.average, strict=True))

    def restore(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        """Take back what `tensors` wrote (read from `path`)."""
        self._copy(tensors, self.names, self.average, path)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        tensors = {name: t.contiguous() for name, t in self.tensors().items()}
        atomic_write(directory / FILE, lambda tmp: save_file(tensors, str(tmp)))

    def load(self, directory: Path) -> None:
        from llmcli.train.state import read_tensors

        path = directory / FILE
        self.restore(read_tensors(path), path)

    def _copy(self, tensors: dict[str, torch.Tensor], names: list[str] | tuple[str, ...],
              into: list[torch.Tensor], path: Path) -> None:
        if not set(names) <= set(tensors):
            raise UserError(f"{path} does not hold this model's parameters (was train.ema_decay or "
                            "train.average_last changed after the run started?)")
        for name, target in zip(names, into, strict=True):
            if tensors[name].shape != target.shape:
                raise UserError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, the model "
                                f"{tuple(target.shape)}")
            target.copy_(tensors[name])


class WeightAverage(Average):
    """The exponential moving average (`train.ema_decay`, see the module docstring)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        super().__init__(model)
        self.decay = decay

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        torch._foreach_lerp_(self.average, [p.detach() for p in self.params], 1.0 - decay_at(step, self.decay))


class SnapshotAverage(Average):
    """The mean of the weights at the last `count` evaluations (`train.average_last`)."""

    def __init__(self, model: torch.nn.Module, count: int):
        super().__init__(model)
        self.count = count
        self.snapshots: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def before_evaluation(self) -> None:
        self.snapshots = [*self.snapshots, [p.detach().clone() for p in self.params]][-self.count:]
        for i, average in enumerate(self.average):
            average.copy_(torch.stack([snapshot[i] for snapshot in self.snapshots]).mean(0))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**super().tensors(), **{f"snapshot.{k}.{name}": t for k, snapshot in enumerate(self.snapshots)
                                        for name, t in zip(self.names, snapshot, strict=True)}}

    def restore(self, tensors: dict[str, torch.Tensor], path: Path) -> None:
        super().restore(tensors, path)
        saved = len({name.split(".")[1] for name in tensors if name.startswith("snapshot.")})
        self.snapshots = [[torch.empty_like(p) for p in self.average] for _ in range(min(saved, self.count))]
        first = saved - len(self.snapshots)  # a smaller average_last on resume keeps the latest
        for k, snapshot in enumerate(self.snapshots):
            self._copy(tensors, [f"snapshot.{first + k}.{name}" for name in self.names], snapshot, path)
