"""Splitting data that has no validation split of its own into train / val / test, as a stream.

Fractions are of characters for `tail` and of documents for `document`:

* `split_by: tail` (default, nanoGPT style): the documents are laid end to end in order; the last
  `val_fraction` of the characters is `val`, the `test_fraction` just before it is `test`, the rest
  is `train`: `[ train | test | val ]`. So `val` is the same text whether or not a test split is
  asked for. A cut moves forward to the next line start when one is within 1000 characters, and a
  document that straddles a cut becomes one document on each side.
* `split_by: document`: exactly round(n x fraction) documents (at least one when the fraction is
  above zero) go to val and to test, a uniformly random choice fixed by a seed, drawn one document
  at a time (selection sampling), so nothing but counts is held; each split keeps the original order.

Both need one pass over the corpus first (`plan_split`: its documents and characters, then the text
around each tail cut). A corpus read once as it downloads (`data.streaming=true`) has no such pass:
there `document` sends each document to val / test with probability val_fraction / test_fraction,
and `tail` is refused. `route` then streams `(split, text, ends)` in corpus order.
"""

from __future__ import annotations

import bisect
import dataclasses
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from llmcli.config import DataConfig
from llmcli.data.sources import Corpus, Unit, documents
from llmcli.errors import UserError

SPLITS = ("train", "val", "test")
SPLIT_SEED = 1234
LINE_SNAP_CHARS = 1000
Routed = tuple[str, str, bool]  # (split, text, ends)


@dataclass
class SplitPlan:
    """How the corpus's `train` units divide (saved with a build, so a resumed one splits alike)."""

    how: str  # "tail", "document", "bernoulli" (a stream) or "none" (the source has its own val)
    documents: int = 0
    characters: int = 0
    bytes: int = 0
    cuts: list[int] = field(default_factory=list)  # tail: test start, val start (characters)
    counts: list[int] = field(default_factory=list)  # document: val, test
    fractions: list[float] = field(default_factory=list)  # bernoulli: val, test

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def scan(units: list[Unit], tick: Callable[[int], None] = lambda n: None) -> tuple[int, int, int, list[int]]:
    """One pass over `units`: (documents, characters, UTF-8 bytes, characters of each unit)."""
    docs = chars = nbytes = 0
    per_unit = []
    for unit in units:
        unit_chars = 0
        for text, ends in documents(unit):
            unit_chars += len(text)
            size = len(text.encode("utf-8"))
            nbytes += size
            docs += ends
            tick(size)
        chars += unit_chars
        per_unit.append(unit_chars)
    return docs, chars, nbytes, per_unit


def plan_split(corpus: Corpus, cfg: DataConfig, tick: Callable[[int], None] = lambda n: None) -> SplitPlan:
    """How to split `corpus` under `cfg` (reads it once for counts; tail cuts read around the cut)."""
    if "val" in corpus.own:
        return SplitPlan("none")
    test_fraction = 0.0 if "test" in corpus.own else cfg.test_fraction
    if corpus.streamed:
        if cfg.split_by == "tail" and (cfg.val_fraction or test_fraction):
            raise UserError(f"{corpus.label} has no validation split and data.streaming=true reads it once: "
                            "set data.split_by=document (documents go to val with probability "
                            "data.val_fraction), or data.streaming=false")
        return SplitPlan("bernoulli", fractions=[cfg.val_fraction, test_fraction])
    docs, chars, nbytes, per_unit = scan(corpus.train, tick)
    if not docs:
        raise UserError(f"data.source: {corpus.label} "
                        + ("is empty" if len(corpus.train) <= 1 else "has only empty documents"))
    plan = SplitPlan(cfg.split_by, documents=docs, characters=chars, bytes=nbytes)
    if cfg.split_by == "document":
        n_val = max(1, round(docs * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
        n_test = max(1, round(docs * test_fraction)) if test_fraction > 0 else 0
        if docs - n_val - n_test < 1:
            raise UserError(f"data.split_by=document: {docs} document(s) are too few for "
                            f"val_fraction={cfg.val_fraction:g} and test_fraction={test_fraction:g} "
                            "(use data.split_by=tail to cut inside documents)")
        plan.counts = [n_val, n_test]
        return plan
    starts = [0]
    for c in per_unit:
        starts.append(starts[-1] + c)
    val_chars = max(1, round(chars * cfg.val_fraction)) if cfg.val_fraction > 0 else 0
    test_chars = max(1, round(chars * test_fraction)) if test_fraction > 0 else 0
    val_start = _snap(corpus.train, starts, chars - val_chars, limit=chars)
    test_start = min(_snap(corpus.train, starts, val_start - test_chars, limit=val_start), val_start)
    if test_start <= 0:
        raise UserError(f"the corpus ({chars} characters) is too small to split into "
                        f"val_fraction={cfg.val_fraction:g} and test_fraction={test_fraction:g}")
    plan.cuts = [test_start, val_start]
    return plan


def _snap(units: list[Unit], starts: list[int], pos: int, limit: int) -> int:
    """Move a cut at `pos` to just after the next newline of its document, if that is close and below
    `limit` (reads only the unit that holds `pos`)."""
    k = bisect.bisect_right(starts, pos) - 1
    if k >= len(units):
        return pos
    at, doc_start, before = starts[k], starts[k], ""
    parts = documents(units[k])
    for text, ends in parts:
        if at + len(text) > pos:
            offset = pos - at
            if pos == doc_start or (text[offset - 1] if offset else before) == "\n":
                return pos
            window = text[offset:offset + LINE_SNAP_CHARS]
            while len(window) < LINE_SNAP_CHARS and not ends:
                text, ends = next(parts)
                window += text[:LINE_SNAP_CHARS - len(window)]
            newline = window.find("\n")
            snapped = pos + newline + 1
            return snapped if newline != -1 and snapped < limit else pos
        at += len(text)
        before = text[-1] if text else before
        if ends:
            doc_start = at
    return pos


def route(corpus: Corpus, plan: SplitPlan) -> Iterator[Routed]:
    """Every document part of the corpus with the split it belongs to, in corpus order."""
    train = (part for unit in corpus.train for part in documents(unit))
    if plan.how == "tail":
        yield from _route_tail(train, *plan.cuts)
    elif plan.how in ("document", "bernoulli"):
        yield from _route_documents(train, plan)
    else:
        yield from (("train", text, ends) for text, ends in train)
    for split in ("val", "test"):
        for unit in corpus.own.get(split, []):
            yield from ((split, text, ends) for text, ends in documents(unit))


def _route_tail(parts: Iterator[tuple[str, bool]], test_start: int, val_start: int) -> Iterator[Routed]:
    def split_at(pos: int) -> str:
        return "train" if pos < test_start else "test" if pos < val_start else "val"

    pos, open_split = 0, None  # the split of the document in progress, if any
    for text, ends in parts:
        end = pos + len(text)
        if open_split is not None and text and split_at(pos) != open_split:  # a cut right at this part's start
            yield open_split, "", True
            open_split = None
        start = pos
        for cut in (test_start, val_start):
            if start < cut < end:
                yield split_at(start), text[start - pos:cut - pos], True
                start = cut
        if start < end:
            yield split_at(start), text[start - pos:], ends
        elif ends:  # an empty last part ends the document in progress
            yield open_split or split_at(start), "", True
        open_split = None if ends else split_at(end - 1) if end > pos else open_split
        pos = end


def _route_documents(parts: Iterator[tuple[str, bool]], plan: SplitPlan) -> Iterator[Routed]:
    rng = random.Random(SPLIT_SEED)
    left = plan.documents
    val_left, test_left = plan.counts or (0, 0)
    split = None
    for text, ends in parts:
        if split is None:  # a document's first part decides where it goes
            if plan.how == "bernoulli":
                r = rng.random()
                split = "val" if r < plan.fractions[0] else "test" if r < sum(plan.fractions) else "train"
            elif rng.random() * left < val_left + test_left:
                if rng.random() * (val_left + test_left) < val_left:
                    split, val_left = "val", val_left - 1
                else:
                    split, test_left = "test", test_left - 1
            else:
                split = "train"
            left -= 1
        yield split, text, ends
        if ends:
            split = None


def split_documents(docs: list[str], cfg: DataConfig) -> dict[str, list[str]]:
    """In-memory documents split by `cfg.split_by` exactly as a streamed corpus is (train, val, test)."""
    corpus = Corpus("the documents", [Unit(str(i), lambda d=d: iter([(d, True)])) for i, d in enumerate(docs)])
    out: dict[str, list[str]] = {name: [] for name in SPLITS}
    current: dict[str, str] = {}
    for split, text, ends in route(corpus, plan_split(corpus, cfg)):
        current[split] = current.get(split, "") + text
        if ends:
            out[split].append(current.pop(split))
    return out


def split_indices(n: int, cfg: DataConfig) -> dict[str, list[int]]:
    """Which of `n` whole records go to each split (split_by=document), as `route` deals documents."""
    plan = plan_split(Corpus("the records", [Unit(str(i), lambda: iter([("x", True)])) for i in range(n)]),
                      dataclasses.replace(cfg, split_by="document"))
    out: dict[str, list[int]] = {name: [] for name in SPLITS}
    for i, (split, _, _) in enumerate(_route_documents(iter([("x", True)] * n), plan)):
        out[split].append(i)
    return out
