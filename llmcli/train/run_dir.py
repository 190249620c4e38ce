"""Run directories: what one holds, and the rules for `--out`, `--resume` and `--init-from`.

`plan_run` turns the command's options into a `RunPlan` (the config to train with, resolved before
any work starts, and where): a new run, a resumed one (its own config, only train.* may change;
a run killed before its first checkpoint starts again from step 0), or a fine-tune (the
checkpoint's model and tokenizer, the user's data and training settings). A run's output never
overlaps what it reads (the checkpoint it starts from, its data, its tokenizer file).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from llmcli import ui
from llmcli.checkpoint import (
    MODEL_CONFIG,
    SOURCE_TOKENIZER,
    TOKENIZER,
    model_config_from_json,
    read_quantization,
    resolve_checkpoint,
)
from llmcli.config import FROM_DATA, Config
from llmcli.config_loader import load_config
from llmcli.data.sources import local_inputs
from llmcli.errors import UserError
from llmcli.io import atomic_write_text, ensure_writable_dir, refuse_overlap
from llmcli.options.training import TrainOptions
from llmcli.train.finetune import check_lora_plan
from llmcli.train.state import TRAINER_STATE, load_trainer_state

STATE_DIR = "state"
METRICS = "metrics.jsonl"
RUN_MARKERS = ("config.yaml", STATE_DIR, "last", "best", "model.safetensors", METRICS)


def staging_dir(out_dir: Path) -> Path:
    """Where `--overwrite` builds the new run, beside the old one, until it has a checkpoint."""
    return out_dir.with_name(f".{out_dir.name}.overwrite.tmp")


@dataclass(frozen=True)
class RunPlan:
    cfg: Config
    out_dir: Path
    resume: bool = False
    overwrite: bool = False
    init_from: Path | None = None  # a checkpoint whose weights the new run starts from
    plot: bool = False  # --plot: write curves.png at every evaluation


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
    check_lora_plan(cfg, opts.init_from)
    return RunPlan(cfg, opts.out.expanduser(), overwrite=opts.overwrite, init_from=opts.init_from)


def inputs(cfg: Config, init_from: Path | None) -> dict[str, Path]:
    """What a run reads from disk, by description: no output may overlap them."""
    found = {}
    if init_from is not None:
        found["the checkpoint to start from"] = Path(init_from)
        found["the checkpoint's weights"] = resolve_checkpoint(init_from)
    found.update(local_inputs(cfg.data))
    if cfg.tokenizer.path:
        found["the tokenizer file"] = Path(cfg.tokenizer.path)
    if cfg.data.task == "seq2seq" and cfg.source_tokenizer.path:
        found["the source tokenizer file"] = Path(cfg.source_tokenizer.path)
    return found


def resume_config(run_dir: Path, config_path: Path | None, overrides: list[str]) -> Config:
    """The config to resume with: the run's own, with train.* overrides (e.g. more steps).

    A different model, data or tokenizer would not continue the same run, so those are refused.
    """
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise UserError(f"nothing to resume in {run_dir} (no config.yaml: is it a run directory?)")
    base = load_config(saved)
    if config_path is not None:
        other = load_config(config_path)
        for section in ("model", "data", "tokenizer", "source_tokenizer"):
            old, new = asdict(getattr(base, section)), asdict(getattr(other, section))
            for key in old:
                if section == "model" and key in FROM_DATA and new[key] is None:
                    continue  # filled in from the data when the run started
                if old[key] != new[key]:
                    raise UserError(f"{config_path} has {section}.{key}={new[key]!r} but the run "
                                    f"in {run_dir} was trained with {old[key]!r}; cannot resume")
    for item in overrides:
        if not item.strip().startswith("train."):
            raise UserError(f"override '{item}': only train.* settings can change on --resume")
    cfg = load_config(saved, overrides)
    if (run_dir / STATE_DIR / TRAINER_STATE).is_file():
        _refuse_nothing_to_do(run_dir, cfg, load_trainer_state(run_dir / STATE_DIR).step)
    return cfg


def _refuse_nothing_to_do(run_dir: Path, cfg: Config, step: int) -> None:
    t = cfg.train
    if t.max_steps is not None and t.max_steps < step:
        raise UserError(f"train.max_steps={t.max_steps} is below the step {run_dir} has reached ({step}); "
                        f"pass train.max_steps above {step} to train further")
    if t.max_steps == step:
        raise UserError(f"{run_dir} is already at step {step}, its train.max_steps; pass train.max_steps=N "
                        f"(more than {step}) to train further")


def init_from_config(checkpoint: Path, config_path: Path | None, overrides: list[str]) -> Config:
    """The config to fine-tune `checkpoint` with: its model and tokenizer, the user's data and train.

    Only model.dropout may differ from the checkpoint; other model settings define its weights.
    """
    directory = resolve_checkpoint(checkpoint)
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key.startswith(("model.", "tokenizer.", "source_tokenizer.")) and key != "model.dropout":
            raise UserError(f"override '{item}': with --init-from the model and tokenizer come from "
                            f"{directory}; only model.dropout can change")
    cfg = load_config(config_path, overrides)
    if read_quantization(directory) is not None and cfg.train.lora.r is None:
        raise UserError(f"{directory} is quantized; fine-tune the full-precision checkpoint, or train a LoRA "
                        "adapter on this one (train.lora.r=8)")
    model = dataclasses.replace(model_config_from_json(directory / MODEL_CONFIG), dropout=cfg.model.dropout)
    if model.task != cfg.data.task:
        raise UserError(f"{directory} holds a model.arch={model.arch} model ({model.task}) but the data is "
                        f"data.task={cfg.data.task}; set data.task={model.task}")
    tokenizer = dataclasses.replace(cfg.tokenizer, path=str((directory / TOKENIZER).resolve()))
    source = cfg.source_tokenizer
    if model.task == "seq2seq":  # the source side's own tokenizer, or the shared one
        own = directory / SOURCE_TOKENIZER
        source = dataclasses.replace(source, kind="char", path=str(own.resolve())) if own.is_file() else \
            dataclasses.replace(source, kind="shared", path=None)
    return dataclasses.replace(cfg, model=model, tokenizer=tokenizer, source_tokenizer=source)


def check_out_dir(plan: RunPlan) -> None:
    """A new run's --out: not overlapping its inputs, and not holding a run unless --overwrite."""
    out_dir, overwrite = plan.out_dir, plan.overwrite
    refuse_overlap(out_dir, inputs(plan.cfg, plan.init_from))
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out must be a directory: {out_dir}")
    existing = [name for name in RUN_MARKERS if (out_dir / name).exists()]
    if existing and not overwrite:
        raise UserError(f"{out_dir} already holds a run ({', '.join(existing)}); "
                        "use --resume to continue it or --overwrite to replace it")
    ensure_writable_dir(out_dir)


@contextmanager
def removed_if_left_empty(out_dir: Path) -> Iterator[None]:
    """A run that fails before writing anything leaves no empty --out behind it."""
    existed = out_dir.exists()
    try:
        yield
    except BaseException:
        if not existed and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be redone). A torn
    last line (a kill during its write) is dropped with a warning; a damaged earlier one is refused."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step", 0), int):
                raise ValueError("not a metrics row")
        except ValueError:
            if number == len(lines):
                ui.log(f"warning: {path}: dropped its torn last line ({line[:40]!r}...)")
                break
            raise UserError(f"{path}: line {number} is not a metrics row; fix or remove it to resume") from None
        if row.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
