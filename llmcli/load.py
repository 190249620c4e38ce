"""The one load entry point: a checkpoint directory in, everything a command runs it with out.

Every command that runs a checkpoint (generate, chat, serve, eval, attention, quantize, prune,
distill) calls `load_checkpoint` and reads what it needs off the `Loaded` it returns: the model
(in eval mode, on its device and dtype), the target tokenizer and, for a sequence-to-sequence
model, the source tokenizer, the ids that end generation, the chat template (read when first
asked for), the task, and the logical parameter count. So no command asks which task it holds in
order to load one, and every command counts parameters alike.

The parameter count is the model's as model.json describes it, counted on the meta device as
`llmcli inspect` counts it: a quantized checkpoint counts the float matrices its integer weights
stand for, and nothing a runtime does to the loaded model (packing weights for decoding) changes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from llmcli.checkpoint import (
    TOKENIZER,
    end_token_ids,
    load_model,
    load_source_tokenizer,
    logical_parameters,
    resolve_checkpoint,
)
from llmcli.errors import UserError
from llmcli.models.base import LanguageModel


@dataclass(frozen=True)
class Loaded:
    """A checkpoint ready to run (see the module docstring)."""

    directory: Path  # the checkpoint directory (a run's best/ or last/ when given the run)
    model: LanguageModel
    tokenizer: Any  # the target side: what the model reads and writes
    source_tokenizer: Any | None  # seq2seq: what sources are encoded with; None for a language model
    end_ids: tuple[int, ...]  # the ids that end generation (checkpoint.end_token_ids)
    parameters: int  # the logical parameter count (module docstring)
    template_option: str | Path | None = field(default=None, repr=False)  # --chat-template, if given

    @property
    def task(self) -> str:
        """"lm" or "seq2seq" (models.base.LanguageModel.task)."""
        return self.model.task

    @property
    def prompt_tokenizer(self) -> Any:
        """What a prompt is encoded with: the source side for seq2seq (a prompt is its source)."""
        return self.source_tokenizer if self.source_tokenizer is not None else self.tokenizer

    @cached_property
    def chat_template(self) -> Any:
        """The chat template (--chat-template, else the checkpoint's tokenizer_config.json, else the
        default), read on first use: commands that never chat never read it."""
        from llmcli.chat_template import load_chat_template

        return load_chat_template(self.template_option, self.directory)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, *,
                    chat_template: str | Path | None = None) -> Loaded:
    """Load the run or checkpoint directory `path` (see the module docstring); `dtype` casts floating
    weights (None: as stored). A tokenizer with more ids than the model is refused."""
    from llmcli.tokenizer import load_tokenizer

    directory = resolve_checkpoint(path)
    tokenizer = load_tokenizer(directory / TOKENIZER)
    model = load_model(directory, device=device, dtype=dtype).eval()
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > model.config.vocab_size:
        raise UserError(f"{directory}: the tokenizer has {vocab} tokens but the model only {model.config.vocab_size}")
    source = load_source_tokenizer(directory, model, tokenizer) if model.task == "seq2seq" else None
    return Loaded(directory=directory, model=model, tokenizer=tokenizer, source_tokenizer=source,
                  end_ids=end_token_ids(directory, tokenizer), parameters=logical_parameters(directory)[0],
                  template_option=chat_template)
