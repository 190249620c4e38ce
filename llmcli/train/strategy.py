"""How several processes share a run: `train.strategy` = ddp, fsdp or deepspeed, on Accelerate.

* ddp: Accelerate's DistributedDataParallel; every process holds the whole model and optimizer.
* fsdp: PyTorch FSDP through Accelerate's FullyShardedDataParallelPlugin, one unit per block
  class the model family names (`LanguageModel.shard_units`).
* deepspeed: DeepSpeed ZeRO through Accelerate's DeepSpeedPlugin.

`Strategy` builds the Accelerator with the plugin, refuses what cannot work (a family that cannot
be partitioned, a missing package, a resume with another strategy or world size) before anything
is written, saves and restores the sharded state through the engines' own checkpointing
(sharded_state.py checks those files before the engine unpickles them) and consolidates the
weights into one ordinary model, so checkpoints never depend on how training was sharded.
"""

from __future__ import annotations

import importlib.util
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmcli.config import Config, ModelConfig
from llmcli.errors import UserError
from llmcli.models.base import LanguageModel
from llmcli.models.registry import FAMILIES, build_model
from llmcli.train import sharded_state
from llmcli.train import state as saved
from llmcli.train.engine_config import EngineFile, read_engine_file
from llmcli.train.schedule import TrainState

LAUNCHER_FLAGS = {"fsdp": "ACCELERATE_USE_FSDP", "deepspeed": "ACCELERATE_USE_DEEPSPEED"}


@dataclass(frozen=True)
class Held:
    """Bytes this process holds for the model's weights and for the optimizer's state."""

    weights: int
    optimizer: int


class Strategy:
    """One run's strategy (see the module docstring); checks the config when built."""

    def __init__(self, cfg: Config, resume_state: Path | None = None):
        self.cfg, self.t = cfg, cfg.train
        self.name = self.t.strategy
        self.sharded = self.name != "ddp"
        self.resume_state = resume_state
        self._check_family()
        if resume_state is not None:
            self._check_resume_layout()
        self.engine_file: EngineFile = read_engine_file(self.t)
        self._check_environment()
        self.accelerator: Any = None

    # -- checks before anything runs ---------------------------------------------------------

    @property
    def partitions_weights(self) -> bool:
        return self.name == "fsdp" or (self.name == "deepspeed" and self.t.zero_stage == 3)

    def _check_family(self) -> None:
        if self.sharded and self.t.lora.r is not None:
            raise UserError(f"train.lora with train.strategy={self.name}: an adapter's frozen base may hold "
                            "integer (quantized) weights, which FSDP and DeepSpeed cannot shard, and its "
                            "checkpoints hold only the adapter; use train.strategy=ddp (an adapter's "
                            "optimizer state is small)")
        family = FAMILIES[self.cfg.model.arch]
        if self.t.pack_pairs and family.packing_refusal:
            raise UserError(f"train.pack_pairs: model.arch={self.cfg.model.arch} cannot train on packed rows "
                            f"({family.packing_refusal}); use model.arch=encoder-decoder or leave it off")
        if self.partitions_weights and family.partition_refusal:
            what = "train.strategy=fsdp" if self.name == "fsdp" else "DeepSpeed ZeRO-3 (train.zero_stage=3)"
            raise UserError(f"{what} partitions the weights across processes, which model.arch="
                            f"{self.cfg.model.arch} does not allow: {family.partition_refusal}; use "
                            "train.strategy=ddp" + (" or train.zero_stage=1/2" if self.name == "deepspeed" else ""))

    def _check_environment(self) -> None:
        t = self.t
        for strategy, flag in LAUNCHER_FLAGS.items():
            if os.environ.get(flag, "false").lower() == "true" and self.name != strategy:
                raise UserError(f"this process was launched for {strategy} ({flag}=true, e.g. by accelerate "
                                f"launch) but train.strategy={self.name}; set train.strategy={strategy}")
        if self.name == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
            raise UserError("train.strategy=deepspeed needs the deepspeed package, which is not installed "
                            "(pip install deepspeed, or the llmcli[deepspeed] extra)")
        if not self.sharded:
            return
        if not torch.cuda.is_available():
            if self.name == "fsdp" and t.fsdp_version == 1:
                raise UserError("train.fsdp_version=1 computes only on GPUs (torch's FSDP1 has no CPU compute "
                                "device); use train.fsdp_version=2 on CPU")
            if t.cpu_offload:
                raise UserError("train.cpu_offload moves weights and optimizer state off a GPU, but this run "
                                "is on the CPU already")
        if "LOCAL_RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
            raise UserError(f"train.strategy={self.name} runs under a launcher, even for one process: "
                            f"torchrun --nproc_per_node N -m llmcli train ... (or accelerate launch)")

    def _check_resume_layout(self) -> None:
        layout = sharded_state.read_layout(self.resume_state)
        mine = self.layout(world=None)
        for key, value in layout.items():
            if key != "world_size" and mine.get(key) != value:
                raise UserError(f"{self.resume_state} was written with train.{key}={value}; this run asks for "
                                f"train.{key}={mine.get(key)}, whose state is laid out differently; resume "
                                f"with train.{key}={value}")

    def layout(self, world: int | None) -> dict[str, Any]:
        """What decides how the state is laid out on disk (strategy.json)."""
        t = self.t
        out: dict[str, Any] = {"strategy": self.name}
        if self.name == "fsdp":
            out.update(fsdp_version=t.fsdp_version, fsdp_sharding=t.fsdp_sharding)
        elif self.name == "deepspeed":
            out.update(zero_stage=t.zero_stage)
        if world is not None:
            out["world_size"] = world
        return out

    # -- the Accelerator ---------------------------------------------------------------------

    def make_accelerator(self, **extra: Any) -> Any:
        """The Accelerator for this strategy. Without CUDA, cpu=True is what makes Accelerate see a
        torchrun / `accelerate launch --multi_gpu` world on CPU (gloo); without it every process
        silently trains alone. Accelerate turns FSDP and DeepSpeed on only for accelerators, so on
        CPU the process group is set up first (PartialState) and the plugin attached after."""
        from accelerate import Accelerator, PartialState
        from accelerate.utils import DistributedType

        t, on_cpu = self.t, not torch.cuda.is_available()
        kwargs: dict[str, Any] = dict(mixed_precision=t.mixed_precision, gradient_accumulation_steps=t.grad_accum, **extra)
        if self.sharded and t.compile:
            kwargs["dynamo_backend"] = "inductor"  # Accelerate compiles after sharding
        plugin = None
        if self.name == "fsdp":
            plugin = self._fsdp_plugin()
            accelerator = Accelerator(cpu=on_cpu, fsdp_plugin=plugin, **kwargs)
        elif self.name == "deepspeed":
            if on_cpu:
                PartialState(cpu=True)
            accelerator = Accelerator(deepspeed_plugin=self._deepspeed_plugin(), **kwargs)
        else:
            accelerator = Accelerator(cpu=on_cpu, **kwargs)
        if plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
            if t.mixed_precision != "no":
                plugin.set_mixed_precision(t.mixed_precision)
            accelerator.state.fsdp_plugin = plugin
            accelerator.state.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.accelerator = accelerator
        if self.resume_state is not None:
            self._check_resume_world(accelerator.num_processes)
        return accelerator

    def _fsdp_plugin(self) -> Any:
        from accelerate.utils import FullyShardedDataParallelPlugin

        t = self.t
        kwargs: dict[str, Any] = dict(
            fsdp_version=t.fsdp_version, auto_wrap_policy="transformer_based_wrap", cpu_offload=t.cpu_offload,
            activation_checkpointing=t.activation_checkpointing, state_dict_type="SHARDED_STATE_DICT")
        if t.fsdp_version == 2:
            kwargs["reshard_after_forward"] = t.fsdp_sharding == "full_shard"
        else:  # the original parameters, so that AdamW keeps its decay / no-decay groups
            kwargs.update(sharding_strategy=t.fsdp_sharding.upper(), use_orig_params=True)
        return FullyShardedDataParallelPlugin(**{**self.engine_file.fsdp, **kwargs})

    def _deepspeed_plugin(self) -> Any:
        from accelerate.utils import DeepSpeedPlugin

        t = self.t
        config = dict(self.engine_file.deepspeed)
        zero = dict(config.get("zero_optimization", {}), stage=t.zero_stage)
        if t.cpu_offload:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
            if t.zero_stage == 3:
                zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        config.update(zero_optimization=zero, train_micro_batch_size_per_gpu=t.batch_size,
                      gradient_accumulation_steps=t.grad_accum, gradient_clipping=t.grad_clip,
                      bf16={"enabled": t.mixed_precision == "bf16"}, fp16={"enabled": t.mixed_precision == "fp16"})
        return DeepSpeedPlugin(hf_ds_config=config)

    def _check_resume_world(self, world: int) -> None:
        written = sharded_state.read_layout(self.resume_state).get("world_size")
        if written is not None and written != world:
            raise UserError(f"{self.resume_state} was written by {written} process(es); this run has {world}. "
                            f"Resume with {written} processes (the sharded state and each process's random "
                            "generators belong to that world size)")

    def prepare(self, model: LanguageModel, optimizer: torch.optim.Optimizer) -> tuple[Any, Any]:
        """Wrap the model and optimizer for this strategy (FSDP units: the family's blocks)."""
        if self.name == "fsdp":
            units = [cls.__name__ for cls in model.shard_units]
            plugin = self.accelerator.state.fsdp_plugin
            if units:
                plugin.transformer_cls_names_to_wrap = units
            else:
                plugin.auto_wrap_policy = None  # the whole model is one unit
        elif self.t.compile:
            model = torch.compile(model)  # sharded strategies compile through Accelerate, after wrapping
        return self.accelerator.prepare(model, optimizer)

    def eval_model(self, model: Any) -> Any:
        """What evaluations run: `model`, but uncompiled where prepare() compiled it (train.compile),
        so that a no-grad forward in eval mode does not compile a second graph of every layer."""
        return self.unwrapped(model) if self.t.compile and not self.sharded else model

    def unwrapped(self, model: Any) -> torch.nn.Module:
        inner = self.accelerator.unwrap_model(model)
        return getattr(inner, "_orig_mod", inner)

    # -- state: save, load, consolidate ------------------------------------------------------

    def save(self, directory: Path, model: Any, optimizer: Any, scaler: Any,
             state: TrainState) -> LanguageModel | None:
        """Write this strategy's part of state/ (every process calls it); the consolidated model,
        on the main process (None elsewhere), for the ordinary checkpoints."""
        acc = self.accelerator
        if self.name == "fsdp":
            from accelerate.utils import save_fsdp_model, save_fsdp_optimizer

            plugin = acc.state.fsdp_plugin
            save_fsdp_model(plugin, acc, model, str(directory / sharded_state.FSDP_DIR))
            save_fsdp_optimizer(plugin, acc, optimizer, model, str(directory / sharded_state.FSDP_DIR))
        elif self.name == "deepspeed":
            model.save_checkpoint(str(directory / sharded_state.DEEPSPEED_DIR), tag=sharded_state.DEEPSPEED_TAG)
        full = self.consolidated(model)
        if acc.is_main_process:
            if self.sharded:
                saved.save_counters(directory, scaler, state)
            else:
                saved.save_shared(directory, full, optimizer, scaler, state)
            sharded_state.write_layout(directory, self.layout(acc.num_processes))
        return full

    def load(self, directory: Path, model: Any, optimizer: Any) -> None:
        """Restore the weights and optimizer state from state/ (every process calls it)."""
        acc = self.accelerator
        if self.name == "ddp":
            saved.load_model_weights(directory, self.unwrapped(model))
            saved.load_optimizer(directory, optimizer)
        elif self.name == "fsdp":
            from accelerate.utils import load_fsdp_model, load_fsdp_optimizer

            base, plugin = directory / sharded_state.FSDP_DIR, acc.state.fsdp_plugin
            for sub in ("pytorch_model_fsdp_0", "optimizer_0"):
                sharded_state.check_dcp_dir(base / sub)
            _engine_load(base, lambda: (load_fsdp_model(plugin, acc, model, str(base)),
                                        load_fsdp_optimizer(plugin, acc, optimizer, model, str(base))))
        else:
            base = directory / sharded_state.DEEPSPEED_DIR
            sharded_state.check_deepspeed_dir(base, acc.num_processes)
            path, _ = _engine_load(base, lambda: model.load_checkpoint(str(base), tag=sharded_state.DEEPSPEED_TAG))
            if path is None:
                raise UserError(f"{base}: DeepSpeed found no checkpoint to load")

    def consolidated(self, model: Any) -> LanguageModel | None:
        """The whole model with float32 weights on the main process, None on the others (a
        collective: every process calls it). DDP's is the live model itself."""
        acc = self.accelerator
        if not self.sharded:
            return self.unwrapped(model) if acc.is_main_process else None
        if self.name == "fsdp":
            tensors = acc.get_state_dict(model)
        else:
            from deepspeed.utils import safe_get_full_fp32_param

            module = self.unwrapped(model)
            tensors = {name: safe_get_full_fp32_param(p).detach().cpu() for name, p in module.named_parameters()}
            tensors.update({name: b.detach().cpu() for name, b in module.named_buffers()})
        if not acc.is_main_process:
            return None
        return _model_from(self.unwrapped(model).config, tensors)

    # -- what it costs -----------------------------------------------------------------------

    def describe(self) -> str:
        t = self.t
        if self.name == "fsdp":
            extra = ", cpu offload" if t.cpu_offload else ""
            extra += ", activation checkpointing" if t.activation_checkpointing else ""
            return f"fsdp (FSDP{t.fsdp_version}, {t.fsdp_sharding}{extra})"
        if self.name == "deepspeed":
            return f"deepspeed (ZeRO-{t.zero_stage}" + (", cpu offload)" if t.cpu_offload else ")")
        return "ddp"

    def held(self, model: Any, optimizer: Any) -> Held:
        """What this process holds now: its weights (its shards, under FSDP and ZeRO-3) and its
        optimizer's state (plus the float32 master copy DeepSpeed keeps)."""
        live = {id(p) for p in self.unwrapped(model).parameters()}
        weights = sum(_local_bytes(getattr(p, "ds_tensor", p)) for p in self.unwrapped(model).parameters())
        inner = optimizer
        while hasattr(inner, "optimizer"):  # Accelerate's and DeepSpeed's wrappers, down to AdamW
            inner = inner.optimizer
        masters = sum(_local_bytes(p) for group in inner.param_groups for p in group["params"] if id(p) not in live)
        moments = sum(_local_bytes(v) for values in inner.state.values() for v in values.values()
                      if isinstance(v, torch.Tensor))
        return Held(weights, masters + moments)


def _model_from(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> LanguageModel:
    """An ordinary float32 model on the CPU holding `tensors` (tied weights tied again)."""
    with torch.device("meta"):
        full = build_model(config)
    for alias, source in full.tied_weights().items():
        tensors.setdefault(alias, tensors[source])
    full.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in tensors.items()}, assign=True)
    full.tie_weights()
    return full


def peak_process_bytes(device: torch.device) -> int:
    """The most memory this process has used: on a GPU, what torch allocated there; on the CPU,
    the peak resident set (the whole process: libraries and data too)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def _engine_load(where: Path, load: Any) -> Any:
    """Run an engine's loader; what it raises on a state that does not fit becomes one line."""
    try:
        return load()
    except (RuntimeError, ValueError, KeyError, AssertionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{where}: cannot be loaded into this run ({first[:300]})") from None
