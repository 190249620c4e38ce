"""`llmcli quantize`: a quantized copy of a checkpoint, and a table measured in the same run
(file size, val perplexity, batch-1 decode speed, greedy agreement; llmcli/measure.py measures)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from llmcli import ui
from llmcli.checkpoint import (
    RUN_CONFIG,
    SOURCE_TOKENIZER,
    TOKENIZER,
    WEIGHTS,
    check_output_dir,
    read_info,
    read_quantization,
    resolve_checkpoint,
    write_checkpoint,
)
from llmcli.config_loader import load_config
from llmcli.errors import UserError
from llmcli.load import load_checkpoint
from llmcli.measure import agreement, decode_sources, end_token, measure_decode_pair, measure_perplexity, mib
from llmcli.model_card import write_model_card
from llmcli.options.checkpoints import QuantizeOptions
from llmcli.quantize.modules import (
    DEFAULT_GROUP_SIZE,
    check_quantizable,
    quantization_entry,
    quantize_model,
    quantized_layer_count,
)


@dataclass
class Measurement:
    size_bytes: int
    perplexity: float | None = None
    eval_tokens: int = 0
    decode_tokens_per_second: float | None = None


@dataclass
class QuantizeReport:
    source: Path
    out: Path
    entry: dict
    before: Measurement
    after: Measurement
    layers: int
    source_dtype: str = "float32"
    greedy_agreement: float | None = None  # share of the greedy tokens that match the original


def quantize_command(opts: QuantizeOptions) -> None:
    print_report(quantize_checkpoint(opts, log=ui.log))


def quantize_checkpoint(opts: QuantizeOptions, log: Callable[[str], None] = lambda message: None) -> QuantizeReport:
    """Quantize a run's (or checkpoint's) weights into a new checkpoint directory `opts.out`."""
    entry = quantization_entry(opts.method, opts.group_size, opts.include_embeddings)
    out = Path(opts.out).expanduser()
    source = resolve_checkpoint(opts.run_dir)
    check_output_dir(out, opts.overwrite, {"the checkpoint being quantized": source,
                                           "the run being quantized": Path(opts.run_dir).expanduser()})
    existing = read_quantization(source)
    if existing is not None:
        raise UserError(f"{source} is already quantized ({existing['method']}); quantize the float "
                        "checkpoint it was made from")
    for name in (TOKENIZER, RUN_CONFIG):
        if not (source / name).is_file():
            raise UserError(f"{source} has no {name}; is it a checkpoint written by llmcli train?")

    model = load_checkpoint(source).model
    try:
        check_quantizable(model, entry)
    except UserError as exc:
        if opts.method == "int4" and opts.group_size is None:
            raise UserError(f"{exc} ({DEFAULT_GROUP_SIZE} is the default)") from None
        raise
    source_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    before = Measurement(size_bytes=(source / WEIGHTS).stat().st_size)
    if opts.eval_tokens:
        log(f"measuring the {source_dtype} model's perplexity")
    before.perplexity, before.eval_tokens = measure_perplexity(source, model, opts.eval_tokens)

    quantize_model(model, entry)
    info = {**read_info(source), "quantization": entry, "quantized_from": str(source.resolve()),
            "quantized_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    own_source = source / SOURCE_TOKENIZER  # a seq2seq model's source side, when it has its own
    write_checkpoint(out, model, load_config(source / RUN_CONFIG), (source / TOKENIZER).read_bytes(), info,
                     {SOURCE_TOKENIZER: own_source.read_bytes()} if own_source.is_file() else None)
    write_model_card(out)
    layers = quantized_layer_count(model)
    del model
    report = QuantizeReport(source=source, out=out, entry=entry, before=before,
                            after=Measurement(size_bytes=(out / WEIGHTS).stat().st_size), layers=layers,
                            source_dtype=source_dtype)
    if opts.eval_tokens or opts.decode_tokens:
        quantized = load_checkpoint(out).model  # exactly what eval / generate will load
        if opts.eval_tokens:
            log("measuring the quantized model's perplexity")
            report.after.perplexity, report.after.eval_tokens = measure_perplexity(out, quantized, opts.eval_tokens)
        if opts.decode_tokens:
            log("timing decoding, both models in turn")
            original = load_checkpoint(source).model
            (fp, reference), (q, tokens) = measure_decode_pair(original, quantized, opts.decode_tokens, [end_token(source)],
                                                               sources=decode_sources(source, original))
            before.decode_tokens_per_second = statistics.median(fp)
            report.after.decode_tokens_per_second = statistics.median(q)
            report.greedy_agreement = agreement(reference, tokens)
    return report


def print_report(report: QuantizeReport, console=None) -> None:
    console = console or ui.stdout
    entry = report.entry
    method = entry["method"] + (f" g{entry['group_size']}" if entry["group_size"] else "")
    if entry["include_embeddings"]:
        method += " + embeddings"
    table = Table(title=f"quantize {method}: {report.layers} layers")
    table.add_column("")
    table.add_column(report.source_dtype, justify="right")
    table.add_column(entry["method"], justify="right")
    table.add_column("change", justify="right")
    b, a = report.before, report.after
    table.add_row("weights file", mib(b.size_bytes), mib(a.size_bytes), f"{a.size_bytes / b.size_bytes:.3f}x")
    if b.perplexity is not None and a.perplexity is not None:
        table.add_row(f"val perplexity ({a.eval_tokens:,} tokens)", f"{b.perplexity:.4f}", f"{a.perplexity:.4f}",
                      f"{100 * (a.perplexity / b.perplexity - 1):+.2f}%")
    if b.decode_tokens_per_second and a.decode_tokens_per_second:
        table.add_row("decode tok/s (batch 1, greedy)", f"{b.decode_tokens_per_second:.1f}",
                      f"{a.decode_tokens_per_second:.1f}",
                      f"{a.decode_tokens_per_second / b.decode_tokens_per_second:.2f}x")
    if report.greedy_agreement is not None:
        table.add_row(f"greedy tokens equal to {report.source_dtype}'s", "",
                      f"{100 * report.greedy_agreement:.0f}%", "")
    console.print(table)
    console.print(f"wrote {report.out}", markup=False, soft_wrap=True)
