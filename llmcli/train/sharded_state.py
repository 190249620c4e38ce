"""The sharded parts of a run's state (train.strategy=fsdp / deepspeed), checked before the engine
reads them, and `strategy.json`, which says how the state was sharded.

FSDP state is torch.distributed.checkpoint (DCP) directories, written and read through
Accelerate's `save_fsdp_model` / `save_fsdp_optimizer` / `load_fsdp_*`. DCP stores each tensor
with torch.save and reads it back with `torch.load(weights_only=True)`, but it unpickles two
things without restriction: each directory's `.metadata` file (its index), and its non-tensor
entries (the optimizer's settings, e.g. `lr`), read with `torch.load(weights_only=False)`. Before
DCP sees a directory, `check_dcp_dir` unpickles `.metadata` with an allow-list of DCP's own index
classes and loads every non-tensor entry with `weights_only=True`: anything else is refused.

DeepSpeed state is what `engine.save_checkpoint` writes: torch.save files (`*_model_states.pt`,
`*_optim_states.pt`) that DeepSpeed reads with `torch.load(weights_only=False)`. `check_deepspeed_dir`
first loads each with `weights_only=True`, allowing only the three plain DeepSpeed classes these
files hold (its loss-scaler settings, the ZeRO stage enum, a tensor-fragment address).
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch

from llmcli.errors import UserError
from llmcli.io import atomic_write_json

STRATEGY_FILE = "strategy.json"
FSDP_DIR = "fsdp"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"

_DCP_INDEX_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
}
_DEEPSPEED_CLASSES = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


# --------------------------------------------------------------------------------------------
# strategy.json: what wrote the state


def write_layout(directory: Path, layout: dict[str, Any]) -> None:
    atomic_write_json(directory / STRATEGY_FILE, layout)


def read_layout(directory: Path) -> dict[str, Any]:
    """The layout a run's state was written with; a state without the file is a DDP one (written
    before llmcli had strategies)."""
    path = directory / STRATEGY_FILE
    if not path.is_file():
        return {"strategy": "ddp"}
    try:
        layout = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(layout, dict) or not isinstance(layout.get("strategy"), str):
        raise UserError(f"{path}: expected a JSON object with a 'strategy'")
    return layout


# --------------------------------------------------------------------------------------------
# FSDP (DCP directories)


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata` index: DCP's own classes, torch sizes and dtypes, nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_INDEX_CLASSES.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


def check_dcp_dir(directory: Path) -> None:
    """Refuse a DCP directory whose pickled parts hold anything but what DCP itself writes."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    index = directory / ".metadata"
    if not index.is_file():
        raise UserError(f"{index} is missing: the run's state is incomplete")
    try:
        with open(index, "rb") as fh:
            metadata = _IndexUnpickler(fh).load()
        entries = {key.fqn: info for key, info in metadata.storage_data.items()}
        byte_entries = [key for key, meta in metadata.state_dict_metadata.items()
                        if isinstance(meta, BytesStorageMetadata)]
    except (pickle.UnpicklingError, AttributeError, EOFError, TypeError, ValueError) as exc:
        raise UserError(f"{index}: not a checkpoint index torch.distributed.checkpoint wrote ({exc})") from None
    for key in byte_entries:
        info = entries.get(key)
        if info is None or info.transform_descriptors:
            raise UserError(f"{index}: entry {key!r} has no plain stored bytes")
        path = directory / info.relative_path
        try:
            with open(path, "rb") as fh:
                fh.seek(info.offset)
                torch.load(io.BytesIO(fh.read(info.length)), weights_only=True)
        except (OSError, pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path}: entry {key!r} is not plain data ({first})") from None


# --------------------------------------------------------------------------------------------
# DeepSpeed (engine.save_checkpoint directories)


def check_deepspeed_dir(directory: Path, world: int) -> None:
    """Refuse a DeepSpeed checkpoint that is incomplete or whose files hold more than plain data."""
    import importlib

    tag_dir = directory / DEEPSPEED_TAG
    files = sorted(tag_dir.glob("*.pt")) if tag_dir.is_dir() else []
    optim = [p for p in files if p.name.endswith("_optim_states.pt")]
    if not files or len(optim) != world:
        raise UserError(f"{tag_dir} holds {len(optim)} optimizer partition(s) for {world} process(es): "
                        "the run's state is incomplete")
    allowed = [getattr(importlib.import_module(module), name) for module, name in _DEEPSPEED_CLASSES
               if hasattr(importlib.import_module(module), name)]
    for path in files:
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path}: not plain DeepSpeed state ({first[:300]})") from None
