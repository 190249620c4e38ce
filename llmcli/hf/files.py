"""The files of a Hugging Face model folder, and small helpers export and import both use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmcli.config import ModelConfig
from llmcli.errors import FieldError
from llmcli.io import read_json_object

HF_CONFIG = "config.json"
HF_GENERATION_CONFIG = "generation_config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_TORCH_WEIGHTS = "pytorch_model.bin"
HF_TORCH_WEIGHTS_INDEX = "pytorch_model.bin.index.json"
HF_TOKENIZER = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
HF_SPECIAL_TOKENS = "special_tokens_map.json"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_json(path: Path, *, required: bool = True) -> dict[str, Any]:
    """A JSON object file; {} for a missing file that is not `required`."""
    if not path.is_file() and not required:
        return {}
    return read_json_object(path)


def parse_dtype(name: str | None) -> torch.dtype | None:
    """`--dtype`: a torch dtype, or None for "auto" (keep the stored one)."""
    if name is None or name == "auto":
        return None
    if name not in DTYPES:
        raise FieldError("dtype", f"must be one of {', '.join([*DTYPES, 'auto'])}; got {name!r}")
    return DTYPES[name]


def token_content(value: Any) -> str | None:
    """A special token as tokenizer files write it: a string, or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def first(value: Any) -> int | None:
    """An id, or the first of a list of ids (eos_token_id may be either)."""
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def describe(config: ModelConfig, parameters: int) -> str:
    """One line of model shape, for the commands' output."""
    from llmcli.ui import format_count

    heads = f"{config.n_head} heads" + (f" / {config.kv_heads} kv" if config.kv_heads != config.n_head else "")
    if config.task == "seq2seq":
        vocab = f"vocab {config.vocab_size}" if config.share_embeddings else \
            f"vocab {config.source_vocab_size} -> {config.vocab_size}"
        return (f"{config.encoder_layers} + {config.n_layer} layers, d_model {config.d_model}, {heads}, {vocab}, "
                f"context {config.source_context} -> {config.block_size}, "
                f"{'tied' if config.tie_embeddings else 'untied'} head; {format_count(parameters)} parameters")
    return (f"{config.n_layer} layers, d_model {config.d_model}, {heads}, vocab {config.vocab_size}, "
            f"context {config.block_size}, {'tied' if config.tie_embeddings else 'untied'} head; "
            f"{format_count(parameters)} parameters")
