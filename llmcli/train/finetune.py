"""What fine-tuning adds to a run: the model it starts from, the files it carries, example windows.

* `starting_model`: a fresh model, a checkpoint's weights (`--init-from`), or that checkpoint frozen
  with a LoRA adapter on it (`train.lora.r`); a quantized base keeps its integer weights (QLoRA-style).
* `carried_files`: what the run's checkpoints keep from the base: its chat template
  (tokenizer_config.json), its end tokens (generation_config.json), and for an adapter the pointer
  to the base (base.json).
* `ExampleWindows`: batches of instruction examples (data.format alpaca/chat), each window starting
  at an example's first token, targets outside the loss mask set to IGNORE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from llmcli import lora
from llmcli.checkpoint import (
    BASE,
    GENERATION_CONFIG,
    TOKENIZER_CONFIG,
    adapter_base,
    base_pointer,
    load_model,
    mark_pruned,
    read_pruning,
    read_quantization,
    resolve_checkpoint,
)
from llmcli.config import Config
from llmcli.errors import UserError
from llmcli.models.base import LanguageModel
from llmcli.models.registry import build_model
from llmcli.quantize.modules import swap_in_quantized_modules

IGNORE = -100  # a target that carries no loss (F.cross_entropy's ignore_index)


def check_lora_plan(cfg: Config, init_from: Path | None) -> None:
    """Refuse a LoRA run that has no base, or whose targets the model does not have (before any work)."""
    if cfg.train.lora.r is None:
        return
    if init_from is None:
        raise UserError("train.lora needs --init-from RUN: the base checkpoint the adapter is trained on")
    with torch.device("meta"):
        lora.add_adapter(_base_model(cfg, resolve_checkpoint(init_from)), cfg.train.lora)


def _base_model(cfg: Config, base: Path) -> LanguageModel:
    """A model of `cfg.model` with the base's layer types (quantized ones too), weights not loaded."""
    model = build_model(cfg.model)
    entry = read_quantization(base)
    if entry is not None:
        swap_in_quantized_modules(model, entry)
    return model


def starting_model(cfg: Config, init_from: Path | None, run_dir: Path, resume: bool) -> LanguageModel:
    """The model the run trains, with its starting weights (on resume Accelerate restores them)."""
    if cfg.train.lora.r is None:
        model = build_model(cfg.model)
        if init_from is not None and not resume:
            model.load_state_dict(load_model(resolve_checkpoint(init_from)).state_dict())
        return mark_pruned(model, _structured_pruning(run_dir if resume else init_from))
    base = adapter_base(run_dir) if resume else resolve_checkpoint(init_from)
    model = _base_model(cfg, base)
    if not resume:
        model.load_state_dict(load_model(base).state_dict())
    return lora.add_adapter(model, cfg.train.lora)


def _structured_pruning(source: Path | None) -> dict | None:
    """The `pruning` entry a structurally pruned base hands on to the run (its shape stays pruned;
    the zeros of magnitude pruning would not survive training)."""
    entry = read_pruning(resolve_checkpoint(source)) if source is not None and source.exists() else None
    return entry if entry is not None and entry.get("method") == "structured" else None


def carried_files(cfg: Config, init_from: Path | None, run_dir: Path, resume: bool) -> dict[str, bytes]:
    """Files every checkpoint of the run carries over from its base (see the module docstring)."""
    source = run_dir if resume else (resolve_checkpoint(init_from) if init_from is not None else None)
    if source is None:
        return {}
    files = {name: (source / name).read_bytes() for name in (TOKENIZER_CONFIG, GENERATION_CONFIG)
             if (source / name).is_file()}
    if cfg.train.lora.r is not None:
        files[BASE] = (run_dir / BASE).read_bytes() if resume else base_pointer(source)
    return files


def describe_trainable(model: torch.nn.Module, cfg: Config) -> str | None:
    """A log line for an adapter run: what it adapts and how many weights train."""
    if not lora.is_adapted(model):
        return None
    trainable, total = lora.trainable_parameters(model), sum(p.numel() for p in model.parameters())
    spec = cfg.train.lora
    return (f"LoRA r={spec.r} alpha={spec.alpha:g} on {', '.join(spec.targets)}: {trainable:,} trainable "
            f"parameters ({100 * trainable / total:.2f}% of {total:,}); the base stays frozen")


class ExampleWindows:
    """Windows of block_size+1 tokens that each start at an example's first token.

    `mask[i]` says whether token i carries loss; a window past the end of the data is padded with
    `pad` (no loss). Examples with no loss-carrying token within a window are never drawn.
    """

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, starts: np.ndarray, block_size: int,
                 batch_size: int, seed: int, pad: int, split: str):
        self.tokens, self.mask, self.block_size, self.batch_size = tokens, mask, block_size, batch_size
        self.seed, self.pad = seed, pad
        usable = [s for s in starts if mask[s + 1: s + block_size + 1].any()]
        if not usable:
            raise UserError(f"no {split} example has a response within model.block_size={block_size} tokens "
                            "(the prompts are longer than the context)")
        self.starts = np.asarray(usable, dtype=np.int64)
        self.skipped = len(starts) - len(usable)

    def batch(self, step: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(np.random.default_rng([self.seed, 0, step, index]))

    def eval_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._windows(np.random.default_rng([self.seed, 1, index]))

    def _windows(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        width = self.block_size + 1
        ids = np.full((self.batch_size, width), self.pad, dtype=np.int64)
        loss = np.zeros((self.batch_size, width), dtype=bool)
        for row, start in enumerate(rng.choice(self.starts, size=self.batch_size)):
            piece = slice(start, min(start + width, len(self.tokens)))
            n = piece.stop - piece.start
            ids[row, :n], loss[row, :n] = self.tokens[piece], self.mask[piece]
        x, y = torch.from_numpy(ids[:, :-1]), torch.from_numpy(ids[:, 1:])
        return x, y.masked_fill(~torch.from_numpy(loss[:, 1:]), IGNORE)
