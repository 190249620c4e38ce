"""The memory estimate follows the strategy: sharding divides the state by the world size, and a run
that does not fit is told which strategy would."""

from __future__ import annotations

import pytest
import torch

from llmcli.config_loader import load_config
from llmcli.errors import UserError
from llmcli.train import memory
from llmcli.train.memory import check_fits, estimate

BASE = ["model.vocab_size=256", "model.n_layer=4", "model.d_model=256", "model.n_head=4", "model.block_size=64"]


def cfg(*extra: str):
    return load_config(None, [*BASE, *extra])


def test_fsdp_over_two_processes_holds_about_half_of_ddp():
    ddp = estimate(cfg(), world=2).state_bytes
    assert estimate(cfg("train.strategy=fsdp"), world=2).state_bytes == pytest.approx(ddp / 2, rel=0.01)
    assert estimate(cfg("train.strategy=fsdp", "train.fsdp_sharding=shard_grad_op"), world=2).state_bytes \
        == pytest.approx(ddp * 5 / 8, rel=0.01)  # whole float32 weights, the rest halved
    zero3 = estimate(cfg("train.strategy=deepspeed", "train.zero_stage=3"), world=2)
    assert zero3.state_bytes < estimate(cfg("train.strategy=deepspeed", "train.zero_stage=1"), world=2).state_bytes
    assert estimate(cfg("train.strategy=fsdp"), world=1).state_bytes == ddp


def test_a_run_that_fits_only_sharded_is_told_to_shard(monkeypatch):
    need = estimate(cfg(), world=2)
    room = need.activation_bytes + need.state_bytes * 3 // 4  # fits FSDP's half, not DDP's whole
    monkeypatch.setattr(memory, "available_bytes", lambda device: (room, "available"))
    with pytest.raises(UserError, match=r"train\.strategy=fsdp would need") as refused:
        check_fits(cfg(), torch.device("cpu"), world=2)
    assert "\n" not in str(refused.value)
    check_fits(cfg("train.strategy=fsdp"), torch.device("cpu"), world=2)


def test_a_run_too_big_for_this_world_names_how_many_processes_would_do(monkeypatch):
    need = estimate(cfg(), world=1)
    monkeypatch.setattr(memory, "available_bytes", lambda device: (need.activation_bytes + need.state_bytes // 3 + 1,
                                                                   "available"))
    with pytest.raises(UserError, match=r"would fit on 3 or more processes"):
        check_fits(cfg(), torch.device("cpu"), world=2)
