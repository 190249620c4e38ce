"""One local file -> its documents, streamed in bounded memory, with one-line errors that name the file.

A document arrives as parts `(text, ends)`: `ends` is True on its last part. A `.txt` file is one
document, read in blocks of about BLOCK_BYTES (so a 50 GB file is never one string); `.jsonl`
`.json` `.csv` and `.parquet` files give one document per row, from the column `data.text_field`.
Text formats may be compressed (`.gz` `.bz2` `.xz` `.zst`, by suffix: `notes.txt.gz`). Texts must
be UTF-8 (a leading BOM is dropped); with `data.encoding_errors=replace` invalid bytes become U+FFFD
and a warning gives their count. A NUL byte marks a binary file.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import itertools
import json
import lzma
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from rich.console import Console

from llmcli.errors import UserError

BLOCK_BYTES = 1 << 20
ROWS_PER_BATCH = 1024
COMPRESSED = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}
FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
Part = tuple[str, bool]


def file_format(path: Path) -> str | None:
    """'text', 'json', 'csv' or 'parquet' for a supported name (compressed text formats too), else None."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSED:
        fmt = FORMATS.get(suffixes[0]) if len(suffixes) == 2 else None
        return fmt if fmt != "parquet" else None
    return FORMATS.get(suffixes[-1]) if suffixes else None


def _open_raw(path: Path):
    """The file's bytes, decompressed by suffix (pyarrow, already a dependency of datasets, reads .zst)."""
    codec = COMPRESSED.get(path.suffix.lower())
    if codec == "gzip":
        return gzip.open(path, "rb")
    if codec == "bzip2":
        return bz2.open(path, "rb")
    if codec == "xz":
        return lzma.open(path, "rb")
    if codec == "zstd":
        import pyarrow as pa

        return pa.CompressedInputStream(pa.OSFile(str(path)), "zstd")
    return open(path, "rb")


_CORRUPT = (OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)


class CheckedText:
    """A file's bytes checked as UTF-8 text while they stream: `blocks()` gives decoded text, `read(n)`
    the checked bytes (for pyarrow's CSV reader). Errors name the file and the byte offset."""

    def __init__(self, path: Path, errors: str, console: Console | None, warned: set[Path] | None = None):
        self.path, self.errors, self.console = path, errors, console
        self.warned = set() if warned is None else warned  # files already warned about (each pass reads again)
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.offset = 0  # bytes of the (decompressed) stream consumed
        self.lines = 0
        self.replaced = 0
        self.pending = b""  # checked bytes not yet handed out by read()
        self.raw = _open_raw(path)

    def close(self) -> None:
        self.raw.close()
        if self.replaced and self.console is not None and self.path not in self.warned:
            self.warned.add(self.path)
            self.console.print(f"warning: {self.path}: replaced {self.replaced} invalid UTF-8 byte sequence(s) "
                               "with U+FFFD", soft_wrap=True, markup=False, highlight=False)
            self.replaced = 0

    def _chunk(self) -> bytes:
        try:
            return self.raw.read(BLOCK_BYTES)
        except _CORRUPT as exc:
            kind = COMPRESSED.get(self.path.suffix.lower(), "file")
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{self.path}: corrupt {kind} data after {self.offset:,} decompressed bytes "
                            f"({reason})") from None

    def _decode(self, raw: bytes, final: bool) -> str:
        start = self.offset
        nul = raw.find(b"\0")
        if nul != -1:
            raise UserError(f"{self.path}: a binary file, not text (NUL byte at byte {start + nul:,})")
        pending = self.decoder.getstate()[0]  # the start of a character cut by the previous block
        held = len(pending)
        try:
            text = self.decoder.decode(raw, final)
        except UnicodeDecodeError as exc:
            where = start - held + exc.start
            if self.errors != "replace":
                line = self.lines + raw.count(b"\n", 0, max(0, exc.start - held)) + 1
                raise UserError(f"{self.path}: not valid UTF-8 at byte {where} (line {line}); "
                                "set data.encoding_errors=replace to substitute U+FFFD") from None
            self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
            text = self.decoder.decode(pending + raw, final)
        if self.decoder.errors == "replace":  # (a U+FFFD the file itself holds is not counted)
            self.replaced += text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
        if start == 0 and text.startswith("\ufeff"):
            text = text[1:]
        self.offset += len(raw)
        self.lines += raw.count(b"\n")
        return text

    def blocks(self) -> Iterator[str]:
        """The text in blocks of about BLOCK_BYTES characters (the last may be empty)."""
        while True:
            raw = self._chunk()
            text = self._decode(raw, final=not raw)
            if text or not raw:
                yield text
            if not raw:
                return

    def read(self, n: int = -1) -> bytes:
        """Checked UTF-8 bytes (re-encoded where bytes were replaced)."""
        while n < 0 or len(self.pending) < n:
            raw = self._chunk()
            text = self._decode(raw, final=not raw)
            if self.decoder.errors == "replace" or (self.offset == len(raw) and raw.startswith(codecs.BOM_UTF8)):
                self.pending += text.encode("utf-8")
            else:
                self.pending += raw
            if not raw:
                break
        out, self.pending = (self.pending, b"") if n < 0 else (self.pending[:n], self.pending[n:])
        return out

    @property
    def closed(self) -> bool:
        return False


def text_parts(path: Path, errors: str, console: Console | None, warned: set[Path] | None = None) -> Iterator[Part]:
    """A `.txt` file (maybe compressed) as the parts of one document."""
    checked = CheckedText(path, errors, console, warned)
    try:
        previous = None
        for block in checked.blocks():
            if previous is not None:
                yield previous, False
            previous = block
        yield previous or "", True
    finally:
        checked.close()


# --------------------------------------------------------------------------------------------
# Rows: JSON lines or a JSON list, CSV, parquet


def _field_value(value, path: Path, where: str, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"data.text_field: {field!r} in {path} {where} holds {type(value).__name__}, not text")
    return value


def _json_records(path: Path, checked: CheckedText) -> Iterator[tuple[str, object]]:
    """(where, record) of a JSON-lines file, or of a file holding one JSON list of records."""
    blocks = checked.blocks()
    first = ""
    for block in blocks:
        first += block
        if first.strip():
            break
    if first.lstrip().startswith("["):
        yield from _json_list(path, first, blocks)
        return
    pending, line = first, 1
    for block in itertools.chain([""], blocks):
        pending += block
        *complete, pending = pending.split("\n")
        for text in complete:
            yield from _json_line(path, text, line)
            line += 1
    yield from _json_line(path, pending, line)


def _json_line(path: Path, text: str, line: int) -> Iterator[tuple[str, object]]:
    if text.strip():
        try:
            yield f"line {line}", json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} line {line}: not valid JSON ({exc.msg})") from None


def _json_list(path: Path, buffer: str, blocks: Iterator[str]) -> Iterator[tuple[str, object]]:
    """The records of one JSON list, decoded one at a time from a buffer refilled as it runs out."""
    decoder = json.JSONDecoder()
    pos, index = buffer.index("[") + 1, 0
    while True:
        # 1) skip the separators, pulling more text when the buffer runs out
        while (pos := len(buffer) - len(buffer[pos:].lstrip(" \t\r\n,"))) >= len(buffer):
            block = next(blocks, None)
            if block is None:
                raise UserError(f"{path}: the JSON list is not closed (after record {index})")
            buffer, pos = block, 0
        if buffer[pos] == "]":
            return
        # 2) decode one record; a record cut by the end of the buffer gets the next block
        while True:
            try:
                record, pos = decoder.raw_decode(buffer, pos)
                break
            except json.JSONDecodeError as exc:
                block = None
                if exc.msg.startswith("Unterminated") or exc.pos >= len(buffer) - 1:
                    block = next(blocks, None)
                if block is None:
                    raise UserError(f"{path}: not valid JSON in record {index + 1} ({exc.msg})") from None
                buffer, pos = buffer[pos:] + block, 0
        index += 1
        yield f"record {index}", record


def json_rows(path: Path, field: str, errors: str, console: Console | None,
             warned: set[Path] | None = None) -> Iterator[list[str]]:
    """Batches of the `field` texts of a `.jsonl` / `.json` file."""
    checked = CheckedText(path, errors, console, warned)
    try:
        batch: list[str] = []
        seen_field, first_keys = False, None
        for where, record in _json_records(path, checked):
            if not isinstance(record, dict):
                raise UserError(f"{path} {where}: expected a JSON object with a {field!r} field")
            if first_keys is None:
                first_keys = list(record)
            if field in record:
                seen_field = True
            batch.append(_field_value(record.get(field), path, where, field))
            if len(batch) == ROWS_PER_BATCH:
                yield batch
                batch = []
        if first_keys is not None and not seen_field:
            raise UserError(f"data.text_field: no column {field!r} in {path} (columns: {', '.join(first_keys) or 'none'})")
        yield batch
    finally:
        checked.close()


def _arrow_texts(batch, field: str, label: str) -> list[str]:
    import pyarrow as pa

    names = batch.schema.names
    if field not in names:
        raise UserError(f"data.text_field: no column {field!r} in {label} (columns: {', '.join(names) or 'none'})")
    column = batch.column(names.index(field))
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
            or pa.types.is_null(column.type)):
        raise UserError(f"data.text_field: column {field!r} in {label} holds {column.type}, not text")
    return [t if t is not None else "" for t in column.to_pylist()]


def csv_rows(path: Path, field: str, errors: str, console: Console | None,
             warned: set[Path] | None = None) -> Iterator[list[str]]:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    checked = CheckedText(path, errors, console, warned)
    try:
        try:
            reader = pcsv.open_csv(pa.PythonFile(checked, mode="r"),
                                   read_options=pcsv.ReadOptions(block_size=BLOCK_BYTES))
            for batch in reader:
                yield _arrow_texts(batch, field, str(path))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise UserError(f"could not read {path}: {_first_line(exc)}") from None
    finally:
        checked.close()


def parquet_rows(path: Path, field: str) -> Iterator[list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        names = table.schema_arrow.names
        if field not in names:
            raise UserError(f"data.text_field: no column {field!r} in {path} (columns: {', '.join(names) or 'none'})")
        for batch in table.iter_batches(batch_size=ROWS_PER_BATCH, columns=[field]):
            yield _arrow_texts(batch, field, str(path))
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"could not read {path}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def row_parts(batches: Iterator[list[str]]) -> Iterator[Part]:
    for batch in batches:
        for text in batch:
            yield text, True


def file_parts(path: Path, field: str, errors: str, console: Console | None,
               warned: set[Path] | None = None) -> Callable[[], Iterator[Part]]:
    """A function that streams the documents of one supported file as parts (each pass reads the file
    again; `warned`: the files whose replaced bytes were already reported)."""
    fmt = file_format(path)
    if fmt == "text":
        return lambda: text_parts(path, errors, console, warned)
    if fmt == "json":
        return lambda: row_parts(json_rows(path, field, errors, console, warned))
    if fmt == "csv":
        return lambda: row_parts(csv_rows(path, field, errors, console, warned))
    return lambda: row_parts(parquet_rows(path, field))


def read_text(path: Path, errors: str, console: Console | None) -> str:
    """A whole (small) file as checked text: for data read in memory, such as sequence-to-sequence pairs."""
    checked = CheckedText(path, errors, console)
    try:
        return "".join(checked.blocks())
    finally:
        checked.close()
