"""The data commands for either task: documents for a language model (prepare.py) or (source,
target) pairs for a sequence-to-sequence model (prepare_pairs.py), by `data.task`."""

from __future__ import annotations

from rich.console import Console

from llmcli.config import Config
from llmcli.config_loader import load_config
from llmcli.data.prepare import PreparedData, prepare_data, print_summary, train_tokenizer_for_config
from llmcli.data.prepare_pairs import PreparedPairs, prepare_pairs, print_pairs_summary
from llmcli.data.sources import _stderr_console
from llmcli.options.training import PrepareOptions, TokenizerTrainOptions


def prepare_for_task(cfg: Config, *, force: bool = False, console: Console | None = None) -> PreparedData | PreparedPairs:
    """Token arrays of documents (data.task=lm) or of pairs (data.task=seq2seq), cached."""
    if cfg.data.task == "seq2seq":
        return prepare_pairs(cfg, force=force, console=console)
    return prepare_data(cfg, force=force, console=console)


def prepare_command(opts: PrepareOptions) -> None:
    prepared = prepare_for_task(load_config(opts.config, opts.overrides or []), force=opts.force)
    (print_pairs_summary if isinstance(prepared, PreparedPairs) else print_summary)(prepared)


def tokenizer_command(opts: TokenizerTrainOptions) -> None:
    """`tokenizer train`: for pairs, the `tokenizer` section's (the targets', or both sides' when shared)."""
    cfg = load_config(opts.config, opts.overrides or [])
    texts = None
    if cfg.data.task == "seq2seq":
        from llmcli.data.pairs import load_pairs

        train = load_pairs(cfg.data, _stderr_console())["train"]
        shared = cfg.source_tokenizer.kind == "shared"
        texts = lambda: [t for _, t in train] + ([s for s, _ in train] if shared else [])  # noqa: E731
    train_tokenizer_for_config(cfg, opts.out, overwrite=opts.overwrite, texts=texts)
