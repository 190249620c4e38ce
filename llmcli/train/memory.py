"""Will the run fit? An estimate from the config alone, checked before anything is allocated.

Training holds, per process, the float32 weights, their gradients and AdamW's two moments (16
bytes a parameter), plus what the forward pass keeps for the backward one (the family's
`activation_bytes` for one micro-batch). A run that needs more than the memory available is
refused with the estimate, instead of allocating for minutes and dying.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from llmcli.config import Config
from llmcli.errors import UserError
from llmcli.models.registry import FAMILIES

BYTES_PER_PARAMETER = 16  # float32 weight + gradient + AdamW exp_avg + exp_avg_sq
GiB = 1 << 30


@dataclass(frozen=True)
class Estimate:
    parameters: int
    state_bytes: int  # weights, gradients, optimizer
    activation_bytes: int

    @property
    def total(self) -> int:
        return self.state_bytes + self.activation_bytes


def estimate(cfg: Config, vocab_size: int | None = None) -> Estimate:
    """What one process of this run needs; `vocab_size` stands in when the config leaves it open."""
    model = cfg.model if cfg.model.vocab_size or not vocab_size else _with_vocab(cfg, vocab_size).model
    family = FAMILIES[model.arch]
    parameters = family.param_count(model)
    tokens = cfg.train.batch_size * model.block_size
    return Estimate(parameters, BYTES_PER_PARAMETER * parameters, family.activation_bytes(model, tokens))


def available_bytes(device: torch.device) -> tuple[int, str]:
    """Memory this process may use on `device`, and what it is (for the message)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device}"
    share = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # processes on this machine share its memory
    return _mem_available() // max(1, share), "available" + (f" per process ({share} here)" if share > 1 else "")


def check_fits(cfg: Config, device: torch.device, vocab_size: int | None = None) -> None:
    """A one-line UserError when the run cannot fit (unless train.check_memory is false)."""
    if not cfg.train.check_memory:
        return
    need = estimate(cfg, vocab_size)
    have, what = available_bytes(device)
    if need.total > have:
        raise UserError(
            f"this run needs about {need.total / GiB:.1f} GiB per process ({need.parameters:,} parameters: "
            f"{need.state_bytes / GiB:.1f} GiB for weights, gradients and AdamW state; "
            f"~{need.activation_bytes / GiB:.1f} GiB of activations for a micro-batch of "
            f"{cfg.train.batch_size} x {cfg.model.block_size} tokens), but {have / GiB:.1f} GiB is {what}; "
            "shrink model.* or train.batch_size (train.grad_accum keeps the batch), or set "
            "train.check_memory=false to try anyway")


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
