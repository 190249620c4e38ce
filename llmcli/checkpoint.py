"""Checkpoint directories: the one place that knows their files and how a model is saved and loaded.

A checkpoint directory holds `model.safetensors` (the weights; a tied weight is stored once),
`model.json` (the model config, plus a `quantization` entry for a checkpoint written by
`llmcli quantize`), `tokenizer.json`, `config.yaml` (the effective config of the run that made it)
and `checkpoint.json` (step, metrics, provenance). A run directory is itself a checkpoint (its final
weights) with `best/` and `last/` checkpoint directories and a `state/` directory for exact resume.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from llmcli.config import Config, ModelConfig, build_config
from llmcli.errors import UserError
from llmcli.io import (
    atomic_replace_dir,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    read_json_object,
    refuse_overlap,
)
from llmcli.models.base import LanguageModel
from llmcli.models.registry import build_model
from llmcli.quantize import modules as quantized

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model.json"
TOKENIZER = "tokenizer.json"
RUN_CONFIG = "config.yaml"
INFO = "checkpoint.json"
CHECKPOINT_FILES = (WEIGHTS, MODEL_CONFIG, TOKENIZER, RUN_CONFIG, INFO)
QUANTIZATION_KEY = "quantization"  # the model.json entry of a quantized checkpoint


# --------------------------------------------------------------------------------------------
# Weights + model config


def save_model(model: LanguageModel, directory: str | Path) -> None:
    """Write `model.safetensors` and `model.json` into `directory`, each atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    aliases = model.tied_weights()
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items() if name not in aliases}
    model_json: dict[str, Any] = dataclasses.asdict(model.config)
    entry = quantized.quantization_of(model)
    if entry is not None:
        model_json[QUANTIZATION_KEY] = entry
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(directory / MODEL_CONFIG, model_json)


def model_config_from_json(path: str | Path) -> ModelConfig:
    """Read and validate a model.json; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model config not found: {path}")
    raw = read_json_object(path, what="a JSON object of model settings")
    raw.pop(QUANTIZATION_KEY, None)  # not a model setting: see read_quantization
    return build_config({"model": raw}, {f"model.{key}": str(path) for key in raw}).model


def read_quantization(directory: str | Path) -> dict | None:
    """The `quantization` entry of a checkpoint's model.json, or None for a float checkpoint."""
    path = Path(directory) / MODEL_CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # model_config_from_json reports unreadable files
    if not isinstance(raw, dict) or QUANTIZATION_KEY not in raw:
        return None
    return quantized.parse_quantization(raw[QUANTIZATION_KEY], str(path))


def load_model(directory: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None) -> LanguageModel:
    """Rebuild a model saved by `save_model`, optionally casting floating weights to `dtype`.

    A quantized checkpoint comes back with its layers swapped for llmcli.quantize's modules before
    the weights are loaded; its integer weights and their scales keep their stored dtypes.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"model directory not found: {directory}")
    weights_path = directory / WEIGHTS
    if not weights_path.is_file():
        raise UserError(f"model weights not found: {weights_path}")
    config = model_config_from_json(directory / MODEL_CONFIG)
    entry = read_quantization(directory)
    try:
        tensors = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{weights_path}: cannot read weights ({exc})") from None

    with torch.device("meta"):  # no memory, no random init: every weight comes from the file
        model = build_model(config)
        if entry is not None:
            quantized.swap_in_quantized_modules(model, entry, dtype)
    _load_tensors(model, tensors, weights_path, dtype)
    return model


def _load_tensors(model: LanguageModel, tensors: dict[str, torch.Tensor], source: Path,
                  dtype: torch.dtype | None) -> None:
    """Check names and shapes against the model, cast, load, and re-tie shared weights."""
    expected = model.state_dict()
    keep_dtype = quantized.quantized_tensor_names(model)
    for alias, origin in model.tied_weights().items():
        if origin in tensors and alias in expected:
            tensors[alias] = tensors[origin]
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(f"{source} does not match {MODEL_CONFIG}: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise UserError(f"{source}: {name} has shape {tuple(tensor.shape)}, "
                            f"{MODEL_CONFIG} implies {tuple(expected[name].shape)}")
        if name in keep_dtype and tensor.dtype != expected[name].dtype:
            raise UserError(f"{source}: {name} is {tensor.dtype}; this quantized checkpoint "
                            f"needs {expected[name].dtype}")
        if dtype is not None and tensor.is_floating_point() and name not in keep_dtype:
            tensors[name] = tensor.to(dtype)
    model.load_state_dict(tensors, assign=True)
    model.tie_weights()


# --------------------------------------------------------------------------------------------
# Whole checkpoint directories


def write_checkpoint(directory: Path, model: LanguageModel, run_config: Config, tokenizer: bytes,
                     info: Mapping[str, Any]) -> None:
    """Write a complete checkpoint directory atomically (a reader never sees half of one).

    `tokenizer` is the tokenizer.json file's bytes.
    """

    def build(tmp: Path) -> None:
        save_model(model, tmp)
        atomic_write_bytes(tmp / TOKENIZER, tokenizer)
        run_config.save(tmp / RUN_CONFIG)
        atomic_write_json(tmp / INFO, dict(info))

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
    """checkpoint.json (step, metrics, provenance); {} when there is none."""
    path = Path(directory) / INFO
    return read_json_object(path) if path.exists() else {}


def load_for_inference(path: str | Path, device: torch.device, dtype: torch.dtype):
    """(checkpoint dir, model in eval mode on `device`, tokenizer) for a run or checkpoint dir:
    what eval, generate, quantize and serve load."""
    from llmcli.tokenizer import load_tokenizer

    directory = resolve_checkpoint(path)
    tokenizer = load_tokenizer(directory / TOKENIZER)
    model = load_model(directory, device=device, dtype=dtype).eval()
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > model.config.vocab_size:
        raise UserError(f"{directory}: the tokenizer has {vocab} tokens but the model only "
                        f"{model.config.vocab_size}")
    return directory, model, tokenizer


def check_output_dir(out: Path, overwrite: bool, inputs: Mapping[str, Path] = {}) -> None:
    """Refuse an output that is, contains or lies inside one of the command's inputs (compared as
    resolved real paths, so symlinks count), whatever `overwrite` says; one that exists and is not a
    directory; and one that already holds something, unless `overwrite`. `inputs` maps a
    description ("the source") to the input's path."""
    refuse_overlap(out, inputs)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} already exists; pass --overwrite to replace it")
