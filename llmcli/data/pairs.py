"""Sequence-to-sequence data: every supported source -> (source, target) pairs per split.

`load_pairs(cfg)` reads `data.source` (for data.task=seq2seq):

* `cmudict` (default): the CMU Pronouncing Dictionary (cmudict.py), word -> pronunciation.
* local `.jsonl` `.json` `.csv` `.tsv` `.parquet` files (a file, a folder or a glob), one pair per
  row from the columns `data.source_field` and `data.target_field`;
* a `save_to_disk` folder or `hf:<dataset id>` (their own train / validation / test splits are
  used when they exist);
* with `data.source_lang` and `data.target_lang`: pairs from a `translation` column of
  `{lang: text}` objects (the layout of WMT / OPUS datasets on the hub).

A pair with an empty (or whitespace-only) source or target, or a missing column, stops the
command naming the row. Data without its own splits is split by source: the distinct sources are
shuffled with a fixed seed and `val_fraction` / `test_fraction` of them go to val / test, with all
their pairs. So no source is in two splits, and a source's alternative targets (a word's
pronunciations) stay together: evaluation counts an output correct when it equals any of them.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from llmcli.config import DataConfig
from llmcli.data.cmudict import cmudict_pairs
from llmcli.data.readers import read_text
from llmcli.data.sources import PAIR_FORMATS, _one_line, cache_root, resolve_files, source_kind
from llmcli.data.split import SPLIT_SEED, SPLITS
from llmcli.errors import UserError

if TYPE_CHECKING:
    import datasets

Pair = tuple[str, str]
_VAL_NAMES = ("validation", "valid", "val", "dev")


def load_pairs(cfg: DataConfig, console: Console) -> dict[str, list[Pair]]:
    """train / val / test pairs (val and test only when non-empty); see the module docstring."""
    kind = source_kind(cfg)
    if kind == "cmudict":
        return split_pairs(cmudict_pairs(cfg.stress), cfg)
    if kind == "files":
        return split_pairs(_local_pairs(cfg, console), cfg)
    import datasets

    try:
        if kind == "saved":
            loaded = datasets.load_from_disk(str(Path(cfg.source).expanduser()))
        else:
            name = cfg.source[3:].strip()
            if not name:
                raise UserError("data.source: 'hf:' needs a dataset id, e.g. hf:wmt/wmt16")
            loaded = datasets.load_dataset(name, cfg.hf_config)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"could not load {cfg.source}: {_one_line(exc)}") from None
    return _from_splits(loaded, cfg)


def split_pairs(pairs: list[Pair], cfg: DataConfig) -> dict[str, list[Pair]]:
    """Split by source (see the module docstring); each split keeps the original order."""
    sources = list(dict.fromkeys(source for source, _ in pairs))
    n = len(sources)
    n_val = max(1, round(n * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    n_test = max(1, round(n * cfg.test_fraction)) if cfg.test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise UserError(f"{n} distinct source(s) are too few for data.val_fraction={cfg.val_fraction:g} "
                        f"and data.test_fraction={cfg.test_fraction:g}")
    order = list(range(n))
    random.Random(SPLIT_SEED).shuffle(order)
    where = {sources[i]: "val" for i in order[:n_val]}
    where.update({sources[i]: "test" for i in order[n_val:n_val + n_test]})
    out: dict[str, list[Pair]] = {name: [] for name in SPLITS}
    for pair in pairs:
        out[where.get(pair[0], "train")].append(pair)
    return {name: rows for name, rows in out.items() if rows or name == "train"}


def _local_pairs(cfg: DataConfig, console: Console) -> list[Pair]:
    import datasets

    pairs: list[Pair] = []
    for path in resolve_files(cfg.source, PAIR_FORMATS):
        builder = PAIR_FORMATS[path.suffix.lower()]
        options: dict[str, Any] = {"delimiter": "\t"} if builder == "tsv" else {}
        data_file = str(path)
        if builder != "parquet":  # text formats: check (or repair) the encoding first
            raw = path.read_bytes()
            text = read_text(path, cfg.encoding_errors, console)
            if text.encode("utf-8") != raw:
                copy = cache_root(cfg) / "hf-datasets" / f"utf8-{path.name}"
                copy.parent.mkdir(parents=True, exist_ok=True)
                copy.write_text(text, encoding="utf-8")
                data_file = str(copy)
        try:
            ds = datasets.load_dataset("csv" if builder == "tsv" else builder, data_files=[data_file], split="train",
                                       cache_dir=str(cache_root(cfg) / "hf-datasets"), **options)
        except Exception as exc:  # malformed json/csv/parquet: the library's reason, in one line
            raise UserError(f"could not read {path}: {_one_line(exc)}") from None
        pairs += rows_to_pairs(ds, cfg, str(path))
    if not pairs:
        raise UserError(f"data.source: {cfg.source} holds no pairs")
    return pairs


def rows_to_pairs(ds: datasets.Dataset, cfg: DataConfig, label: str) -> list[Pair]:
    """The (source, target) of every row; a missing column or an empty side is a UserError."""
    if cfg.source_lang is not None:
        if "translation" not in ds.column_names:
            raise UserError(f"data.source_lang: no 'translation' column in {label} (columns: "
                            f"{', '.join(ds.column_names) or 'none'})")
        rows = ds["translation"]
        sources = [_lang(row, cfg.source_lang, label, i, "data.source_lang") for i, row in enumerate(rows)]
        targets = [_lang(row, cfg.target_lang, label, i, "data.target_lang") for i, row in enumerate(rows)]
    else:
        sources, targets = (_column(ds, name, label, key) for name, key in
                            ((cfg.source_field, "data.source_field"), (cfg.target_field, "data.target_field")))
    for i, (source, target) in enumerate(zip(sources, targets, strict=True)):
        for side, text in (("source", source), ("target", target)):
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"{label}: row {i + 1} has an empty {side} ({text!r}); every pair needs both")
    return [(s.strip(), t.strip()) for s, t in zip(sources, targets, strict=True)]


def _column(ds: datasets.Dataset, name: str, label: str, key: str) -> list[Any]:
    if name not in ds.column_names:
        raise UserError(f"{key}: no column {name!r} in {label} (columns: {', '.join(ds.column_names) or 'none'})")
    return ds[name]


def _lang(row: Any, lang: str, label: str, index: int, key: str) -> Any:
    if not isinstance(row, dict) or lang not in row:
        have = ", ".join(row) if isinstance(row, dict) else type(row).__name__
        raise UserError(f"{key}: row {index + 1} of {label} has no {lang!r} in its translation ({have})")
    return row[lang]


def _from_splits(loaded: Any, cfg: DataConfig) -> dict[str, list[Pair]]:
    """A Dataset or DatasetDict -> our splits; its own validation/test splits win over fractions."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        loaded = {"train": loaded}
    names = list(loaded)
    train_name = "train" if "train" in loaded else names[0] if len(names) == 1 else None
    if train_name is None:
        raise UserError(f"{cfg.source} has no 'train' split (splits: {', '.join(names)})")
    val_name = next((n for n in _VAL_NAMES if n in loaded), None)
    test_name = "test" if "test" in loaded and train_name != "test" else None

    def pairs(split: str) -> list[Pair]:
        return rows_to_pairs(loaded[split], cfg, f"{cfg.source} [{split}]")

    if val_name is None and test_name is None:
        return split_pairs(pairs(train_name), cfg)
    out = {"train": pairs(train_name)}
    if val_name is None:  # carve val out of train, keep their test split
        out = split_pairs(out["train"], dataclasses.replace(cfg, test_fraction=0.0))
    else:
        out["val"] = pairs(val_name)
    if test_name is not None:
        out["test"] = pairs(test_name)
    return out
