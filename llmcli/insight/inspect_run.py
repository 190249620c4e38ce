"""`llmcli inspect`: what a run or checkpoint directory holds, in one table (or JSON).

Everything is read from the files as they are, generically, so that entries other commands add
(to model.json, checkpoint.json, trainer_state.json) show up without this module knowing them:
the family and its settings from model.json, parameter counts from the family itself (built on
the meta device: no weights are read), the tokenizer (a seq2seq model's target and source ones),
quantization and pruning, the training summary, and every file with its size.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from llmcli import ui
from llmcli.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BASE,
    INFO,
    MODEL_CONFIG,
    PRUNING_KEY,
    QUANTIZATION_KEY,
    RUN_CONFIG,
    SOURCE_TOKENIZER,
    TOKENIZER,
    adapter_base,
    is_adapter,
    logical_parameters,
    model_config_from_json,
    read_pruning,
    read_quantization,
    resolve_checkpoint,
)
from llmcli.errors import UserError
from llmcli.insight.curves import METRICS_FILE, read_metrics
from llmcli.io import read_json_object
from llmcli.options.insight import InspectOptions

TRAINER_STATE = Path("state") / "trainer_state.json"


def inspect_command(opts: InspectOptions) -> None:
    info = inspect_run(opts.run_dir)
    if opts.json_out:
        sys.stdout.write(json.dumps(info, ensure_ascii=False) + "\n")
    else:
        print_table(info)


def inspect_run(path: Path) -> dict[str, Any]:
    """Everything `inspect` shows, as plain JSON-able values."""
    path = Path(path).expanduser()
    checkpoint = resolve_checkpoint(path)
    run = _run_dir(path)
    model_json = read_json_object(checkpoint / MODEL_CONFIG, what="a JSON object of model settings")
    task, parameters = _parameters(checkpoint)
    source = checkpoint / SOURCE_TOKENIZER
    return {
        "path": str(path), "checkpoint": str(checkpoint), "run": str(run) if run else None,
        "family": model_json.get("arch"), "task": task,
        "model": {k: v for k, v in model_json.items() if k not in ("arch", QUANTIZATION_KEY, PRUNING_KEY)},
        "parameters": parameters,
        "tokenizer": _tokenizer(checkpoint / TOKENIZER),
        # seq2seq: the source side's own tokenizer; None when it shares the target's
        "source_tokenizer": _tokenizer(source) if task == "seq2seq" and source.is_file() else None,
        "quantization": read_quantization(checkpoint),
        "pruning": read_pruning(checkpoint),
        "adapter": _adapter(checkpoint) if is_adapter(checkpoint) else None,
        "checkpoint_info": read_json_object(checkpoint / INFO) if (checkpoint / INFO).is_file() else {},
        "training": _training(run, checkpoint) if run else {},
        "files": _files(path),
        "disk_bytes": disk_usage(path),
    }


def _run_dir(path: Path) -> Path | None:
    """The run a directory belongs to (itself, or the run around its best/ or last/)."""
    for candidate in (path, path.parent):
        if (candidate / METRICS_FILE).is_file() or (candidate / TRAINER_STATE).is_file():
            return candidate
    return None


def _parameters(checkpoint: Path) -> tuple[str, dict[str, int]]:
    """The family's task and its logical parameters (checkpoint.logical_parameters: a quantized
    checkpoint counts its float parameters, and nothing is loaded)."""
    from llmcli.models.registry import family

    total, non_embedding = logical_parameters(checkpoint)
    task = family(model_config_from_json(checkpoint / MODEL_CONFIG)).task
    return task, {"total": total, "embedding": total - non_embedding, "non_embedding": non_embedding}


def _adapter(checkpoint: Path) -> dict[str, Any]:
    """A LoRA adapter run: its rank, scale and modules (peft's config), its own parameters (read
    off the safetensors header), and its base, checked to be the one it was trained on."""
    from safetensors import safe_open

    config = read_json_object(checkpoint / ADAPTER_CONFIG, what="peft's adapter config")
    with safe_open(str(checkpoint / ADAPTER_WEIGHTS), framework="pt") as f:
        parameters = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    pointer = _json_or_empty(checkpoint / BASE)
    try:
        base, problem = str(adapter_base(checkpoint)), None
    except UserError as exc:
        base, problem = pointer.get("path"), str(exc)
    return {"method": config.get("peft_type", "LORA"), "r": config.get("r"), "alpha": config.get("lora_alpha"),
            "targets": _lora_targets(checkpoint / RUN_CONFIG),
            "modules": sorted(config.get("target_modules") or []), "parameters": parameters, "base": base,
            "base_problem": problem,
            "base_quantization": read_quantization(Path(base)) if base and problem is None else None}


def _lora_targets(config_path: Path) -> list[str] | None:
    """The run's train.lora.targets (the family's own terms, e.g. q, v), if its config reads."""
    from llmcli.config_loader import load_config

    try:
        return list(load_config(config_path).train.lora.targets)
    except (UserError, OSError):
        return None


def _tokenizer(path: Path) -> dict[str, Any]:
    from llmcli.tokenizer import EOT, kind_of, load_tokenizer

    tokenizer = load_tokenizer(path)
    model = json.loads(tokenizer.to_str()).get("model", {}).get("type")
    return {"kind": kind_of(tokenizer), "model": model,
            "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True), "eot_id": tokenizer.token_to_id(EOT)}


def _training(run: Path, checkpoint: Path) -> dict[str, Any]:
    """Steps, tokens, best val loss and wall time from the trainer state (or the metrics), and
    epochs as the trainer recorded them in metrics.jsonl, else over the run's training split where
    its prepared data is on this machine."""
    state = _json_or_empty(run / TRAINER_STATE)
    rows = read_metrics(run / METRICS_FILE) if (run / METRICS_FILE).is_file() else []
    evals = [r for r in rows if isinstance(r.get("val_loss"), (int, float))]
    best = min(evals, key=lambda r: r["val_loss"]) if evals else None
    out: dict[str, Any] = dict(state)
    out.setdefault("step", max((r["step"] for r in rows), default=None))
    out.setdefault("tokens_seen", max((r["tokens_seen"] for r in rows if "tokens_seen" in r), default=None))
    out.setdefault("elapsed", max((r["elapsed"] for r in rows if "elapsed" in r), default=None))
    if best is not None:
        out.setdefault("best_val_loss", best["val_loss"])
        out.setdefault("best_step", best["step"])
    recorded = [r["epoch"] for r in rows if isinstance(r.get("epoch"), (int, float))]
    train_tokens = _train_split_tokens(run / RUN_CONFIG) if not recorded else None
    if recorded:  # the trainer's own count, where its metrics record it
        out["epochs"] = max(recorded)
    elif train_tokens and out.get("tokens_seen") is not None:
        out["epochs"] = out["tokens_seen"] / train_tokens
    out["train_split_tokens"] = train_tokens
    out["evaluations"] = len(evals)
    return out


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        return read_json_object(path) if path.is_file() else {}
    except UserError:
        return {}


def _train_split_tokens(config_path: Path) -> int | None:
    """Tokens in the run's training split, if its prepared arrays are cached here (else None)."""
    from llmcli.config_loader import load_config
    from llmcli.data.prepare import cache_dir_for, load_prepared

    try:
        prepared = load_prepared(cache_dir_for(load_config(config_path)))
    except (UserError, OSError):
        return None
    return int(prepared.stats["train"]["tokens"]) if prepared and "train" in prepared.stats else None


def _files(path: Path) -> dict[str, int]:
    """Each entry of the directory and its size in bytes (a folder: everything in it)."""
    sizes = {}
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        sizes[entry.name + ("/" if entry.is_dir() else "")] = sum(p.stat().st_size for p in files)
    return sizes


def disk_usage(path: Path) -> int:
    """Bytes the directory takes, hard-linked files (the run dir's copy of last/) once."""
    seen, total = set(), 0
    for p in Path(path).rglob("*"):
        if p.is_file():
            st = p.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


# --------------------------------------------------------------------------------------------
# The table


def print_table(info: dict[str, Any], console: Console = ui.stdout) -> None:
    table = Table(title=f"inspect {info['path']}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", overflow="fold")
    for section in (_model_rows(info), _training_rows(info), _file_rows(info)):
        for key, value in section:
            table.add_row(key, value)
        table.add_section()
    console.print(table)


def _model_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    p, tok, q = info["parameters"], info["tokenizer"], info["quantization"]
    shape = ", ".join(f"{k} {_plain(v)}" for k, v in info["model"].items())
    quantized = "none (float weights)" if q is None else _entries(q)
    seq2seq = info["task"] == "seq2seq"
    rows = [
        ("family", str(info["family"])),
        ("shape", shape),
        ("parameters", f"{ui.format_count(p['total'])} ({p['total']:,})"),
        ("  embedding", f"{ui.format_count(p['embedding'])} ({p['embedding']:,})"),
        ("  non-embedding", f"{ui.format_count(p['non_embedding'])} ({p['non_embedding']:,})"),
        ("target tokenizer" if seq2seq else "tokenizer", _tokenizer_row(tok)),
        *([("source tokenizer", _tokenizer_row(info["source_tokenizer"]) if info["source_tokenizer"]
            else "shared with the target")] if seq2seq else []),
        ("quantization", quantized),
        ("pruning", "none" if info["pruning"] is None else _entries(info["pruning"])),
    ]
    return rows + (_adapter_rows(info["adapter"]) if info["adapter"] else [])


def _tokenizer_row(tok: dict[str, Any]) -> str:
    return f"{tok['kind']} ({tok['model']}), vocab {tok['vocab_size']:,}, <|endoftext|> id {tok['eot_id']}"


def _entries(entry: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_plain(v)}" for k, v in entry.items())


def _adapter_rows(a: dict[str, Any]) -> list[tuple[str, str]]:
    q = a["base_quantization"]
    base = f"{a['base']} (missing or changed: {a['base_problem']})" if a["base_problem"] else str(a["base"])
    on = f" on {', '.join(a['targets'])}" if a["targets"] else ""
    return [("adapter", f"{a['method']} r {a['r']}, alpha {_plain(a['alpha'])}{on} ({len(a['modules'])} modules)"),
            ("  adapter parameters", (f"{ui.format_count(a['parameters'])} ({a['parameters']:,}); the "
                                      "parameters above are the base's")),
            ("  base", base + ("" if q is None else f", quantized {q.get('method')}"))]


def _training_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    t, rows = info["training"], []
    if t:
        epochs = f"{t['epochs']:.3f}" if "epochs" in t else "- (the run's data is not prepared here)"
        best = (f"{t['best_val_loss']:.4f} (step {t.get('best_step')})"
                if isinstance(t.get("best_val_loss"), (int, float)) else "-")
        elapsed = ui.format_duration(t["elapsed"]) if isinstance(t.get("elapsed"), (int, float)) else "-"
        rows += [("run", info["run"]), ("steps", _plain(t.get("step"))), ("epochs", epochs),
                 ("tokens seen", _count(t.get("tokens_seen"))), ("best val loss", best),
                 ("wall time", elapsed), ("evaluations", str(t["evaluations"]))]
    rows.append(("checkpoint", info["checkpoint"]))
    rows += [(f"  {key}", _plain(value)) for key, value in info["checkpoint_info"].items()]
    return rows


def _file_rows(info: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [(name, _size(size)) for name, size in info["files"].items()]
    total = f"{_size(info['disk_bytes'])} on disk (hard-linked copies once)"
    return [("files", total)] + [(f"  {name}", size) for name, size in rows]


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None:
        return "-"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _count(value: Any) -> str:
    return f"{ui.format_count(value)} ({value:,})" if isinstance(value, int) else "-"


def _size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"
