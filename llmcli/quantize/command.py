"""`llmcli quantize`: a quantized copy of a checkpoint, and a table measured in the same run
(file size, val perplexity, batch-1 decode speed, greedy agreement)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch.nn as nn
from rich.table import Table

from llmcli import ui
from llmcli.checkpoint import (
    RUN_CONFIG,
    SOURCE_TOKENIZER,
    TOKENIZER,
    WEIGHTS,
    check_output_dir,
    load_model,
    read_info,
    read_quantization,
    resolve_checkpoint,
    write_checkpoint,
)
from llmcli.config_loader import load_config
from llmcli.errors import UserError
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

    model = load_model(source).eval()
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
    layers = quantized_layer_count(model)
    del model
    report = QuantizeReport(source=source, out=out, entry=entry, before=before,
                            after=Measurement(size_bytes=(out / WEIGHTS).stat().st_size), layers=layers,
                            source_dtype=source_dtype)
    if opts.eval_tokens or opts.decode_tokens:
        quantized = load_model(out).eval()  # exactly what eval / generate will load
        if opts.eval_tokens:
            log("measuring the quantized model's perplexity")
            report.after.perplexity, report.after.eval_tokens = measure_perplexity(out, quantized, opts.eval_tokens)
        if opts.decode_tokens:
            log("timing decoding, both models in turn")
            original = load_model(source).eval()
            (fp, reference), (q, tokens) = measure_decode_pair(original, quantized, opts.decode_tokens, [end_token(source)],
                                                               sources=decode_sources(source, original))
            before.decode_tokens_per_second = statistics.median(fp)
            report.after.decode_tokens_per_second = statistics.median(q)
            same = sum(a == b for a, b in zip(reference, tokens, strict=False))
            report.greedy_agreement = same / max(1, len(reference))
    return report


def end_token(directory: Path) -> int:
    from llmcli.tokenizer import eot_id, load_tokenizer

    return eot_id(load_tokenizer(directory / TOKENIZER))


def run_data(directory: Path, model: nn.Module):
    """The run's own data (its pairs, for a seq2seq model), as `llmcli eval` reads it."""
    from llmcli.data.prepare import prepare_data
    from llmcli.data.prepare_pairs import prepare_pairs
    from llmcli.evaluate import data_config
    from llmcli.evaluate_pairs import with_source_tokenizer

    try:
        cfg = data_config(directory, None, [])
        if model.task == "seq2seq":
            return prepare_pairs(with_source_tokenizer(cfg, directory), console=ui.stderr)
        return prepare_data(cfg, console=ui.stderr)
    except UserError as exc:
        raise UserError(f"{exc} (measuring needs the run's data; --eval-tokens 0 --decode-tokens 0 skip it)") from None


def decode_sources(directory: Path, model: nn.Module) -> list[list[int]] | None:
    """seq2seq: the val sources decoding is timed on (None for a language model)."""
    if model.task != "seq2seq":
        return None
    from llmcli.evaluate_pairs import first_sources

    return first_sources(run_data(directory, model), "val", 256)


def measure_perplexity(directory: Path, model: nn.Module, eval_tokens: int) -> tuple[float | None, int]:
    """Perplexity on the first `eval_tokens` tokens of the run's own val split, scored by
    llmcli.evaluate (sliding windows, as `llmcli eval`; a seq2seq model's targets by teacher
    forcing); (None, 0) when eval_tokens is 0."""
    if eval_tokens == 0:
        return None, 0
    from llmcli.evaluate import metrics_from_sums, score_tokens

    prepared = run_data(directory, model)
    if "val" not in prepared.splits:
        raise UserError("the run's data has no val split to measure perplexity on; pass --eval-tokens 0")
    if model.task == "seq2seq":
        from llmcli.evaluate_pairs import pairs_perplexity

        return pairs_perplexity(model, prepared, "val", eval_tokens)
    tokens = prepared.tokens("val")[:eval_tokens]
    metrics = metrics_from_sums(score_tokens(model, tokens, first_token=end_token(directory)))
    return metrics["perplexity"], int(metrics["tokens"])


def measure_decode(model: nn.Module, new_tokens: int, prompt_ids: list[int],
                   sources: list[list[int]] | None = None, batch: int = 1) -> tuple[float, list[int]]:
    """One greedy generation of `new_tokens` with llmcli.generate's engine:
    (decode tok/s, the tokens). A seq2seq model decodes `sources` one after another (each to its
    end token) until it has `new_tokens` tokens. With `batch` > 1 (language models), that many
    copies of the request decode together; the tokens are the first one's."""
    from llmcli.generate.engine import Engine
    from llmcli.options.sampling import SamplingParams

    if sources is not None:
        engine, tokens = Engine(model, max_batch_size=1), []
        params = SamplingParams(max_new_tokens=(model.context_length or model.config.block_size + 1) - 1,
                                temperature=0.0)
        for source in sources:
            engine.add(prompt_ids, params, stop_token_ids=prompt_ids, source_ids=source)
            while engine.has_work():
                tokens += [ev.token for ev in engine.step()]
            if len(tokens) >= new_tokens:
                break
        stats = engine.stats
        return (stats["decode_tokens"] / stats["decode_seconds"] if stats["decode_seconds"] > 0 else 0.0), tokens
    if model.context_length is not None:
        new_tokens = max(1, min(new_tokens, model.context_length - len(prompt_ids)))
    engine = Engine(model, max_batch_size=batch)
    params = SamplingParams(max_new_tokens=new_tokens + 1, temperature=0.0, ignore_eot=True)
    request = [engine.add(prompt_ids, params) for _ in range(batch)][0]
    tokens = []
    while engine.has_work():
        tokens += [ev.token for ev in engine.step() if ev.id == request]
    stats = engine.stats
    return (stats["decode_tokens"] / stats["decode_seconds"] if stats["decode_seconds"] > 0 else 0.0), tokens


def measure_decode_pair(a: nn.Module, b: nn.Module, new_tokens: int, prompt_ids: list[int], *,
                        rounds: int = 3, sources: list[list[int]] | None = None
                        ) -> tuple[tuple[list[float], list[int]], tuple[list[float], list[int]]]:
    """Decode speed of two models timed in turn (a, b, a, b, ...) after a warm-up run of each, so
    that load from other jobs on the machine hits both alike. Returns ((tok/s per round, tokens)
    of a, (tok/s per round, tokens) of b)."""
    first, second = measure_decode_rounds([a, b], new_tokens, prompt_ids, rounds=rounds, sources=sources)
    return first, second


def measure_decode_rounds(models: list[nn.Module], new_tokens: int, prompt_ids: list[int], *, rounds: int = 3,
                          sources: list[list[int]] | None = None, batch: int = 1
                          ) -> list[tuple[list[float], list[int]]]:
    """Decode speed of several models timed in turn, round after round, after a warm-up run of
    each: per model (tok/s per round, the warm-up's greedy tokens)."""
    tokens = [measure_decode(model, new_tokens, prompt_ids, sources, batch)[1] for model in models]  # warm-up
    speeds: list[list[float]] = [[] for _ in models]
    for _ in range(rounds):
        for speed, model in zip(speeds, models, strict=True):
            speed.append(measure_decode(model, new_tokens, prompt_ids, sources, batch)[0])
    return list(zip(speeds, tokens, strict=True))


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


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


