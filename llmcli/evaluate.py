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
from llmcli.checkpoint import RUN_CONFIG, TOKENIZER, end_token_ids, load_for_inference, read_info
from llmcli.config import Config, load_config
from llmcli.device import configure_threads, select_device, select_dtype
from llmcli.errors import FieldError, UserError
from llmcli.options import EvalOptions
from llmcli.tokenizer import UNK, encode, eot_id, unknown_chars

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
        self.tokens = np.asarray(tokens)
        self.first = first
        self.offset = 0 if first is None else 1

    def __len__(self) -> int:
        return len(self.tokens) + self.offset

    def slice(self, start: int, stop: int) -> np.ndarray:
        if self.offset and start == 0:
            rest = self.tokens[: stop - 1].astype(np.int64)
            return np.concatenate([np.array([self.first], dtype=np.int64), rest])
        return self.tokens[start - self.offset: stop - self.offset].astype(np.int64)


@torch.inference_mode()
def score_tokens(model: torch.nn.Module, tokens: np.ndarray | torch.Tensor | Sequence[int], *,
                 block_size: int | None = None, stride: int | None = None, batch_size: int = 8,
                 device: torch.device | str | None = None, first_token: int | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Sums over every scored token (see `window_plan`): nll (nats), correct, correct_top5, tokens.

    `first_token` (e.g. the EOT id) is put in front of `tokens` so that tokens[0] is scored too.
    `on_progress(windows_done, windows_total)` is called after each batch. Also returns `seconds`.
    """
    block_size = min(block_size or model.context_length, model.context_length)
    stride = stride if stride is not None else max(1, block_size // 2)
    if device is None:
        device = next(model.parameters()).device
    seq = _Sequence(tokens, first_token)
    plan = window_plan(len(seq), block_size, stride)
    was_training = model.training
    model.eval()
    nll = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    correct5 = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    started = time.perf_counter()
    for first in range(0, len(plan), batch_size):
        batch = plan[first: first + batch_size]
        length = min(block_size, len(seq) - 1)
        windows = torch.from_numpy(np.stack([seq.slice(s, s + length + 1) for s, _ in batch]))
        windows = windows.to(device, non_blocking=True)
        x, y = windows[:, :-1], windows[:, 1:]
        logits = model(x).float()
        skip = torch.tensor([k for _, k in batch], device=device)
        scored = torch.arange(length, device=device)[None, :] >= skip[:, None]
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        nll += losses[scored].double().sum()
        correct += (logits.argmax(-1) == y)[scored].sum()
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        correct5 += (top5 == y[..., None]).any(-1)[scored].sum()
        count += int(sum(length - k for _, k in batch))
        if on_progress is not None:
            on_progress(min(first + batch_size, len(plan)), len(plan))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    if was_training:
        model.train()
    return {"nll": nll.item(), "correct": int(correct.item()), "correct_top5": int(correct5.item()),
            "tokens": count, "seconds": seconds}


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

    def to_json(self) -> dict[str, Any]:
        keys = ("loss", "perplexity", "accuracy", "top5_accuracy", "bits_per_byte", "tokens", "tokens_per_second")
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
    print_results([evaluate_checkpoint(path, opts, overrides) for path in paths], json_lines=opts.json_out)


def evaluate_checkpoint(checkpoint: str | Path, opts: EvalOptions, overrides: Sequence[str] = (), *,
                        progress: bool = True) -> EvalResult:
    """Score one checkpoint on its data's split (or on a text file); see the module docstring."""
    device = select_device(opts.device)
    directory, model, tokenizer = load_for_inference(checkpoint, device,
                                                     select_dtype(opts.dtype, device, auto=torch.float32))
    block = model.context_length
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
    score = functools.partial(score_tokens, model, tokens, stride=opts.stride, batch_size=opts.batch_size,
                              first_token=(end_token_ids(directory, tokenizer) or (eot_id(tokenizer),))[0])
    windows = len(window_plan(len(tokens) + 1, block, opts.stride or max(1, block // 2)))
    sums = _with_progress(score, label, windows, f"{len(tokens):,} tokens of {source}") if progress else score()
    step = read_info(directory).get("step")
    return EvalResult(checkpoint=label, metrics=metrics_from_sums(sums, n_bytes), source=source, bytes=n_bytes,
                      step=step if isinstance(step, int) else None)


def _text_file_tokens(path: Path, tokenizer: Any) -> tuple[np.ndarray, int, str]:
    if not path.is_file():
        raise UserError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    missing = unknown_chars(tokenizer, text)
    if missing:
        shown = " ".join(repr(c) for c in missing[:20]) + (" ..." if len(missing) > 20 else "")
        ui.log(f"warning: {path} has {len(missing)} character(s) the tokenizer never saw, scored "
               f"as {UNK}: {shown}")
    return np.array(encode(tokenizer, text), dtype=np.int64), len(text.encode("utf-8")), str(path)


def _with_progress(score: Callable, label: str, total_windows: int, what: str) -> dict[str, float]:
    """Run `score(on_progress=...)` with a live bar on a terminal, else a log line every 30 s at most."""
    if ui.interactive(ui.stderr):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("[bold]eval[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("windows"), TimeRemainingColumn(), console=ui.stderr, transient=True) as bar:
            task = bar.add_task(label, total=total_windows)
            return score(on_progress=lambda done, total: bar.update(task, completed=done))
    windows = f"{total_windows:,} window{'' if total_windows == 1 else 's'}"
    ui.log(f"eval {label}: {what}, {windows}")
    last_log = [time.perf_counter()]

    def report(done: int, total: int) -> None:
        if done < total and time.perf_counter() - last_log[0] >= 30:
            last_log[0] = time.perf_counter()
            ui.log(f"eval {label}: {done:,}/{total:,} windows ({100 * done / total:.0f}%)")

    return score(on_progress=report)


def print_results(results: Sequence[EvalResult], json_lines: bool = False) -> None:
    """One JSON object per line, or one comparison table, on stdout."""
    if json_lines:
        for result in results:
            print(json.dumps(result.to_json()), flush=True)
        return
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
        table.add_row(r.checkpoint, "-" if r.step is None else str(r.step), f"{m['loss']:.4f}",
                      f"{m['perplexity']:.2f}", f"{m['accuracy']:.4f}", f"{m['top5_accuracy']:.4f}", bpb,
                      f"{m['tokens']:,}", ui.format_count(m["tokens_per_second"]))
    sources = sorted({r.source for r in results})
    console = ui.stdout
    if not ui.interactive(console):  # a pipe or a file: never squeeze the table into 80 columns
        from rich.console import Console
        from rich.measure import Measurement

        needed = Measurement.get(console, console.options.update(max_width=1000), table).maximum
        console = Console(highlight=False, width=max(console.width, needed))
    console.print(table)
    console.print(f"scored: {'; '.join(sources)}", markup=False, soft_wrap=True)
