"""The deterministic pieces of training: the learning-rate schedule and the batch windows."""

import numpy as np
import pytest
import torch

from llmcli.config import TrainConfig
from llmcli.train.schedule import RandomWindows, lr_at


def test_lr_schedule_warmup_then_cosine():
    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, t) == pytest.approx(0.1)
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55)
    assert lr_at(110, t) == pytest.approx(0.1)
    assert lr_at(500, t) == pytest.approx(0.1)
    budget = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=None, max_minutes=1.0)
    assert lr_at(5, budget, elapsed=30.0) == pytest.approx(0.5)


def test_random_windows_are_deterministic_and_shifted():
    tokens = np.arange(1000, dtype=np.uint16)
    windows = RandomWindows(tokens, block_size=16, batch_size=4, seed=3)
    x, y = windows.batch(5, 1)
    x2, _ = windows.batch(5, 1)
    x3, _ = windows.batch(6, 1)
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.dtype == torch.long and x.shape == (4, 16)
