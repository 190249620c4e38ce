"""The README.md of every run directory, checkpoint and export, as Hugging Face model folders carry
one: the model's family, shape and parameters, its data and tokenizer, a training summary and its
evaluation, each read from the folder's own files (model.json, config.yaml, tokenizer.json,
checkpoint.json, metrics.jsonl, the weights' header), so the card never says what the files do not."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from llmcli import ui
from llmcli.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE,
    INFO,
    MODEL_CONFIG,
    RUN_CONFIG,
    SOURCE_TOKENIZER,
    TOKENIZER,
    WEIGHTS,
    model_config_from_json,
    read_pruning,
    read_quantization,
)
from llmcli.config import RECURRENT, SEQ2SEQ, ModelConfig
from llmcli.config_loader import load_config
from llmcli.data.shakespeare import DEFAULT_TEST_PLAYS, DEFAULT_VAL_PLAYS
from llmcli.io import atomic_write_text

CARD = "README.md"
METRICS = "metrics.jsonl"  # a run directory's training log (train/run_dir.py)


def write_model_card(directory: Path) -> None:
    """Write `directory`/README.md from the checkpoint or run in `directory`."""
    atomic_write_text(directory / CARD, model_card(directory))


def model_card(directory: Path, export: Path | None = None) -> str:
    """The card of the checkpoint (or run) in `directory`; with `export`, the card of the Hugging Face
    folder exported from it there (front matter and transformers' loading code)."""
    model = model_config_from_json(directory / MODEL_CONFIG)
    cfg = load_config(directory / RUN_CONFIG)
    info = _json(directory / INFO)
    imported = "imported_from" in info  # its config.yaml's data and training settings are defaults
    sections = [
        ("Model", _model_rows(directory, model)),
        ("Data", [] if imported else _data_rows(cfg)),
        ("Tokenizer", _tokenizer_rows(directory, cfg)),
        ("Training", _provenance_rows(info) if imported else _training_rows(directory, cfg, info)),
        ("Evaluation", _evaluation_rows(info)),
    ]
    kind = "sequence-to-sequence model" if model.task == "seq2seq" else "language model"
    where = export or directory
    lines = [*_front_matter(export, model), f"# {where.resolve().name}", "",
             f"A {_family(model)} {kind} made with llmcli" + (f", exported from {directory}." if export else "."), ""]
    for title, rows in sections:
        if rows:
            lines += [f"## {title}", "", "| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows), ""]
    lines += ["## Use", "", "```", *_usage(where, export is not None, model), "```", ""]
    return "\n".join(lines)


def _family(m: ModelConfig) -> str:
    return m.arch + (f" ({m.preset} preset)" if m.preset else "")


def _model_rows(directory: Path, m: ModelConfig) -> list[tuple[str, str]]:
    if m.arch in RECURRENT:
        shape = f"{m.n_layer} layers, embedding {m.d_model}, hidden {m.d_hidden or m.d_model}, window {m.block_size}"
    elif m.arch in SEQ2SEQ:
        width = f"hidden {m.d_hidden or m.d_model}" if m.arch != "encoder-decoder" else f"{m.n_head} heads"
        shape = (f"{m.encoder_layers} encoder + {m.n_layer} decoder layers, d_model {m.d_model}, {width}, "
                 f"source {m.source_context} / target {m.block_size} tokens")
    else:
        heads = f"{m.n_head} heads" + (f" ({m.n_kv_head} kv)" if m.n_kv_head else "")
        shape = f"{m.n_layer} layers, {heads}, d_model {m.d_model}, context {m.block_size}"
    rows = [("family", _family(m)), ("shape", shape), ("vocabulary", f"{m.vocab_size:,}")]
    quantization = read_quantization(directory)
    if quantization is not None:
        group = f" g{quantization['group_size']}" if quantization.get("group_size") else ""
        rows.append(("quantization", f"{quantization['method']}{group}"))
    pruning = read_pruning(directory)
    if pruning is not None:
        rows.append(("pruning", ", ".join(f"{k} {v}" for k, v in pruning.items() if k != "from")
                     + (f" (from {pruning['from']})" if "from" in pruning else "")))
    weights = directory / (ADAPTER_WEIGHTS if (directory / ADAPTER_WEIGHTS).is_file() else WEIGHTS)
    if weights.is_file():
        count = _tensor_elements(weights)
        what = "adapter parameters" if weights.name == ADAPTER_WEIGHTS else "parameters"
        stored = "stored values (quantized)" if quantization is not None else what
        rows.append((stored, f"{ui.format_count(count)} ({count:,}); file {ui.format_bytes(weights.stat().st_size)}"))
    if (directory / ADAPTER_CONFIG).is_file():
        base = _json(directory / BASE)
        rows.append(("adapter", f"LoRA on {base.get('path', 'its base checkpoint')}"))
    return rows


def _data_rows(cfg) -> list[tuple[str, str]]:
    d = cfg.data
    rows = [("task", d.task), ("source", str(d.source))]
    if d.task == "lm":
        rows.append(("format", d.format))
    if d.source == "shakespeare":  # split by whole plays, not by fractions
        val, test = d.val_plays or DEFAULT_VAL_PLAYS, d.test_plays or DEFAULT_TEST_PLAYS
        rows.append(("held out", f"val: {', '.join(val)}; test: {', '.join(test)}"))
        return rows
    held_out = f"val {d.val_fraction:g}" + (f", test {d.test_fraction:g}" if d.test_fraction else "")
    rows.append(("held out", held_out + f" (split by {d.split_by})" if d.applies("split_by") else held_out))
    return rows


def _tokenizer_rows(directory: Path, cfg) -> list[tuple[str, str]]:
    rows = [("kind", cfg.tokenizer.kind), ("tokens", f"{_vocabulary(directory / TOKENIZER):,}")]
    if (directory / SOURCE_TOKENIZER).is_file():
        rows.append(("source side", (f"{cfg.source_tokenizer.kind}, {_vocabulary(directory / SOURCE_TOKENIZER):,} "
                                    "tokens")))
    return rows


def _training_rows(directory: Path, cfg, info: dict) -> list[tuple[str, str]]:
    t = cfg.train
    rows = []
    if "step" in info:
        rows.append(("steps", f"{info['step']:,}" + (f" ({info['tokens_seen']:,} tokens)" if "tokens_seen" in info
                                                      else "")))
    rows.append(("settings", (f"batch {t.batch_size}, lr {t.lr:g} (min {t.min_lr:g}), warmup {t.warmup_steps}, "
                             f"weight decay {t.weight_decay:g}")))
    return rows + _log_rows(directory / METRICS) + _provenance_rows(info)


def _provenance_rows(info: dict) -> list[tuple[str, str]]:
    labels = {"imported_from": "imported from", "quantized_from": "quantized from", "merged_from": "merged from"}
    return [(label, str(info[key])) for key, label in labels.items() if key in info]


def _log_rows(path: Path) -> list[tuple[str, str]]:
    """What a run's metrics.jsonl says: how long it trained, its last training loss, its best val loss."""
    if not path.is_file():
        return []
    train, val = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        (val if "val_loss" in row else train if "train_loss" in row else []).append(row)
    rows = []
    if train:
        last = train[-1]
        rows.append(("last training loss", f"{last['train_loss']:.4f} at step {last['step']:,}"
                                           + (f" after {ui.format_duration(last['elapsed'])}" if "elapsed" in last else "")))
    if val:
        best = min(val, key=lambda r: r["val_loss"])
        rows.append(("best val loss", (f"{best['val_loss']:.4f} (perplexity {math.exp(min(best['val_loss'], 700)):.2f}) "
                                      f"at step {best['step']:,}")))
    return rows


def _evaluation_rows(info: dict) -> list[tuple[str, str]]:
    names = {"val_loss": "val loss", "val_ppl": "val perplexity", "val_acc": "val top-1 accuracy"}
    rows = [(label, f"{info[key]:.4f}") for key, label in names.items() if isinstance(info.get(key), (int, float))]
    if rows and "step" in info:
        rows.insert(0, ("scored at", f"step {info['step']:,}, on the run's own val split"))
    return rows


def _front_matter(export: Path | None, m: ModelConfig) -> list[str]:
    if export is None:
        return []
    pipeline = "text2text-generation" if m.task == "seq2seq" else "text-generation"
    return ["---", "library_name: transformers", f"pipeline_tag: {pipeline}", "tags:", "- llmcli", "---", ""]


def _usage(directory: Path, exported: bool, m: ModelConfig) -> list[str]:
    if exported:
        auto = "AutoModelForSeq2SeqLM" if m.task == "seq2seq" else "AutoModelForCausalLM"
        return [f"from transformers import {auto}, AutoTokenizer",
                f'model = {auto}.from_pretrained("{directory}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{directory}")']
    prompt = '"ROMEO:"' if m.task == "lm" else '"shakespeare"'
    return [f"llmcli generate {directory} {prompt}", f"llmcli eval {directory}"]


def _tensor_elements(path: Path) -> int:
    """Elements of every tensor in a .safetensors file, read from its header (no weights loaded)."""
    with open(path, "rb") as fh:
        size = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(size))
    return sum(math.prod(t["shape"]) for name, t in header.items() if name != "__metadata__")


def _vocabulary(path: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
