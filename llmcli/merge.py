"""`llmcli merge`: a LoRA run's adapter folded into its base, written as an ordinary checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from llmcli import ui
from llmcli.checkpoint import (
    GENERATION_CONFIG,
    RUN_CONFIG,
    TOKENIZER,
    TOKENIZER_CONFIG,
    adapter_base,
    check_output_dir,
    is_adapter,
    load_model,
    read_info,
    resolve_checkpoint,
    write_checkpoint,
)
from llmcli.config import Config, LoraConfig
from llmcli.config_loader import load_config
from llmcli.device import select_dtype
from llmcli.errors import UserError
from llmcli.model_card import write_model_card
from llmcli.options.checkpoints import MergeOptions


def merge_command(opts: MergeOptions) -> None:
    out = merge_adapter(opts)
    ui.stdout.print(f"wrote {out}", markup=False, soft_wrap=True)


def merge_adapter(opts: MergeOptions) -> Path:
    """Write base + adapter of `opts.run_dir` as a checkpoint at `opts.out` (nothing on failure)."""
    source = resolve_checkpoint(opts.run_dir)
    if not is_adapter(source):
        raise UserError(f"{source} holds no LoRA adapter (adapter_model.safetensors); it is a checkpoint already")
    base, out = adapter_base(source), Path(opts.out).expanduser()
    check_output_dir(out, opts.overwrite, {"the adapter run": source, "its base": base})
    dtype = select_dtype(opts.dtype, torch.device("cpu"))
    model = load_model(source, dtype=dtype)  # base + adapter, merged (checkpoint.py)
    cfg = load_config(source / RUN_CONFIG) if (source / RUN_CONFIG).is_file() else Config(model=model.config)
    cfg = dataclasses.replace(cfg, model=model.config, train=dataclasses.replace(cfg.train, lora=LoraConfig()))
    files = {name: (source / name).read_bytes() for name in (TOKENIZER_CONFIG, GENERATION_CONFIG)
             if (source / name).is_file()}
    info = {**read_info(source), "merged_from": str(source.resolve()), "base": str(base)}
    write_checkpoint(out, model, cfg, (source / TOKENIZER).read_bytes(), info, files)
    write_model_card(out)
    ui.log(f"merged the adapter of {source} into {base}: {model.num_params():,} parameters, "
           f"{str(dtype).removeprefix('torch.')}")
    return out
