"""Token shards: a split's ids in plain files of one fixed dtype, read as one array.

A stream (a split, or one side of a split's pairs) is written as `<stream>-00000.bin`,
`<stream>-00001.bin`, ... (raw little-endian uint16 or uint32, no header: `np.memmap` or
`np.fromfile` read one) of about SHARD_TOKENS tokens each; the prepared folder's `meta.json` lists
each stream's shards with their token counts (the index). `TokenShards` memory-maps them and reads
them as one array: `len`, `[i]`, `[a:b]` (a window may span two shards), `np.asarray`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SHARD_TOKENS = 1 << 27  # 128M tokens: 256 MB of uint16


def shard_name(stream: str, index: int) -> str:
    return f"{stream}-{index:05d}.bin"


class TokenShards:
    """Shards read as one token array (memory-mapped, read-only)."""

    def __init__(self, paths: list[Path], dtype: np.dtype, sizes: list[int]):
        self.dtype = np.dtype(dtype)
        self.parts = [np.memmap(p, dtype=self.dtype, mode="r") if n else np.zeros(0, self.dtype)
                      for p, n in zip(paths, sizes, strict=True)]
        self.offsets = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return np.asarray(self)[key]
            return self._range(start, max(start, stop))
        index = int(key) + (len(self) if key < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(f"index {key} out of range for {len(self)} tokens")
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[shard][index - self.offsets[shard]]

    def _range(self, start: int, stop: int) -> np.ndarray:
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        if first >= len(self.parts) or stop <= self.offsets[first + 1]:  # inside one shard: a view
            part = self.parts[min(first, len(self.parts) - 1)] if self.parts else np.zeros(0, self.dtype)
            base = self.offsets[min(first, len(self.parts) - 1)] if self.parts else 0
            return part[start - base:stop - base]
        pieces = []
        while start < stop:
            end = min(stop, int(self.offsets[first + 1]))
            pieces.append(self.parts[first][start - self.offsets[first]:end - self.offsets[first]])
            start, first = end, first + 1
        return np.concatenate(pieces)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.concatenate(self.parts) if self.parts else np.zeros(0, self.dtype)
        return out if dtype is None else out.astype(dtype)


class ShardWriter:
    """Appends ids to `<stream>-NNNNN.bin` files in `directory`, starting a new one once a shard holds
    SHARD_TOKENS; `on_close(name, tokens)` runs when a shard is complete on disk (flushed, synced)."""

    def __init__(self, directory: Path, stream: str, dtype: np.dtype, first_index: int,
                 on_close: Callable[[str, int], None]):
        self.directory, self.stream, self.dtype = directory, stream, np.dtype(dtype)
        self.index, self.on_close = first_index, on_close
        self.file: Any = None
        self.tokens = 0

    def write(self, ids: np.ndarray) -> None:
        if self.file is None:
            self.file = open(self.directory / shard_name(self.stream, self.index), "wb")
            self.tokens = 0
        with self._naming_the_file():
            self.file.write(memoryview(np.ascontiguousarray(ids, dtype=self.dtype)).cast("B"))
        self.tokens += len(ids)

    @contextlib.contextmanager
    def _naming_the_file(self):
        """OS errors (a full disk) name the shard being written."""
        try:
            yield
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.directory / shard_name(self.stream, self.index))) \
                from None

    def full(self) -> bool:
        return self.tokens >= SHARD_TOKENS

    def close_shard(self) -> None:
        """Finish the current shard (if any) and report it."""
        if self.file is None:
            return
        with self._naming_the_file():
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        self.file = None
        self.on_close(shard_name(self.stream, self.index), self.tokens)
        self.index += 1

    def abandon(self) -> None:
        """Close an unfinished shard (after an error: its own, e.g. a full disk, is not raised again)."""
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None


def write_stream(directory: Path, stream: str, ids: np.ndarray, dtype: np.dtype) -> list[list]:
    """All of one stream's ids at once (small streams: instruction examples, pairs); its index entries."""
    entries: list[list] = []
    writer = ShardWriter(directory, stream, dtype, 0, lambda name, n: entries.append([name, n]))
    for start in range(0, len(ids), SHARD_TOKENS):
        writer.write(ids[start:start + SHARD_TOKENS])
        writer.close_shard()
    return entries


def read_stream(directory: Path, entries: list[list], dtype: np.dtype) -> TokenShards:
    """The stream whose index entries are `entries` ([file name, tokens], ...)."""
    return TokenShards([directory / name for name, _ in entries], dtype, [int(n) for _, n in entries])
