"""Scoring a model on held-out text: loss, perplexity, next-token accuracy and bits per byte.

The scored sequence is the split's token array exactly as `prepare_data` wrote it (every document
followed by <|endoftext|>), or a text file's tokens, with one <|endoftext|> put in front so that
the very first token is predicted too (from a document start, like every other document's first
token). So every token of the text is scored exactly once, and `tokens` = tokens in the array.

Sliding window. A text longer than the context is scored with windows of block_size tokens that
advance by `stride` (1 <= stride <= block_size; default block_size // 2). The first window scores
all its predictions; each later window scores only the predictions the previous window did not,
i.e. its last `stride` (the final window is aligned with the end of the text, so it scores fewer).
So every token is scored once, and each one after the first window is predicted from at least
block_size - stride + 1 tokens of context. stride = block_size gives disjoint blocks (fastest,
least context); smaller strides give more context per token at proportionally more compute.

Carried state. A model without a context limit (`context_length` None: the recurrent families)
is not windowed: the text runs through it once, in chunks of `batch_size * block_size` tokens,
its decode state carried from each chunk to the next, so every token is predicted from the whole
text before it, exactly as one forward over the whole text would.

Bits per byte = total loss in nats / ln 2 / UTF-8 bytes of the scored text. It does not depend on
the tokenizer, so character-level and BPE models can be compared on the same text.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table

from llmcli import ui
from llmcli.checkpoint import RUN_CONFIG, TOKENIZER, read_info
from llmcli.config import Config
from llmcli.config_loader import load_config
from llmcli.data.shards import TokenShards
from llmcli.device import configure_threads, select_device, select_dtype
from llmcli.errors import FieldError, UserError
from llmcli.io import read_text_file
from llmcli.load import load_checkpoint
from llmcli.models.base import Rows
from llmcli.options.inference import EvalOptions
from llmcli.tokenizer import UNK, encode, eot_id, unknown_chars, unknown_noun

DEFAULT_BATCH = 8  # windows per forward
_OVERRIDE = re.compile(r"^(data|tokenizer|model|train)\.[A-Za-z_][A-Za-z0-9_]*=")


def window_plan(n_tokens: int, block_size: int, stride: int) -> list[tuple[int, int]]:
    """The windows that score a sequence of `n_tokens` tokens: a list of (start, skip).

    Every window has length L = min(block_size, n_tokens - 1); window (start, skip) feeds tokens
    [start, start + L) and scores its outputs skip..L-1, where output i predicts token start + i + 1.
    Together they score each of tokens 1..n_tokens-1 exactly once.
    """
    if not 1 <= stride <= block_size:
        raise FieldError("stride", f"must be between 1 and the block size ({block_size}); got {stride}")
    if n_tokens < 2:
        return []
    length = min(block_size, n_tokens - 1)
    plan = [(0, 0)]
    last = length  # the last token scored so far
    while last < n_tokens - 1:
        end = min(last + stride, n_tokens - 1)
        start = end - length
        plan.append((start, last - start))
        last = end
    return plan


class _Sequence:
    """A token array with an optional virtual first token (no copy of the array)."""

    def __init__(self, tokens: np.ndarray | torch.Tensor | Sequence[int], first: int | None):
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.cpu().numpy()
        self.tokens = tokens if isinstance(tokens, TokenShards) else np.asarray(tokens)  # shards: read by slice
        self.first = first
        self.offset = 0 if first is None else 1

    def __len__(self) -> int:
        return len(self.tokens) + self.offset

    def slice(self, start: int, stop: int) -> np.ndarray:
        if self.offset and start == 0:
            rest = self.tokens[: stop - 1].astype(np.int64)
            return np.concatenate([np.array([self.first], dtype=np.int64), rest])
        return self.tokens[start - self.offset: stop - self.offset].astype(np.int64)


class _Sums:
    """Running totals of scored predictions, kept on the device until the end."""

    def __init__(self, device: torch.device | str):
        self.nll = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.correct5 = torch.zeros((), dtype=torch.long, device=device)
        self.count = 0

    def add(self, logits: torch.Tensor, y: torch.Tensor, scored: torch.Tensor) -> None:
        """logits [B, T, V] predicting y [B, T]; `scored` [B, T] marks the predictions that count."""
        logits = logits.float()
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        self.nll += losses[scored].double().sum()
        self.correct += (logits.argmax(-1) == y)[scored].sum()
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        self.correct5 += (top5 == y[..., None]).any(-1)[scored].sum()
        self.count += int(scored.sum())

    def result(self, seconds: float) -> dict[str, float]:
        return {"nll": self.nll.item(), "correct": int(self.correct.item()), "correct_top5": int(self.correct5.item()),
                "tokens": self.count, "seconds": seconds}


def chunk_plan(n_tokens: int, chunk: int) -> list[tuple[int, int]]:
    """(start, stop) of the consecutive chunks that feed tokens 0..n_tokens-2 to a model whose state
    is carried from chunk to chunk (each predicts the token after each of its inputs)."""
    return [(start, min(start + chunk, n_tokens - 1)) for start in range(0, n_tokens - 1, chunk)]


@torch.inference_mode()
def score_tokens(model: torch.nn.Module, tokens: np.ndarray | torch.Tensor | Sequence[int], *,
                 block_size: int | None = None, stride: int | None = None, batch_size: int = 8,
                 device: torch.device | str | None = None, first_token: int | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Sums over every scored token (see the module docstring): nll (nats), correct, correct_top5, tokens.

    `first_token` (e.g. the EOT id) is put in front of `tokens` so that tokens[0] is scored too.
    `on_progress(done, total)` is called after each forward (windows, or chunks for a model that
    carries its state). Also returns `seconds`.
    """
    if device is None:
        device = next(model.parameters()).device
    seq = _Sequence(tokens, first_token)
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    if model.context_length is None:
        sums = _score_carried(model, seq, (block_size or model.config.block_size) * batch_size, device, on_progress)
    else:
        sums = _score_windows(model, seq, block_size, stride, batch_size, device, on_progress)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    if was_training:
        model.train()
    return sums.result(seconds)


def _score_windows(model: torch.nn.Module, seq: _Sequence, block_size: int | None, stride: int | None,
                   batch_size: int, device: torch.device | str, on_progress: Callable | None) -> _Sums:
    """Sliding windows of the model's context (see `window_plan`), `batch_size` per forward."""
    block_size = min(block_size or model.context_length, model.context_length)
    stride = stride if stride is not None else max(1, block_size // 2)
    plan = window_plan(len(seq), block_size, stride)
    sums = _Sums(device)
    length = min(block_size, len(seq) - 1)
    for first in range(0, len(plan), batch_size):
        batch = plan[first: first + batch_size]
        windows = torch.from_numpy(np.stack([seq.slice(s, s + length + 1) for s, _ in batch]))
        windows = windows.to(device, non_blocking=True)
        skip = torch.tensor([k for _, k in batch], device=device)
        scored = torch.arange(length, device=device)[None, :] >= skip[:, None]
        sums.add(model(windows[:, :-1]), windows[:, 1:], scored)
        if on_progress is not None:
            on_progress(min(first + batch_size, len(plan)), len(plan))
    return sums


def _score_carried(model: torch.nn.Module, seq: _Sequence, chunk: int, device: torch.device | str,
                   on_progress: Callable | None) -> _Sums:
    """One pass over the text in chunks, the model's decode state carried from chunk to chunk."""
    param = next(model.parameters())
    state = model.new_decode_state(1, dtype=param.dtype, device=device)
    plan = chunk_plan(len(seq), chunk)
    sums = _Sums(device)
    for done, (start, stop) in enumerate(plan, 1):
        window = torch.from_numpy(seq.slice(start, stop + 1))[None].to(device, non_blocking=True)
        logits = model(window[:, :-1], state=state, rows=Rows([0], [start], [stop - start]))
        sums.add(logits, window[:, 1:], torch.ones_like(window[:, 1:], dtype=torch.bool))
        if on_progress is not None:
            on_progress(done, len(plan))
    return sums


def metrics_from_sums(sums: dict[str, float], n_bytes: int | None = None) -> dict[str, float | None]:
    """loss, perplexity, accuracy, top5_accuracy, bits_per_byte (None without bytes), tokens, tokens_per_second."""
    n = sums["tokens"]
    if n == 0:
        raise UserError("nothing to score: the text has fewer than one token")
    loss = sums["nll"] / n
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": sums["correct"] / n,
        "top5_accuracy": sums["correct_top5"] / n,
        "bits_per_byte": sums["nll"] / math.log(2) / n_bytes if n_bytes else None,
        "tokens": n,
        "tokens_per_second": n / sums["seconds"] if sums.get("seconds") else 0.0,
    }


@dataclass
class EvalResult:
    checkpoint: str
    metrics: dict[str, Any]
    source: str  # what was scored: "val split of <source>" or the text file
    bytes: int
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    task: str = "lm"  # seq2seq: metrics from evaluate_pairs.score_pairs

    def to_json(self) -> dict[str, Any]:
        keys = ("loss", "perplexity", "accuracy", "top5_accuracy", "bits_per_byte", "tokens", "tokens_per_second")
        if self.task == "seq2seq":
            keys = ("loss", "perplexity", "accuracy", "exact_match", "per", "wer", "bleu", "chrf", "sources", "pairs",
                    "target_tokens", "beams", "decode_tokens_per_second")
        return {**{k: self.metrics[k] for k in keys}, "checkpoint": self.checkpoint}


def split_targets(items: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate `section.key=value` overrides from checkpoint paths in the command's arguments."""
    overrides = [item for item in items if _OVERRIDE.match(item)]
    paths = [item for item in items if not _OVERRIDE.match(item)]
    return paths, overrides


def data_config(checkpoint_dir: Path, config_path: Path | None, overrides: Sequence[str]) -> Config:
    """The checkpoint's own config (or `config_path`) with data.* overrides; its tokenizer forced."""
    for item in overrides:
        if not item.strip().startswith("data."):
            raise UserError(f"override '{item}': only data.* settings apply to eval "
                            "(the model and tokenizer come from the checkpoint)")
    if config_path is None:
        config_path = checkpoint_dir / RUN_CONFIG
        if not config_path.is_file():
            raise UserError(f"no {RUN_CONFIG} in {checkpoint_dir}: pass --config to name the data "
                            "or --text-file to score a file")
    cfg = load_config(config_path, list(overrides))
    return dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=str(checkpoint_dir / TOKENIZER)))


def eval_command(opts: EvalOptions) -> None:
    paths, overrides = split_targets(opts.targets)
    if not paths:
        raise UserError("missing RUN_DIR: name at least one run or checkpoint directory")
    if opts.text_file is not None and (overrides or opts.config is not None):
        raise UserError("--text-file scores a file; data overrides and --config do not apply")
    configure_threads(opts.threads)
    if opts.tasks is not None:
        from llmcli.lm_eval_adapter import evaluate_tasks, print_task_results

        if overrides or opts.config is not None:
            raise UserError("--tasks scores lm-eval tasks; data overrides and --config do not apply")
        print_task_results(evaluate_tasks(paths, opts), json_lines=opts.json_out)
        return
    print_results([evaluate_checkpoint(path, opts, overrides) for path in paths], json_lines=opts.json_out,
                  percent=opts.percent)


def evaluate_checkpoint(checkpoint: str | Path, opts: EvalOptions, overrides: Sequence[str] = (), *,
                        progress: bool = True) -> EvalResult:
    """Score one checkpoint on its data's split (or on a text file); see the module docstring."""
    device = select_device(opts.device)
    loaded = load_checkpoint(checkpoint, device, select_dtype(opts.dtype, device, auto=torch.float32))
    directory, model, tokenizer = loaded.directory, loaded.model, loaded.tokenizer
    if model.task == "seq2seq":  # scored on its pairs, by decoding (evaluate_pairs.py)
        return _evaluate_pairs(checkpoint, directory, model, tokenizer, opts, overrides)
    for name, given, also in (("beams", opts.beam.beams > 1, ""), ("limit", opts.limit is not None, " and --tasks")):
        if given:
            raise FieldError(name, f"applies to sequence-to-sequence models{also}; {directory} holds a model.arch="
                                   f"{model.config.arch} language model")
    batch_size = opts.batch_size or DEFAULT_BATCH
    block = model.context_length
    if opts.stride is not None and block is None:
        raise FieldError("stride", f"does not apply to {directory}: a model.arch={model.config.arch} model has no "
                                   "context window to slide (it carries its state over the whole text)")
    if opts.stride is not None and not 1 <= opts.stride <= block:
        raise FieldError("stride", f"must be between 1 and the block size ({block}); got {opts.stride}")
    if opts.text_file is not None:
        tokens, n_bytes, source = _text_file_tokens(Path(opts.text_file).expanduser(), tokenizer)
    else:
        from llmcli.data.prepare import prepare_data

        cfg = data_config(directory, opts.config, overrides)
        prepared = prepare_data(cfg, console=ui.stderr)
        if opts.split not in prepared.splits:
            raise UserError(f"the data has no {opts.split!r} split (it has: {', '.join(prepared.splits)}); "
                            "add e.g. data.test_fraction=0.1 for a test split")
        tokens = prepared.tokens(opts.split)
        n_bytes, source = int(prepared.stats[opts.split]["bytes"]), f"{opts.split} split of {cfg.data.source}"
    if len(tokens) == 0:
        raise UserError(f"nothing to score: {source} has no tokens")

    label = str(checkpoint)
    score = functools.partial(score_tokens, model, tokens, stride=opts.stride, batch_size=batch_size,
                              first_token=(loaded.end_ids or (eot_id(tokenizer),))[0])
    if block is None:
        forwards = len(chunk_plan(len(tokens) + 1, model.config.block_size * batch_size))
        unit = "chunk"
    else:
        forwards, unit = len(window_plan(len(tokens) + 1, block, opts.stride or max(1, block // 2))), "window"
    what = f"{len(tokens):,} tokens of {source}" + (", state carried through" if block is None else "")
    sums = _with_progress(score, label, forwards, what, unit) if progress else score()
    step = read_info(directory).get("step")
    return EvalResult(checkpoint=label, metrics=metrics_from_sums(sums, n_bytes), source=source, bytes=n_bytes,
                      step=step if isinstance(step, int) else None)


def _evaluate_pairs(checkpoint: str | Path, directory: Path, model: Any, tokenizer: Any, opts: EvalOptions,
                    overrides: Sequence[str]) -> EvalResult:
    """A seq2seq checkpoint on its data's pairs; the language-model options are refused."""
    from llmcli.data.prepare_pairs import prepare_pairs
    from llmcli.evaluate_pairs import score_pairs, with_source_tokenizer

    for name, given in (("stride", opts.stride is not None), ("text_file", opts.text_file is not None)):
        if given:
            raise FieldError(name, f"applies to language models; {directory} holds a model.arch={model.config.arch} "
                                   "sequence-to-sequence model (scored on its pairs)")
    cfg = with_source_tokenizer(data_config(directory, opts.config, overrides), directory)
    prepared = prepare_pairs(cfg, console=ui.stderr)
    if opts.split not in prepared.splits:
        raise UserError(f"the data has no {opts.split!r} split (it has: {', '.join(prepared.splits)}); "
                        "add e.g. data.test_fraction=0.05 for a test split")
    metrics = score_pairs(model, tokenizer, prepared, opts.split, batch_size=opts.batch_size, beam=opts.beam,
                          limit=opts.limit, label=str(checkpoint))
    step = read_info(directory).get("step")
    return EvalResult(checkpoint=str(checkpoint), metrics=metrics, source=f"{opts.split} split of {cfg.data.source}",
                      bytes=0, step=step if isinstance(step, int) else None, task="seq2seq")


def _text_file_tokens(path: Path, tokenizer: Any) -> tuple[np.ndarray, int, str]:
    text = read_text_file(path, "text file")
    missing = unknown_chars(tokenizer, text)
    if missing:
        shown = " ".join(repr(c) for c in missing[:20]) + (" ..." if len(missing) > 20 else "")
        ui.log(f"warning: {path} has {unknown_noun(missing)} the tokenizer never saw, scored "
               f"as {UNK}: {shown}")
    return np.array(encode(tokenizer, text), dtype=np.int64), len(text.encode("utf-8")), str(path)


def _with_progress(score: Callable, label: str, total: int, what: str, unit: str) -> dict[str, float]:
    """Run `score(on_progress=...)` with a live bar on a terminal, else a log line every 30 s at most;
    `total` forwards, each one `unit` (window or chunk)."""
    if ui.interactive(ui.stderr):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("[bold]eval[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn(f"{unit}s"), TimeRemainingColumn(), console=ui.stderr, transient=True) as bar:
            task = bar.add_task(label, total=total)
            return score(on_progress=lambda done, total: bar.update(task, completed=done))
    ui.log(f"eval {label}: {what}, {total:,} {unit}{'' if total == 1 else 's'}")
    last_log = [time.perf_counter()]

    def report(done: int, total: int) -> None:
        if done < total and time.perf_counter() - last_log[0] >= 30:
            last_log[0] = time.perf_counter()
            ui.log(f"eval {label}: {done:,}/{total:,} {unit}s ({100 * done / total:.0f}%)")

    return score(on_progress=report)


def print_results(results: Sequence[EvalResult], json_lines: bool = False, percent: bool = False) -> None:
    """One JSON object per line, or one comparison table per task (accuracies as percentages with
    `percent`): language models, then sequence-to-sequence models."""
    if json_lines:
        for result in results:
            print(json.dumps(result.to_json()), flush=True)
        return
    from llmcli.evaluate_pairs import pairs_table

    lm = [r for r in results if r.task == "lm"]
    tables = ([_lm_table(lm, percent)] if lm else []) + \
        ([pairs_table([r for r in results if r.task == "seq2seq"], percent)] if len(lm) < len(results) else [])
    console = ui.stdout
    if not ui.interactive(console):  # a pipe or a file: never squeeze a table into 80 columns
        from rich.console import Console
        from rich.measure import Measurement

        needed = max(Measurement.get(console, console.options.update(max_width=1000), t).maximum for t in tables)
        console = Console(highlight=False, width=max(console.width, needed))
    for table in tables:
        console.print(table)
    console.print(f"scored: {'; '.join(sorted({r.source for r in results}))}", markup=False, soft_wrap=True)


def _lm_table(results: Sequence[EvalResult], percent: bool) -> Table:
    table = Table(title=None)
    table.add_column("checkpoint", overflow="fold")
    for name in ("step", "loss", "ppl", "acc", "top-5", "bits/byte", "tokens", "tok/s"):
        table.add_column(name, justify="right", no_wrap=True)
    best = min((r.metrics["bits_per_byte"] for r in results if r.metrics["bits_per_byte"] is not None),
               default=None)
    for r in results:
        m = r.metrics
        bpb = "-" if m["bits_per_byte"] is None else f"{m['bits_per_byte']:.4f}"
        if len(results) > 1 and best is not None and m["bits_per_byte"] == best:
            bpb = f"[bold green]{bpb}[/]"
        acc, top5 = (f"{100 * m[k]:.2f}%" if percent else f"{m[k]:.4f}" for k in ("accuracy", "top5_accuracy"))
        table.add_row(r.checkpoint, "-" if r.step is None else str(r.step), f"{m['loss']:.4f}",
                      f"{m['perplexity']:.2f}", acc, top5, bpb,
                      f"{m['tokens']:,}", ui.format_count(m["tokens_per_second"]))
    return table
