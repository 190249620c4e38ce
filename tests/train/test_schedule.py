"""The deterministic pieces of training: the learning-rate schedule and the batch windows."""

import numpy as np
import pytest
import torch

from llmcli.config import TrainConfig
from llmcli.train.schedule import RandomWindows, StreamWindows, lr_at


def test_lr_schedule_warmup_then_cosine():
    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, t) == pytest.approx(0.1)
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55)
    assert lr_at(110, t) == pytest.approx(0.1)
    assert lr_at(500, t) == pytest.approx(0.1)
    budget = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=None, max_minutes=1.0)
    assert lr_at(5, budget, elapsed=30.0) == pytest.approx(0.5)


def test_lr_schedule_warmup_stable_decay():
    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule="wsd", decay_fraction=0.2)
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(50, t) == lr_at(90, t) == 1.0  # stable until the last fifth of the 100 decay steps
    assert lr_at(100, t) == pytest.approx(0.55)
    assert lr_at(110, t) == pytest.approx(0.1)
    budget = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=None, max_minutes=1.0, schedule="wsd",
                         decay_fraction=0.5)
    assert lr_at(5, budget, elapsed=20.0) == 1.0 and lr_at(5, budget, elapsed=45.0) == pytest.approx(0.5)


def test_stream_windows_continue_each_stream_and_restart_each_pass():
    tokens = np.arange(4000, dtype=np.uint16)
    windows = StreamWindows(tokens, block_size=10, batch_size=2, streams=4, seed=0)
    assert windows.length == 1000 and windows.steps_per_pass == 98
    for step in range(1, 97):
        assert windows.continues(step)
        for index in range(2):
            before, _ = windows.batch(step - 1, index)
            x, y = windows.batch(step, index)
            assert torch.equal(x[:, 0], before[:, -1] + 1)  # each row reads on in its own stream
            assert torch.equal(x[:, 1:], y[:, :-1])
    assert not windows.continues(98) and not windows.continues(0)
    rows = torch.cat([windows.batch(0, 0)[0], windows.batch(0, 1)[0]])
    assert torch.equal(rows[:, 0] // 1000, torch.arange(4))  # four streams, one per quarter
    assert all(len(set(windows.batch(p * 98, 0)[0][:, 0].tolist())) == 2 for p in range(3))


def test_random_windows_are_deterministic_and_shifted():
    tokens = np.arange(1000, dtype=np.uint16)
    windows = RandomWindows(tokens, block_size=16, batch_size=4, seed=3)
    x, y = windows.batch(5, 1)
    x2, _ = windows.batch(5, 1)
    x3, _ = windows.batch(6, 1)
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.dtype == torch.long and x.shape == (4, 16)


def test_stream_windows_read_across_token_shards(tmp_path):
    """A corpus prepared into several shards streams exactly as the same tokens in one array."""
    from llmcli.data.shards import TokenShards

    tokens = np.arange(4000, dtype=np.uint16)
    sizes = [1300, 1400, 1300]  # streams of 1000 tokens: most of them cross a shard boundary
    paths = []
    for i, part in enumerate(np.split(tokens, np.cumsum(sizes)[:-1])):
        paths.append(tmp_path / f"train-{i:05d}.bin")
        part.tofile(paths[-1])
    sharded = StreamWindows(TokenShards(paths, np.uint16, sizes), block_size=10, batch_size=2, streams=4, seed=0)
    whole = StreamWindows(tokens, block_size=10, batch_size=2, streams=4, seed=0)
    for step in (0, 1, 50, 97, 98, 200):
        for index in range(2):
            assert all(torch.equal(a, b) for a, b in zip(sharded.batch(step, index), whole.batch(step, index),
                                                          strict=True))
