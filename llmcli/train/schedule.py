"""The deterministic pieces of training: every random choice is a function of (seed, step).

So a run that stops and resumes computes the same thing as one that never stopped:
- batch windows come from a generator seeded with (seed, step, micro-batch index), where the
  micro-batch index counts across processes, so 2 processes x 1 micro-batch see exactly the
  sequences of 1 process x 2 micro-batches;
- the learning rate is a pure function of the step (no scheduler object to restore);
- the counters below are saved beside Accelerate's model, optimizer and RNG state.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from llmcli.config import TrainConfig


def lr_at(step: int, t: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warmup, then cosine decay to min_lr, or warmup-stable-decay (train.schedule=wsd: lr
    until the last decay_fraction, then linear to min_lr); over steps, or over the time budget."""
    # 1) linear warmup
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    # 2) how far through the decay: by steps, or by the fraction of the wall-clock budget used
    decay_steps = t.lr_decay_steps or t.max_steps
    if decay_steps is not None:
        progress = (step - t.warmup_steps) / max(1, decay_steps - t.warmup_steps)
    else:
        progress = elapsed / (t.max_minutes * 60)
    progress = min(max(progress, 0.0), 1.0)
    if t.schedule == "wsd":
        # 3) hold lr, then decay linearly to min_lr over the last decay_fraction
        decayed = max(0.0, progress - (1.0 - t.decay_fraction)) / t.decay_fraction
        return t.lr + decayed * (t.min_lr - t.lr)
    # 3) cosine decay down to min_lr
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)


def steps_per_epoch(train_tokens: int, tokens_per_step: int) -> int:
    """Optimizer steps that draw as many tokens as the training split holds (one epoch)."""
    return max(1, math.ceil(train_tokens / tokens_per_step))


def with_epochs(t: TrainConfig, epoch_steps: int) -> TrainConfig:
    """`t` with max_steps counted from max_epochs (unchanged when training by steps or time)."""
    if t.max_epochs is None:
        return t
    return dataclasses.replace(t, max_steps=t.max_epochs * epoch_steps)


class RandomWindows:
    """Random windows of block_size+1 tokens from a token array (nanoGPT-style batches)."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int):
        self.tokens, self.block_size, self.batch_size, self.seed = tokens, block_size, batch_size, seed

    def batch(self, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `index` of optimizer step `step`."""
        return self._windows(np.random.default_rng([self.seed, 0, step, index]))

    def eval_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The index-th of a fixed set of batches, the same at every evaluation."""
        return self._windows(np.random.default_rng([self.seed, 1, index]))

    def _windows(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        windows = np.stack([self.tokens[s : s + self.block_size + 1] for s in starts])
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1], windows[:, 1:]


class StreamWindows:
    """Consecutive windows of parallel streams (train.stateful: truncated backpropagation through
    time with the hidden state carried). The tokens are cut into `streams` equal contiguous parts;
    micro-batch `index` of a step reads rows index*batch_size ... of them, each the next block_size
    tokens of its stream. After a pass over the streams the next pass starts again from their
    beginnings, shifted by a random offset below block_size (from seed and pass), so windows do not
    always cut the text at the same places; `continues(step)` is False at each pass's first step."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, streams: int, seed: int):
        self.tokens, self.block_size, self.batch_size, self.seed = tokens, block_size, batch_size, seed
        self.length = len(tokens) // streams
        self.steps_per_pass = (self.length - 1) // block_size - 1
        if self.steps_per_pass < 1:
            raise ValueError(f"train.stateful: {len(tokens)} tokens cut into {streams} streams leave fewer than "
                             f"2 windows of {block_size} per stream")

    def continues(self, step: int) -> bool:
        """Whether step `step` reads on where step - 1 stopped (its streams' states carry over)."""
        return step % self.steps_per_pass != 0

    def batch(self, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch `index` of optimizer step `step`."""
        passes, window = divmod(step, self.steps_per_pass)
        offset = int(np.random.default_rng([self.seed, 3, passes]).integers(self.block_size))
        rows = index * self.batch_size + np.arange(self.batch_size)
        starts = rows * self.length + offset + window * self.block_size
        windows = np.stack([self.tokens[s : s + self.block_size + 1] for s in starts])
        windows = torch.from_numpy(windows.astype(np.int64))
        return windows[:, :-1], windows[:, 1:]


@dataclass
class TrainState:
    """Progress counters, saved as state/trainer_state.json beside Accelerate's own state."""

    step: int = 0
    tokens_seen: int = 0
    elapsed: float = 0.0
    best_val_loss: float = math.inf
    best_step: int = -1

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
