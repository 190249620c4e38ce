"""`train.accelerate_config`: every engine setting llmcli does not expose as a train.* key, from a
file Accelerate or DeepSpeed users already have.

* An Accelerate config YAML (what `accelerate config` writes): for train.strategy=fsdp its
  `fsdp_config` mapping (`fsdp_<field>` keys, fields of Accelerate's FullyShardedDataParallelPlugin),
  for deepspeed the DeepSpeed JSON its `deepspeed_config.deepspeed_config_file` names. Its other
  keys (num_processes, machine_rank, ...) are for `accelerate launch --config_file`.
* A DeepSpeed JSON config (train.strategy=deepspeed), passed to DeepSpeed as it is.

Settings llmcli sets from train.* (FSDP version, sharding and wrapping, offload, activation
checkpointing, the ZeRO stage, batch size, accumulation, clipping, mixed precision, the optimizer
and its schedule) are refused in the file, naming the train.* key that sets them: one home each.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcli.config import TrainConfig
from llmcli.config_loader import read_yaml
from llmcli.errors import UserError

# fsdp_config keys (without the fsdp_ prefix) that train.* sets, and the key that does.
FSDP_OWNED = {
    "version": "train.fsdp_version", "sharding_strategy": "train.fsdp_sharding",
    "reshard_after_forward": "train.fsdp_sharding", "offload_params": "train.cpu_offload",
    "cpu_offload": "train.cpu_offload", "activation_checkpointing": "train.activation_checkpointing",
    "auto_wrap_policy": "the model family's blocks (shard_units)",
    "transformer_layer_cls_to_wrap": "the model family's blocks (shard_units)",
    "transformer_cls_names_to_wrap": "the model family's blocks (shard_units)",
    "min_num_params": "the model family's blocks (shard_units)",
    "state_dict_type": "llmcli's sharded state (state/fsdp)", "use_orig_params": "llmcli (AdamW's groups)",
    "mixed_precision_policy": "train.mixed_precision",
}
# DeepSpeed JSON keys that train.* sets ("zero_optimization.stage" style for nested ones).
DEEPSPEED_OWNED = {
    "train_batch_size": "train.batch_size", "train_micro_batch_size_per_gpu": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "gradient_clipping": "train.grad_clip",
    "bf16": "train.mixed_precision", "fp16": "train.mixed_precision", "optimizer": "train.lr and friends",
    "scheduler": "train.lr and friends", "zero_optimization.stage": "train.zero_stage",
    "zero_optimization.offload_optimizer": "train.cpu_offload", "zero_optimization.offload_param": "train.cpu_offload",
}
# deepspeed_config keys of an Accelerate YAML: train.* sets these, the launcher reads those.
DEEPSPEED_PLUGIN_OWNED = {
    "zero_stage": "train.zero_stage", "offload_optimizer_device": "train.cpu_offload",
    "offload_param_device": "train.cpu_offload", "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
}
LAUNCHER_ONLY = {"deepspeed_multinode_launcher", "deepspeed_hostfile", "deepspeed_exclusion_filter",
                 "deepspeed_inclusion_filter"}


@dataclass(frozen=True)
class EngineFile:
    """What train.accelerate_config adds: FSDP plugin keyword arguments, or a DeepSpeed config."""

    fsdp: dict[str, Any] = field(default_factory=dict)
    deepspeed: dict[str, Any] = field(default_factory=dict)


def read_engine_file(t: TrainConfig) -> EngineFile:
    """Read and check train.accelerate_config (an empty EngineFile when unset)."""
    if t.accelerate_config is None:
        return EngineFile()
    path = Path(t.accelerate_config).expanduser()
    if not path.is_file():
        raise UserError(f"train.accelerate_config: file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        if t.strategy != "deepspeed":
            raise UserError(f"{path}: a JSON file is a DeepSpeed config, but train.strategy={t.strategy}")
        return EngineFile(deepspeed=_deepspeed_json(path, text))
    try:
        raw = read_yaml(text)
    except Exception as exc:  # yaml's errors, and our duplicate-key one
        raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected an Accelerate config (a mapping with fsdp_config or deepspeed_config)")
    declared = str(raw.get("distributed_type", "")).upper()
    if declared in ("FSDP", "DEEPSPEED") and declared.lower() != t.strategy:
        raise UserError(f"{path}: distributed_type is {declared}, but train.strategy={t.strategy}")
    if t.strategy == "fsdp":
        return EngineFile(fsdp=_fsdp_kwargs(path, raw.get("fsdp_config") or {}))
    return EngineFile(deepspeed=_deepspeed_from_yaml(path, raw.get("deepspeed_config") or {}))


def _fsdp_kwargs(path: Path, section: Any) -> dict[str, Any]:
    from accelerate.utils import FullyShardedDataParallelPlugin

    if not isinstance(section, dict):
        raise UserError(f"{path}: fsdp_config must be a mapping")
    known = {f.name for f in dataclasses.fields(FullyShardedDataParallelPlugin)}
    kwargs = {}
    for key, value in section.items():
        name = str(key).removeprefix("fsdp_")
        if name in FSDP_OWNED:
            raise UserError(f"{path}: fsdp_config.{key} is set by {FSDP_OWNED[name]}; remove it from the file")
        if name not in known:
            raise UserError(f"{path}: fsdp_config.{key} is not a setting of Accelerate's FSDP plugin")
        kwargs[name] = value
    return kwargs


def _deepspeed_from_yaml(path: Path, section: Any) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise UserError(f"{path}: deepspeed_config must be a mapping")
    config: dict[str, Any] = {}
    for key, value in section.items():
        if key in DEEPSPEED_PLUGIN_OWNED:
            raise UserError(f"{path}: deepspeed_config.{key} is set by {DEEPSPEED_PLUGIN_OWNED[key]}; "
                            "remove it from the file")
        if key == "deepspeed_config_file":
            json_path = (path.parent / str(value)).expanduser()
            if not json_path.is_file():
                raise UserError(f"{path}: deepspeed_config_file not found: {json_path}")
            config = _deepspeed_json(json_path, json_path.read_text(encoding="utf-8"))
        elif key not in LAUNCHER_ONLY:
            raise UserError(f"{path}: deepspeed_config.{key} is not passed on by llmcli; put DeepSpeed "
                            "settings in the JSON file that deepspeed_config_file names")
    return config


def _deepspeed_json(path: Path, text: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: a DeepSpeed config must be a JSON object")
    zero = config.get("zero_optimization", {})
    present = set(config) | {f"zero_optimization.{k}" for k in (zero if isinstance(zero, dict) else {})}
    for key, owner in DEEPSPEED_OWNED.items():
        if key in present:
            raise UserError(f"{path}: {key} is set by {owner}; remove it from the file")
    return config
