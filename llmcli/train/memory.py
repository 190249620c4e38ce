"""Will the run fit? An estimate from the config alone, checked before anything is allocated.

Training holds, per process, the float32 weights, their gradients and AdamW's two moments (16
bytes a parameter under DDP; an upper bound with train.optimizer=muon, which keeps one moment for
the matrices it updates; FSDP and DeepSpeed ZeRO divide some or all of it by the number of
processes, see `state_bytes`), plus what the forward pass keeps for the backward one (the
family's `activation_bytes` for one micro-batch; activation checkpointing is not credited). A run
that needs more than the memory available is refused with the estimate and the strategy that
would fit, instead of allocating for minutes and dying.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from llmcli.config import Config, TrainConfig
from llmcli.errors import UserError
from llmcli.models.registry import FAMILIES
from llmcli.ui import format_bytes

BYTES_PER_PARAMETER = 16  # float32 weight + gradient + AdamW exp_avg + exp_avg_sq


@dataclass(frozen=True)
class Estimate:
    parameters: int
    state_bytes: int  # weights, gradients, optimizer: on the device
    activation_bytes: int
    offloaded_bytes: int = 0  # the part of the state train.cpu_offload keeps in CPU memory

    @property
    def total(self) -> int:
        """What the device must hold."""
        return self.state_bytes + self.activation_bytes

    def describe(self) -> str:
        text = (f"~{format_bytes(self.state_bytes)} for weights, gradients and optimizer state + "
                f"~{format_bytes(self.activation_bytes)} of activations per process")
        return text + (f" (+ ~{format_bytes(self.offloaded_bytes)} offloaded to CPU memory)" if self.offloaded_bytes else "")


def estimate(cfg: Config, vocab_size: int | None = None, world: int = 1) -> Estimate:
    """What one process of this run needs under its strategy and world size; `vocab_size` stands
    in when the config leaves it open."""
    model = cfg.model if cfg.model.vocab_size or not vocab_size else _with_vocab(cfg, vocab_size).model
    family = FAMILIES[model.arch]
    parameters = family.param_count(model)
    tokens = cfg.train.batch_size * model.block_size
    on_device, offloaded = state_bytes(cfg.train, parameters, world)
    return Estimate(parameters, on_device, family.activation_bytes(model, tokens), offloaded)


def state_bytes(t: TrainConfig, parameters: int, world: int) -> tuple[int, int]:
    """(on the device, offloaded to CPU memory): one process's share of the weights, gradients and
    optimizer state under t's strategy over `world` processes."""
    P, W = parameters, max(1, world)
    if t.strategy == "fsdp":  # float32 weights sharded too (full_shard) or whole between steps
        weights = 4 * P / W if t.fsdp_sharding == "full_shard" else 4 * P
        device, host = weights + 12 * P / W, 0.0
        if t.cpu_offload:
            device, host = 0.0, device
    elif t.strategy == "deepspeed":  # low-precision weights and gradients, float32 master + moments
        width = 2 if t.mixed_precision in ("bf16", "fp16") else 4
        weights = width * P / (W if t.zero_stage == 3 else 1)
        grads = width * P / (W if t.zero_stage >= 2 else 1)
        optimizer = 12 * P / W
        device, host = weights + grads + optimizer, 0.0
        if t.cpu_offload:
            host = optimizer + (weights if t.zero_stage == 3 else 0)
            device -= host
    else:
        device, host = BYTES_PER_PARAMETER * P, 0.0
    return int(device), int(host)


def available_bytes(device: torch.device) -> tuple[int, str]:
    """Memory this process may use on `device`, and what it is (for the message)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device}"
    share = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # processes on this machine share its memory
    return _mem_available() // max(1, share), "available" + (f" per process ({share} here)" if share > 1 else "")


def check_fits(cfg: Config, device: torch.device, vocab_size: int | None = None, world: int = 1) -> None:
    """A one-line UserError when the run cannot fit (unless train.check_memory is false); it
    suggests the strategy or offload that would."""
    if not cfg.train.check_memory:
        return
    need = estimate(cfg, vocab_size, world)
    have, what = available_bytes(device)
    if need.total > have:
        raise UserError(
            f"this run needs about {format_bytes(need.total)} per process ({need.parameters:,} parameters: "
            f"{format_bytes(need.state_bytes)} for weights, gradients and optimizer state under "
            f"train.strategy={cfg.train.strategy} with {world} process(es); "
            f"~{format_bytes(need.activation_bytes)} of activations for a micro-batch of "
            f"{cfg.train.batch_size} x {cfg.model.block_size} tokens), but {format_bytes(have)} is {what}; "
            + _suggestion(cfg, vocab_size, world, have, device.type == "cuda")
            + "shrink model.* or train.batch_size (train.grad_accum keeps the batch), or set "
            "train.check_memory=false to try anyway")


def _suggestion(cfg: Config, vocab_size: int | None, world: int, have: int, on_gpu: bool) -> str:
    """The strategy (and, on a GPU, offload) that would fit, if one would."""
    t = cfg.train
    fsdp = _with_train(cfg, strategy="fsdp", fsdp_sharding="full_shard", cpu_offload=False)
    if t.strategy != "fsdp" or t.fsdp_sharding != "full_shard":
        need = estimate(fsdp, vocab_size, world).total
        if need <= have:
            return f"train.strategy=fsdp would need ~{format_bytes(need)} per process; "
    if on_gpu and not t.cpu_offload:
        need = estimate(_with_train(fsdp, cpu_offload=True), vocab_size, world).total
        if need <= have:
            return ("train.strategy=fsdp train.cpu_offload=true (weights and optimizer state in CPU memory) "
                    f"would need ~{format_bytes(need)} of GPU memory per process; ")
    alone = estimate(fsdp, vocab_size, 1)
    room = have - alone.activation_bytes
    processes = -(-alone.state_bytes // room) if room > 0 else 0
    if processes > world:
        return (f"sharded by train.strategy=fsdp it would fit on {processes} or more processes with this much "
                "memory each (more GPUs or machines); ")
    return ""


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _with_vocab(cfg: Config, vocab_size: int) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))


def _with_train(cfg: Config, **changes) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))
