"""Checkpoint directories: what a run writes and what eval/generate read back.

A checkpoint directory holds `model.safetensors`, `model.json` (the model config), `tokenizer.json`,
`config.yaml` (the effective config of the run that made it) and `checkpoint.json` (step and
metrics). A run directory is itself a checkpoint (its final weights) with `best/` and `last/`
checkpoint directories and a `state/` directory for exact resume.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from llmcli.config import Config
from llmcli.errors import UserError
from llmcli.io import atomic_replace_dir, atomic_write_json

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model.json"
TOKENIZER = "tokenizer.json"
RUN_CONFIG = "config.yaml"
INFO = "checkpoint.json"
CHECKPOINT_FILES = (WEIGHTS, MODEL_CONFIG, TOKENIZER, RUN_CONFIG, INFO)


def write_checkpoint(directory: Path, model: Any, cfg: Config, tokenizer_path: Path,
                     info: dict[str, Any]) -> None:
    """Write a complete checkpoint directory atomically (a reader never sees half of one)."""
    from llmcli.model import save_model

    def build(tmp: Path) -> None:
        save_model(model, tmp)
        shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
        cfg.save(tmp / RUN_CONFIG)
        atomic_write_json(tmp / INFO, info)

    atomic_replace_dir(directory, build)


def link_checkpoint(source: Path, target_dir: Path) -> None:
    """Make `target_dir` show the checkpoint files of `source` (hard links: no extra disk space)."""
    for name in CHECKPOINT_FILES:
        src = source / name
        if not src.exists():
            continue
        tmp = target_dir / f".{name}.link"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, target_dir / name)


def resolve_checkpoint(path: str | Path) -> Path:
    """The directory holding the weights for `path` (a run dir, or its best/ or last/)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise UserError(f"checkpoint must be a directory: {path}")
    if (path / WEIGHTS).is_file():
        return path
    for sub in ("last", "best"):
        if (path / sub / WEIGHTS).is_file():
            return path / sub
    raise UserError(f"no {WEIGHTS} in {path} (is it a run or checkpoint directory?)")


def read_info(directory: Path) -> dict[str, Any]:
    try:
        return json.loads((directory / INFO).read_text())
    except (OSError, ValueError):
        return {}
