"""`llmcli prune`: a pruned copy of a checkpoint (optionally fine-tuned), and a table measured in the
same run (parameters, file size, val perplexity, decode speed at batch 1 and 8, greedy agreement)
before pruning, after it and after fine-tuning (llmcli/measure.py measures, as for `llmcli quantize`)."""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.table import Table

from llmcli import ui
from llmcli.checkpoint import (
    RUN_CONFIG,
    SOURCE_TOKENIZER,
    TOKENIZER,
    WEIGHTS,
    check_output_dir,
    mark_pruned,
    read_info,
    read_quantization,
    resolve_checkpoint,
    write_checkpoint,
)
from llmcli.config import Config
from llmcli.config_loader import load_config
from llmcli.device import configure_threads
from llmcli.errors import UserError
from llmcli.load import load_checkpoint
from llmcli.measure import (
    agreement,
    decode_sources,
    end_token,
    measure_decode_rounds,
    measure_perplexity,
    mib,
    run_data,
)
from llmcli.model_card import write_model_card
from llmcli.models.base import LanguageModel
from llmcli.options.checkpoints import PruneOptions
from llmcli.prune import magnitude, structured


@dataclass
class Column:
    """One model of the table."""

    name: str
    directory: Path
    parameters: int
    size_bytes: int
    perplexity: float | None = None
    eval_tokens: int = 0
    decode: dict[int, list[float]] = field(default_factory=dict)  # batch -> tok/s of each timed round
    agreement: float | None = None  # share of greedy tokens equal to the original's


@dataclass
class PruneReport:
    entry: dict
    out: Path
    columns: list[Column]


def prune_command(opts: PruneOptions) -> None:
    configure_threads(opts.threads)
    print_report(prune_checkpoint(opts, log=ui.log))


def prune_checkpoint(opts: PruneOptions, log: Callable[[str], None] = lambda message: None) -> PruneReport:
    """Prune `opts.run_dir` into `opts.out` (see the module docstring)."""
    source = resolve_checkpoint(opts.run_dir)
    out = Path(opts.out).expanduser()
    check_output_dir(out, opts.overwrite, {"the checkpoint being pruned": source,
                                           "the run being pruned": Path(opts.run_dir).expanduser()})
    if (quantized := read_quantization(source)) is not None:
        raise UserError(f"{source} is quantized ({quantized['method']}); prune the float checkpoint it was made from")
    for name in (TOKENIZER, RUN_CONFIG):
        if not (source / name).is_file():
            raise UserError(f"{source} has no {name}; is it a checkpoint written by llmcli train?")
    run_config = load_config(source / RUN_CONFIG)
    model = load_checkpoint(source).model
    log(f"pruning {source} ({opts.method})")
    pruned, entry = _pruned(opts, model, source, run_config)
    for stack, layers in entry.get("removed_layers", {}).items():
        log(f"removed {stack}: layer {', '.join(map(str, layers))} (the smallest rise of the calibration loss)")
    kept = {k: v for k, v in read_info(source).items() if not k.startswith("val_")}  # not this model's
    info = {**kept, "pruning": entry, "pruned_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    pruned_config = dataclasses.replace(run_config, model=pruned.config)
    staging = tempfile.TemporaryDirectory(prefix=f".{out.name}.pruned.", dir=out.parent if out.parent.is_dir()
                                          else None) if opts.finetune_steps else contextlib.nullcontext()
    with staging as tmp:
        staged = Path(tmp) / "pruned" if opts.finetune_steps else out
        _write(staged, mark_pruned(pruned, entry), pruned_config, source, info)
        models = [("original", source, model.eval()), (f"{opts.method} pruned", staged, pruned.eval())]
        if opts.finetune_steps:
            log(f"fine-tuning for {opts.finetune_steps} steps into {out}")
            _finetune(staged, source, out, opts)
            models.append((f"+ {opts.finetune_steps} steps", out, load_checkpoint(out).model))
        columns = _measure(opts, models, log)
    return PruneReport(entry, out, columns)


def _pruned(opts: PruneOptions, model: LanguageModel, source: Path, run_config: Config
            ) -> tuple[LanguageModel, dict]:
    """The pruned model and its `pruning` entry."""
    if opts.method == "magnitude":
        pruned = magnitude.prune(model_copy(model), opts.sparsity, opts.scope)
        return pruned, {"method": "magnitude", "sparsity": opts.sparsity, "scope": opts.scope,
                        "from": str(source.resolve())}
    if opts.method == "2:4":
        pruned = magnitude.semi_structured(model_copy(model), next(model.parameters()).device)
        return pruned, {"method": "2:4", "sparsity": 0.5, "from": str(source.resolve())}
    parts = {part: opts.sparsity for part in structured.parts_of(model)} if opts.sparsity is not None else {}
    parts.update(opts.parts())
    batches = calibration_batches(source, run_config, model, opts.calibration_batches)
    pruned, removed = structured.prune(model, parts, batches, opts.layers or 0)
    layers = {"layers": opts.layers, "removed_layers": removed} if opts.layers else {}
    return pruned.eval(), {"method": "structured", "from": str(source.resolve()), **parts, **layers}


def model_copy(model: LanguageModel) -> LanguageModel:
    """A copy to prune in place, the original kept for the table."""
    import copy

    return copy.deepcopy(model)


def calibration_batches(source: Path, run_config: Config, model: LanguageModel, count: int):
    """The first `count` training batches of the run's own data, as training draws them."""
    from llmcli.train.batches import training_data

    data = training_data(run_data(source, model), run_config, 1)
    return [data.train.batch(step, 0) for step in range(count)]


def _write(directory: Path, model: LanguageModel, cfg: Config, source: Path, info: dict) -> None:
    own = source / SOURCE_TOKENIZER
    write_checkpoint(directory, model, cfg, (source / TOKENIZER).read_bytes(), info,
                     {SOURCE_TOKENIZER: own.read_bytes()} if own.is_file() else None)
    write_model_card(directory)


def _finetune(pruned: Path, source: Path, out: Path, opts: PruneOptions) -> None:
    """`llmcli train --init-from PRUNED --out OUT` on the run's own data and training settings, for
    `opts.finetune_steps` steps at a third of its learning rate (train.* overrides come last)."""
    from llmcli.train.loop import train
    from llmcli.train.run_dir import RunPlan, init_from_config

    t = load_config(source / RUN_CONFIG).train
    steps = opts.finetune_steps
    defaults = [f"train.max_steps={steps}", "train.max_minutes=null", "train.max_epochs=null",
                f"train.lr={t.lr / 3:g}", f"train.min_lr={min(t.min_lr, t.lr / 3):g}",
                f"train.warmup_steps={min(t.warmup_steps, steps // 10)}", "train.lr_decay_steps=null",
                f"train.eval_interval={min(t.eval_interval, steps)}"]
    for item in opts.overrides or []:
        if not item.strip().startswith("train."):
            raise UserError(f"override '{item}': only train.* settings apply to --finetune-steps")
    cfg = init_from_config(pruned, pruned / RUN_CONFIG, [*defaults, *(opts.overrides or [])])
    # The run's config names the original tokenizer: the staged copy is gone once this returns.
    cfg = dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=str((source / TOKENIZER).resolve())))
    train(RunPlan(cfg, out, overwrite=opts.overwrite, init_from=pruned))


def _measure(opts: PruneOptions, models: list[tuple[str, Path, LanguageModel]],
             log: Callable[[str], None]) -> list[Column]:
    """A measured Column for each (name, directory, model); decoding is timed in interleaved rounds."""
    columns = [Column(name, directory, model.num_params(), (directory / WEIGHTS).stat().st_size)
               for name, directory, model in models]
    nets = [model for _, _, model in models]
    if opts.eval_tokens:
        for column, model in zip(columns, nets, strict=True):
            log(f"measuring perplexity: {column.name}")
            column.perplexity, column.eval_tokens = measure_perplexity(column.directory, model, opts.eval_tokens)
    if not opts.decode_tokens:
        return columns
    first = columns[0].directory
    sources = decode_sources(first, nets[0])
    for batch in (1, 8) if sources is None else (1,):  # a seq2seq model decodes its sources one by one
        log(f"timing decoding at batch {batch}, the models in turn")
        with torch.inference_mode():
            timed = measure_decode_rounds(nets, opts.decode_tokens, [end_token(first)], sources=sources, batch=batch)
        reference = timed[0][1]
        for column, (speeds, tokens) in zip(columns, timed, strict=True):
            column.decode[batch] = speeds
            if batch == 1:
                column.agreement = agreement(reference, tokens)
    return columns


def print_report(report: PruneReport, console=None) -> None:
    console = console or ui.stdout
    entry = report.entry
    shares = ", ".join(f"{key} {value:g}" for key, value in entry.items()
                       if key not in ("method", "from") and isinstance(value, (int, float)))
    title = f"prune {entry['method']}" + (f" ({shares})" if shares else "") + \
        (f", scope {entry['scope']}" if "scope" in entry else "")
    table = Table(title=title)
    table.add_column("")
    for column in report.columns:
        table.add_column(column.name, justify="right")
    table.add_column("change", justify="right")
    first, last = report.columns[0], report.columns[-1]

    def row(label: str, values: list[str], change: str) -> None:
        table.add_row(label, *values, change)

    row("parameters", [f"{c.parameters:,}" for c in report.columns], f"{last.parameters / first.parameters:.3f}x")
    row("weights file", [mib(c.size_bytes) for c in report.columns], f"{last.size_bytes / first.size_bytes:.3f}x")
    if first.perplexity is not None:
        row(f"val perplexity ({first.eval_tokens:,} tokens)", [f"{c.perplexity:.4f}" for c in report.columns],
            f"{100 * (last.perplexity / first.perplexity - 1):+.2f}%")
    for batch in first.decode:
        speeds = [statistics.median(c.decode[batch]) for c in report.columns]
        row(f"decode tok/s (batch {batch}, greedy)", [f"{v:.1f}" for v in speeds], f"{speeds[-1] / speeds[0]:.2f}x")
    if first.agreement is not None:
        row("greedy tokens equal to the original's", [f"{100 * c.agreement:.0f}%" for c in report.columns], "")
    console.print(table)
    console.print(f"wrote {report.out}", markup=False, soft_wrap=True)
