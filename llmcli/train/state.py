"""A run's resumable state, without pickles: what `--resume` needs to continue bit for bit.

`state/` holds `model.safetensors` (the weights), `optimizer.safetensors` + `optimizer.json` (the
optimizer's tensors, and its settings and scalars), `rng-<rank>.safetensors` (each process's random
generators: torch's CPU and CUDA states, NumPy's and Python's), `scaler.json` (fp16 loss scaling),
`trainer_state.json` (step, tokens, best loss), `strategy.json` (how it was sharded; under
train.strategy=fsdp / deepspeed the engine's sharded files replace the first three, see
sharded_state.py) and, with the options that need them, `average.safetensors` (train.ema_decay, see
averaging.py) and `carry-<rank>.safetensors` (train.stateful: the hidden states carried between steps). Every file is checked as it is read: a missing,
damaged or mismatched one stops the resume with one line naming it, never a silent partial restore.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmcli.errors import UserError
from llmcli.io import atomic_write, atomic_write_json
from llmcli.train.schedule import TrainState

MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
OPTIMIZER_SETTINGS = "optimizer.json"
SCALER = "scaler.json"
TRAINER_STATE = "trainer_state.json"


def rng_file(rank: int) -> str:
    return f"rng-{rank}.safetensors"


def carry_file(rank: int) -> str:
    return f"carry-{rank}.safetensors"


# --------------------------------------------------------------------------------------------
# Saving


def save_shared(directory: Path, model: Any, optimizer: torch.optim.Optimizer, scaler: Any,
                state: TrainState) -> None:
    """What every process holds alike (the main process writes it): weights, optimizer, counters."""
    from safetensors.torch import save_file

    aliases = model.tied_weights()
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in aliases}
    atomic_write(directory / MODEL, lambda tmp: save_file(weights, str(tmp)))
    tensors, settings = _split_optimizer(optimizer.state_dict())
    atomic_write(directory / OPTIMIZER, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_json(directory / OPTIMIZER_SETTINGS, settings)
    save_counters(directory, scaler, state)


def save_counters(directory: Path, scaler: Any, state: TrainState) -> None:
    """The loss scaler (fp16) and the trainer's counters: what every strategy's state holds."""
    if scaler is not None:
        atomic_write_json(directory / SCALER, {k: _plain(v) for k, v in scaler.state_dict().items()})
    atomic_write_json(directory / TRAINER_STATE, state.state_dict())


def save_rng(directory: Path, rank: int) -> None:
    """This process's random generators (dropout draws from torch's)."""
    from safetensors.torch import save_file

    numpy_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, cuda in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = cuda
    metadata = {"numpy": json.dumps([numpy_state[0], *map(_plain, numpy_state[2:])]),
                "python": json.dumps(_plain(random.getstate()))}
    atomic_write(directory / rng_file(rank), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_carry(directory: Path, rank: int, carry: Any) -> None:
    """train.stateful: this process's carried hidden states (a RecurrentState) and their positions."""
    from safetensors.torch import save_file

    tensors = {f"state.{i}": t.contiguous() for i, t in enumerate(carry.tensors)}
    metadata = {"positions": json.dumps(carry.positions)}
    atomic_write(directory / carry_file(rank), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as tensors (`state.<param>.<key>`) and JSON (the rest)."""
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{index}.{key}"] = _plain(value)
    return tensors, {"param_groups": [{k: _plain(v) for k, v in g.items()} for g in state["param_groups"]],
                     "scalars": scalars}


def _plain(value: Any) -> Any:
    """Tuples to lists, tensors and numpy numbers to Python numbers: JSON-ready."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------------------------
# Loading: everything, or a one-line error naming the file


def refuse_old_format(directory: Path) -> None:
    """State written by llmcli before it stopped using pickles (Accelerate's save_state)."""
    old = sorted(p.name for p in directory.glob("*") if p.suffix in (".pkl", ".bin"))
    if old:
        raise UserError(f"{directory} holds pickle files ({', '.join(old[:3])}) from an older llmcli, which "
                        "are not loaded; start a new run from its weights with --init-from instead")


def load_trainer_state(directory: Path) -> TrainState:
    path = directory / TRAINER_STATE
    raw = _json(path)
    state = TrainState()
    expected = {f.name: f.type for f in fields(TrainState)}
    if set(raw) != set(expected):
        raise UserError(f"{path}: expected the keys {', '.join(expected)}; got {', '.join(raw) or 'none'}")
    for key, value in raw.items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or (key in ("step", "tokens_seen") and (not isinstance(value, int) or value < 0)):
            raise UserError(f"{path}: {key} must be a {'whole ' if key in ('step', 'tokens_seen') else ''}"
                            f"number; got {value!r}")
        if key != "best_val_loss" and not math.isfinite(value):
            raise UserError(f"{path}: {key} must be finite; got {value!r}")
    state.load_state_dict(raw)
    return state


def load_model_weights(directory: Path, model: Any) -> None:
    path = directory / MODEL
    tensors = read_tensors(path)
    for alias, source in model.tied_weights().items():  # stored once, under the source's name
        if source in tensors:
            tensors[alias] = tensors[source]
    _check_tensors(path, tensors, model.state_dict(), "the run's config.yaml")
    model.load_state_dict(tensors)


def load_optimizer(directory: Path, optimizer: torch.optim.Optimizer) -> None:
    path, settings_path = directory / OPTIMIZER, directory / OPTIMIZER_SETTINGS
    tensors, settings = read_tensors(path), _json(settings_path)
    groups, scalars = settings.get("param_groups"), settings.get("scalars", {})
    current = optimizer.state_dict()
    if not isinstance(groups, list) or len(groups) != len(current["param_groups"]) or not isinstance(scalars, dict):
        raise UserError(f"{settings_path}: does not describe this optimizer's "
                        f"{len(current['param_groups'])} parameter groups")
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit():
            raise UserError(f"{path}: unexpected tensor {name!r}")
        state.setdefault(int(parts[1]), {})[parts[2]] = tensor
    for name, value in scalars.items():
        index, _, key = name.partition(".")
        if not index.isdigit():
            raise UserError(f"{settings_path}: unexpected entry {name!r}")
        state.setdefault(int(index), {})[key] = value
    params = {}  # the state dict numbers the parameters group by group, in order
    for live, numbered in zip(optimizer.param_groups, current["param_groups"], strict=True):
        params.update(zip(numbered["params"], live["params"], strict=True))
    for index, values in state.items():
        param = params.get(index)
        if param is None:
            raise UserError(f"{path}: holds state for parameter {index}, which this model does not have")
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise UserError(f"{path}: {key} of parameter {index} has shape {tuple(value.shape)}, the "
                                f"parameter {tuple(param.shape)} (was config.yaml changed?)")
    loaded_groups = []
    for group, saved in zip(current["param_groups"], groups, strict=True):
        if not isinstance(saved, dict) or saved.get("params") != group["params"]:
            raise UserError(f"{settings_path}: its parameter groups do not match this model (was config.yaml "
                            "changed?)")
        loaded_groups.append({**saved, **({"betas": tuple(saved["betas"])} if "betas" in saved else {})})
    try:
        optimizer.load_state_dict({"state": state, "param_groups": loaded_groups})
    except (ValueError, KeyError, RuntimeError, TypeError) as exc:
        raise UserError(f"{path}: cannot be loaded into the optimizer ({exc})") from None


def load_scaler(directory: Path, scaler: Any) -> None:
    if scaler is None:
        return
    path = directory / SCALER
    scaler.load_state_dict(_json(path))


def load_rng(directory: Path, rank: int, world: int) -> None:
    """Restore this process's generators; refuse a state written by a different number of processes."""
    files = sorted(p.name for p in directory.glob("rng-*.safetensors"))
    if len(files) != world:
        raise UserError(f"{directory} holds the random state of {len(files)} process(es); this run has {world} "
                        "(resume with the same number of processes)")
    path = directory / rng_file(rank)
    tensors, metadata = read_tensors(path, with_metadata=True)
    try:
        torch.set_rng_state(tensors["torch"])
        numpy_name, *numpy_rest = json.loads(metadata["numpy"])
        np.random.set_state((numpy_name, tensors["numpy_keys"].numpy().astype(np.uint32), *numpy_rest))
        python = json.loads(metadata["python"])
        random.setstate((python[0], tuple(python[1]), python[2]))
        cuda = [tensors[f"cuda.{i}"] for i in range(len([k for k in tensors if k.startswith("cuda.")]))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
    except (KeyError, ValueError, TypeError, RuntimeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a random-generator state llmcli wrote ({type(exc).__name__}: {exc})") from None


def load_carry(directory: Path, rank: int, carry: Any) -> None:
    path = directory / carry_file(rank)
    tensors, metadata = read_tensors(path, with_metadata=True)
    try:
        positions = json.loads(metadata["positions"])
        loaded = [tensors[f"state.{i}"] for i in range(len(carry.tensors))]
    except (KeyError, ValueError) as exc:
        raise UserError(f"{path}: not a carried state llmcli wrote ({type(exc).__name__}: {exc})") from None
    if len(positions) != len(carry.positions) or any(a.shape != b.shape for a, b in zip(loaded, carry.tensors, strict=True)):
        raise UserError(f"{path}: holds states of another shape (were train.batch_size or the model changed?)")
    for mine, saved in zip(carry.tensors, loaded, strict=True):
        mine.copy_(saved)
    carry.positions[:] = positions


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path} is missing: the run's state is incomplete")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def read_tensors(path: Path, with_metadata: bool = False):
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise UserError(f"{path} is missing: the run's state is incomplete")
    try:
        with safe_open(str(path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            metadata = fh.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot be read ({exc})") from None
    return (tensors, metadata) if with_metadata else tensors


def _check_tensors(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                   config: str) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise UserError(f"{path} does not match {config}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise UserError(f"{path}: {name} has shape {tuple(tensor.shape)}, {config} implies "
                            f"{tuple(expected[name].shape)}")
