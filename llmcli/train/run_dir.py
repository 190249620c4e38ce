"""Run directories: what one holds, and the rules for `--out`, `--resume` and `--init-from`.

`plan_run` turns the command's options into a `RunPlan` (the config to train with, resolved before
any work starts, and where): a new run, a resumed one (its own config, only train.* may change),
or a fine-tune (the checkpoint's model and tokenizer, the user's data and training settings).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from llmcli.checkpoint import (
    MODEL_CONFIG,
    TOKENIZER,
    model_config_from_json,
    read_quantization,
    resolve_checkpoint,
)
from llmcli.config import Config, load_config
from llmcli.errors import UserError
from llmcli.io import atomic_write_text, ensure_writable_dir
from llmcli.options import TrainOptions

STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"
METRICS = "metrics.jsonl"
RUN_MARKERS = ("config.yaml", STATE_DIR, "last", "best", "model.safetensors", METRICS)


@dataclass(frozen=True)
class RunPlan:
    cfg: Config
    out_dir: Path
    resume: bool = False
    overwrite: bool = False
    init_from: Path | None = None  # a checkpoint whose weights the new run starts from


def plan_run(opts: TrainOptions) -> RunPlan:
    overrides = opts.overrides or []
    if opts.resume is not None:
        if opts.init_from is not None:
            raise UserError("--init-from starts a new run; --resume continues one (use one of them)")
        if opts.out is not None and opts.out.resolve() != opts.resume.resolve():
            raise UserError("--out and --resume name different directories; --resume continues in place")
        return RunPlan(resume_config(opts.resume, opts.config, overrides), opts.resume.expanduser(), resume=True)
    if opts.out is None:
        raise UserError("missing --out RUN_DIR (or --resume RUN_DIR to continue a run)")
    if opts.init_from is not None:
        cfg = init_from_config(opts.init_from, opts.config, overrides)
    else:
        cfg = load_config(opts.config, overrides)
    return RunPlan(cfg, opts.out.expanduser(), overwrite=opts.overwrite, init_from=opts.init_from)


def resume_config(run_dir: Path, config_path: Path | None, overrides: list[str]) -> Config:
    """The config to resume with: the run's own, with train.* overrides (e.g. more steps).

    A different model, data or tokenizer would not continue the same run, so those are refused.
    """
    saved = run_dir / "config.yaml"
    if not (run_dir / STATE_DIR / TRAINER_STATE).is_file() or not saved.is_file():
        raise UserError(f"nothing to resume in {run_dir} (no {STATE_DIR}/{TRAINER_STATE})")
    base = load_config(saved)
    if config_path is not None:
        other = load_config(config_path)
        for section in ("model", "data", "tokenizer"):
            old, new = asdict(getattr(base, section)), asdict(getattr(other, section))
            for key in old:
                if section == "model" and key == "vocab_size" and new[key] is None:
                    continue  # filled in from the tokenizer when the run started
                if old[key] != new[key]:
                    raise UserError(f"{config_path} has {section}.{key}={new[key]!r} but the run "
                                    f"in {run_dir} was trained with {old[key]!r}; cannot resume")
    for item in overrides:
        if not item.strip().startswith("train."):
            raise UserError(f"override '{item}': only train.* settings can change on --resume")
    return load_config(saved, overrides)


def init_from_config(checkpoint: Path, config_path: Path | None, overrides: list[str]) -> Config:
    """The config to fine-tune `checkpoint` with: its model and tokenizer, the user's data and train.

    Only model.dropout may differ from the checkpoint; other model settings define its weights.
    """
    directory = resolve_checkpoint(checkpoint)
    if read_quantization(directory) is not None:
        raise UserError(f"{directory} is quantized; fine-tune from the full-precision checkpoint")
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith(("model.", "tokenizer.")) and key != "model.dropout":
            raise UserError(f"override '{item}': with --init-from the model and tokenizer come from "
                            f"{directory}; only model.dropout can change")
    cfg = load_config(config_path, overrides)
    model = dataclasses.replace(model_config_from_json(directory / MODEL_CONFIG), dropout=cfg.model.dropout)
    tokenizer = dataclasses.replace(cfg.tokenizer, path=str((directory / TOKENIZER).resolve()))
    return dataclasses.replace(cfg, model=model, tokenizer=tokenizer)


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out must be a directory: {out_dir}")
    existing = [name for name in RUN_MARKERS if (out_dir / name).exists()]
    if existing and not overwrite:
        raise UserError(f"{out_dir} already holds a run ({', '.join(existing)}); "
                        "use --resume to continue it or --overwrite to replace it")
    ensure_writable_dir(out_dir)


def clear_run(out_dir: Path) -> None:
    for name in RUN_MARKERS + ("tokenizer.json", "model.json", "checkpoint.json"):
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip()
            and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
