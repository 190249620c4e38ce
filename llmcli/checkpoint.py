"""Checkpoint directories: the one place that knows their files and how a model is saved and loaded.

A checkpoint directory holds `model.safetensors` (the weights; a tied weight is stored once),
`model.json` (the model config, plus a `quantization` entry for a checkpoint written by
`llmcli quantize` and a `pruning` entry for one written by `llmcli prune`; a magnitude-pruned
model's sparse weights are stored as values + bitmask, llmcli/prune/storage.py), `tokenizer.json` (a sequence-to-sequence model's target side, with
`source_tokenizer.json` beside it when the source has a tokenizer of its own), `config.yaml` (the effective config of the run that made it)
and `checkpoint.json` (step, metrics, provenance). A run directory is itself a checkpoint (its final
weights) with `best/` and `last/` checkpoint directories and a `state/` directory for exact resume.

Optional, in Hugging Face's formats: `tokenizer_config.json` (a Jinja `chat_template`, special
tokens) and `generation_config.json` (`eos_token_id`: the ids that end generation).

An adapter checkpoint (a LoRA run) holds peft's `adapter_model.safetensors` and `adapter_config.json`
instead of the weights, and `base.json`: the base checkpoint's path and the SHA-256 of its weights.
`load_model` gives base + adapter merged, so every command reads it like any checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from llmcli import lora
from llmcli.config import Config, ModelConfig
from llmcli.config_loader import build_config
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
from llmcli.prune import storage as sparse
from llmcli.quantize import modules as quantized

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model.json"
TOKENIZER = "tokenizer.json"
SOURCE_TOKENIZER = "source_tokenizer.json"  # a seq2seq model's source side, when it has its own
RUN_CONFIG = "config.yaml"
INFO = "checkpoint.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file names
ADAPTER_CONFIG = "adapter_config.json"
BASE = "base.json"
TOKENIZER_CONFIG = "tokenizer_config.json"  # Hugging Face's file names
GENERATION_CONFIG = "generation_config.json"
CHECKPOINT_FILES = (WEIGHTS, MODEL_CONFIG, TOKENIZER, SOURCE_TOKENIZER, RUN_CONFIG, INFO, ADAPTER_WEIGHTS, ADAPTER_CONFIG,
                    BASE, TOKENIZER_CONFIG, GENERATION_CONFIG)
QUANTIZATION_KEY = "quantization"  # the model.json entry of a quantized checkpoint
PRUNING_KEY = "pruning"  # the model.json entry of a checkpoint written by `llmcli prune`
PRUNING_ATTR = "llmcli_pruning"  # where a model in memory keeps that entry


# --------------------------------------------------------------------------------------------
# Weights + model config


def save_model(model: LanguageModel, directory: str | Path) -> None:
    """Write `model.safetensors` and `model.json` into `directory`, each atomically (a model with a
    LoRA adapter: the adapter's weights and config, and `model.json`)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if lora.is_adapted(model):
        _save_adapter(model, directory)
        return
    aliases = model.tied_weights()
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items() if name not in aliases}
    model_json: dict[str, Any] = model.config.to_dict()  # the family's own settings only
    entry = quantized.quantization_of(model)
    if entry is not None:
        model_json[QUANTIZATION_KEY] = entry
    pruning = pruning_of(model)
    if pruning is not None:
        model_json[PRUNING_KEY] = pruning
        if pruning.get("method") in ("magnitude", "2:4"):
            tensors = sparse.pack(tensors)
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(directory / MODEL_CONFIG, model_json)


def _save_adapter(model: LanguageModel, directory: Path) -> None:
    from safetensors.torch import save_file

    tensors = lora.adapter_state(model)
    atomic_write(directory / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    config = lora.peft_config_of(model).to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items() if not k.startswith("_")}
    atomic_write_json(directory / ADAPTER_CONFIG, config)
    atomic_write_json(directory / MODEL_CONFIG, model.config.to_dict())


def base_pointer(base: Path) -> bytes:
    """`base.json` for adapters trained on the checkpoint `base`."""
    weights = base / (WEIGHTS if (base / WEIGHTS).is_file() else ADAPTER_WEIGHTS)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    return (json.dumps({"path": str(base.resolve()), "sha256": digest}, indent=2) + "\n").encode()


def adapter_base(directory: Path) -> Path:
    """The base checkpoint of an adapter checkpoint, checked to be the one it was trained on."""
    pointer = read_json_object(directory / BASE, what="a JSON object with the base's path and sha256")
    if not isinstance(pointer.get("path"), str) or not isinstance(pointer.get("sha256"), str):
        raise UserError(f"{directory / BASE}: needs \"path\" and \"sha256\" strings")
    base = Path(pointer["path"])
    if not base.is_dir():
        raise UserError(f"the base checkpoint of adapter {directory} is gone: {base} (named in {BASE})")
    if json.loads(base_pointer(base))["sha256"] != pointer["sha256"]:
        raise UserError(f"the base checkpoint {base} changed since the adapter {directory} was trained on it "
                        f"(its weights' SHA-256 differs from {directory / BASE})")
    return base


def _load_adapted(directory: Path, device: torch.device | str, dtype: torch.dtype | None) -> LanguageModel:
    """Base + adapter merged into a plain float model (a quantized base is dequantized first)."""
    return lora.merge(load_unmerged(directory, device, dtype))


def load_unmerged(directory: Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> LanguageModel:
    """The float base of adapter checkpoint `directory` with its adapter added, not merged (a
    quantized base is dequantized first): for writing the adapter on its own."""
    from peft import LoraConfig as PeftLoraConfig
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    model = load_model(adapter_base(directory), device=device, dtype=dtype)
    if quantized.quantization_of(model) is not None:
        model = quantized.dequantize_model(model).to(device=device, dtype=dtype or torch.float32)
    try:
        state = load_file(str(directory / ADAPTER_WEIGHTS), device=str(device))
        config = PeftLoraConfig.from_pretrained(str(directory))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise UserError(f"{directory}: cannot read the adapter ({exc})") from None
    return lora.load_adapter(model, config, state, str(directory / ADAPTER_WEIGHTS))


def is_adapter(directory: Path) -> bool:
    return (directory / ADAPTER_WEIGHTS).is_file()


def model_config_from_json(path: str | Path) -> ModelConfig:
    """Read and validate a model.json; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model config not found: {path}")
    raw = read_json_object(path, what="a JSON object of model settings")
    raw.pop(QUANTIZATION_KEY, None)  # not model settings: see read_quantization, read_pruning
    raw.pop(PRUNING_KEY, None)
    return build_config({"model": raw}, {f"model.{key}": str(path) for key in raw}).model


def _model_json_entry(path: Path, key: str) -> Any:
    """model.json's `key` entry, or None (also for an unreadable file: model_config_from_json reports it)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw.get(key) if isinstance(raw, dict) else None


def read_quantization(directory: str | Path) -> dict | None:
    """The `quantization` entry of a checkpoint's model.json, or None for a float checkpoint."""
    path = Path(directory) / MODEL_CONFIG
    entry = _model_json_entry(path, QUANTIZATION_KEY)
    return None if entry is None else quantized.parse_quantization(entry, str(path))


def read_pruning(directory: str | Path) -> dict | None:
    """The `pruning` entry of a checkpoint's model.json (what `llmcli prune` did: its method, source
    run and amounts, any keys), or None for a checkpoint that was not pruned."""
    path = Path(directory) / MODEL_CONFIG
    entry = _model_json_entry(path, PRUNING_KEY)
    if entry is not None and not isinstance(entry, dict):
        raise UserError(f"{path}: \"{PRUNING_KEY}\" must be a JSON object (what was pruned, and how much)")
    return entry


def pruning_of(model: torch.nn.Module) -> dict | None:
    """The `pruning` entry a model carries (see mark_pruned), or None."""
    return getattr(model, PRUNING_ATTR, None)


def mark_pruned(model: torch.nn.Module, entry: dict | None) -> torch.nn.Module:
    """Let `model` carry its `pruning` entry into the checkpoints it is saved to."""
    setattr(model, PRUNING_ATTR, entry)
    return model


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
    if is_adapter(directory):
        return _load_adapted(directory, device, dtype)
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
    if any(name.endswith(sparse.VALUES) for name in tensors):
        try:
            tensors = sparse.unpack(tensors, {k: v.shape for k, v in model.state_dict().items()})
        except ValueError as exc:
            raise UserError(f"{weights_path}: {exc}") from None
    _load_tensors(model, tensors, weights_path, dtype)
    return mark_pruned(model, read_pruning(directory))


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
                     info: Mapping[str, Any], files: Mapping[str, bytes] | None = None) -> None:
    """Write a complete checkpoint directory atomically (a reader never sees half of one).

    `tokenizer` is the tokenizer.json file's bytes; `files` more files by name (source_tokenizer.json,
    tokenizer_config.json, base.json, ...).
    """

    def build(tmp: Path) -> None:
        save_model(model, tmp)
        atomic_write_bytes(tmp / TOKENIZER, tokenizer)
        for name, data in (files or {}).items():
            atomic_write_bytes(tmp / name, data)
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
    if (path / WEIGHTS).is_file() or is_adapter(path):
        return path
    for sub in ("last", "best"):
        if (path / sub / WEIGHTS).is_file() or is_adapter(path / sub):
            return path / sub
    raise UserError(f"no {WEIGHTS} in {path} (is it a run or checkpoint directory?)")


def model_config_of(path: str | Path) -> ModelConfig:
    """The model config of a run or checkpoint directory (an adapter's is its base's), without loading
    weights: for refusing a model before expensive work."""
    directory = resolve_checkpoint(path)
    return model_config_from_json((adapter_base(directory) if is_adapter(directory) else directory) / MODEL_CONFIG)


def read_info(directory: Path) -> dict[str, Any]:
    """checkpoint.json (step, metrics, provenance); {} when there is none."""
    path = Path(directory) / INFO
    return read_json_object(path) if path.exists() else {}


def logical_parameters(directory: str | Path) -> tuple[int, int]:
    """(total, non-embedding) parameters of the model model.json describes, counted on the meta device
    (nothing is loaded): a quantized checkpoint counts the float matrices its integer weights stand for."""
    with torch.device("meta"):
        model = build_model(model_config_from_json(Path(directory) / MODEL_CONFIG))
    return model.num_params(), model.num_params(non_embedding=True)


def load_source_tokenizer(directory: Path, model: LanguageModel, tokenizer: Any) -> Any:
    """The tokenizer of a seq2seq checkpoint's sources: source_tokenizer.json, else the shared
    `tokenizer`; refused when it has more tokens than the model's source vocabulary."""
    from llmcli.tokenizer import load_tokenizer

    path = Path(directory) / SOURCE_TOKENIZER
    source = load_tokenizer(path) if path.is_file() else tokenizer
    vocab = source.get_vocab_size(with_added_tokens=True)
    if model.source_vocab_size is not None and vocab > model.source_vocab_size:
        raise UserError(f"{directory}: the source tokenizer has {vocab} tokens but the model only "
                        f"{model.source_vocab_size}")
    return source


def end_token_ids(directory: Path, tokenizer: Any) -> tuple[int, ...]:
    """The ids that end generation: generation_config.json's eos_token_id (an id or a list), the one
    an import recorded in checkpoint.json, tokenizer_config.json's eos_token, then <|endoftext|>."""
    from llmcli.tokenizer import EOT

    ids: list[int] = []
    for value in (_json_file(directory / GENERATION_CONFIG).get("eos_token_id"),
                  read_info(directory).get("eos_token_id")):
        ids += [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]
    eos = _json_file(directory / TOKENIZER_CONFIG).get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    for token in (eos, EOT):
        ident = tokenizer.token_to_id(token) if isinstance(token, str) else None
        if ident is not None:
            ids.append(ident)
    return tuple(dict.fromkeys(ids))


def _json_file(path: Path) -> dict[str, Any]:
    """An optional JSON object file ({} when absent)."""
    return read_json_object(path) if path.is_file() else {}


def check_output_file(out: Path, overwrite: bool, inputs: Mapping[str, Path] = {}, label: str = "--out") -> None:
    """check_output_dir for a command that writes one file: refuse a path that overlaps an input, a
    directory, and an existing file unless `overwrite`. `label` names the path in messages."""
    refuse_overlap(out, inputs)
    if out.is_dir():
        raise UserError(f"{label} {out} is a directory; name the file to write")
    if out.exists() and not overwrite:
        raise UserError(f"{label} {out} already exists; pass --overwrite to replace it")


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
