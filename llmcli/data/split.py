"""Splitting data that has no validation split of its own into train / val / test.

Fractions are of characters for `tail` and of documents for `document`:

* `split_by: tail` (default, nanoGPT style): the documents are laid end to end in order; the last
  `val_fraction` of the characters is `val`, the `test_fraction` just before it is `test`, the rest
  is `train`: `[ train | test | val ]`. So `val` is the same text whether or not a test split is
  asked for. A cut moves forward to the next line start when one is within 1000 characters, and a
  document that straddles a cut becomes one document on each side.
* `split_by: document`: whole documents are shuffled with a fixed seed and dealt out by count
  (at least one each for val/test when their fraction is above zero); each split keeps the
  original order.
"""

from __future__ import annotations

import random

from llmcli.config import DataConfig
from llmcli.errors import UserError

SPLITS = ("train", "val", "test")
SPLIT_SEED = 1234
LINE_SNAP_CHARS = 1000


def split_documents(docs: list[str], cfg: DataConfig) -> dict[str, list[str]]:
    """Split documents by `cfg.split_by` (see the module docstring)."""
    if cfg.split_by == "document":
        return _split_by_document(docs, cfg.val_fraction, cfg.test_fraction)
    return _split_tail(docs, cfg.val_fraction, cfg.test_fraction)


def _split_tail(docs: list[str], val_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    total = sum(len(d) for d in docs)
    val_chars = max(1, round(total * val_fraction)) if val_fraction > 0 else 0
    test_chars = max(1, round(total * test_fraction)) if test_fraction > 0 else 0
    val_start = _snap_to_line(docs, total - val_chars, limit=total)
    test_start = min(_snap_to_line(docs, val_start - test_chars, limit=val_start), val_start)
    if test_start <= 0:
        raise UserError(f"the corpus ({total} characters) is too small to split into "
                        f"val_fraction={val_fraction:g} and test_fraction={test_fraction:g}")
    bounds = {"train": (0, test_start), "test": (test_start, val_start), "val": (val_start, total)}
    out: dict[str, list[str]] = {name: [] for name in bounds}
    pos = 0
    for doc in docs:
        for name, (lo, hi) in bounds.items():
            a, b = max(lo, pos), min(hi, pos + len(doc))
            if a < b:
                out[name].append(doc[a - pos:b - pos])
        pos += len(doc)
    return {name: out[name] for name in SPLITS}


def _snap_to_line(docs: list[str], pos: int, limit: int) -> int:
    """Move a cut at `pos` to just after the next newline, if that is close and below `limit`."""
    start = 0
    for doc in docs:
        if pos < start + len(doc):
            offset = pos - start
            if offset == 0 or doc[offset - 1] == "\n":
                return pos
            newline = doc.find("\n", offset, offset + LINE_SNAP_CHARS)
            snapped = start + newline + 1
            return snapped if newline != -1 and snapped < limit else pos
        start += len(doc)
    return pos


def _split_by_document(docs: list[str], val_fraction: float, test_fraction: float) -> dict[str, list[str]]:
    n = len(docs)
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise UserError(f"data.split_by=document: {n} document(s) are too few for "
                        f"val_fraction={val_fraction:g} and test_fraction={test_fraction:g} "
                        "(use data.split_by=tail to cut inside documents)")
    order = list(range(n))
    random.Random(SPLIT_SEED).shuffle(order)
    val, test = set(order[:n_val]), set(order[n_val:n_val + n_test])
    return {
        "train": [d for i, d in enumerate(docs) if i not in val and i not in test],
        "val": [d for i, d in enumerate(docs) if i in val],
        "test": [d for i, d in enumerate(docs) if i in test],
    }
