"""The cache of prepared data, shared by every kind (documents, instruction examples, pairs).

A prepared folder is `<cache root>/<source>-<kind>-<hash of its key>`: the key is everything that
changes the result, so a complete folder (its `meta.json`, written last, present) is reused as is.
A build runs under a lock (`.<name>.lock`, released by the system even when the process is killed,
removed by its holder)
in `.<name>.partial/`, which keeps what an interrupted build finished: `plan.json` (the key and
what the build decided, e.g. the split cuts), the tokenizer, and `shards.jsonl`, one line per token
shard complete on disk. A rerun of the same key (after kill -9, Ctrl-C, a full disk) resumes from
there; `--force` or another key starts over. The complete folder is renamed into place in one step,
so training never sees a torn cache. A bad input (UserError) or a full disk removes the partial
folder: nothing is cached.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from llmcli.errors import UserError
from llmcli.io import atomic_write_json, ensure_writable_dir, swap_in

T = TypeVar("T")
PLAN, LEDGER, META = "plan.json", "shards.jsonl", "meta.json"


def entry_dir(root: Path, source: str, kind: str, key: dict[str, Any]) -> Path:
    """<root>/<source stem>-<kind>-<16 hex digits of the key's hash>."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = source[3:] if source.startswith("hf:") else Path(source.rstrip("/\\")).name.split(".")[0]
    stem = re.sub(r"[^A-Za-z0-9.-]+", "-", stem).strip("-.")[:40] or "data"
    return root / f"{stem}-{kind}-{digest}"


class Build:
    """An unfinished prepared folder: what an earlier, interrupted build of the same key left."""

    def __init__(self, directory: Path, key: dict[str, Any]):
        self.dir, self.key = directory, key
        plan = _read_json(directory / PLAN)
        self.resumed = isinstance(plan, dict) and plan.get("key") == key
        self.plan: dict[str, Any] = plan if self.resumed else {"key": key}
        self.shards = self._finished_shards() if self.resumed else []

    def save_plan(self, **entries: Any) -> None:
        self.plan.update(entries)
        atomic_write_json(self.dir / PLAN, self.plan)

    def _finished_shards(self) -> list[dict]:
        """The ledger's records whose shard is on disk at its recorded size (a torn last line is ignored)."""
        out = []
        try:
            lines = (self.dir / LEDGER).read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        for line in lines:
            try:
                record = json.loads(line)
                if (self.dir / record["file"]).stat().st_size == record["bytes"]:
                    out.append(record)
                    continue
            except (ValueError, KeyError, OSError):
                pass
            break
        return out

    def record_shard(self, record: dict) -> None:
        """Note a shard complete on disk (one synced line, so a crash never leaves a false record)."""
        with open(self.dir / LEDGER, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(target: Path, console: Console):
    """Hold `.<name>.lock` (waiting for another holder); the file is removed by its holder, so a lock
    taken on a file already removed is dropped and taken again on the new one."""
    lock = target.with_name(f".{target.name}.lock")
    waited = False
    while True:
        fh = open(lock, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                console.print(f"waiting for another process preparing {target.name} ...", soft_wrap=True,
                              markup=False, highlight=False)
                waited = True
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            if os.fstat(fh.fileno()).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        fh.close()
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        fh.close()


def cached(target: Path, key: dict[str, Any], load: Callable[[Path], T | None], build: Callable[[Build], None],
           *, force: bool, console: Console) -> tuple[T, bool]:
    """(the prepared data at `target`, whether it was reused): a complete folder is loaded; else
    `build` fills a Build (resuming an interrupted one of the same key unless `force`), then the folder
    is swapped in."""
    if not force and (done := load(target)) is not None:
        return done, True
    ensure_writable_dir(target.parent)
    with _locked(target, console):
        if not force and (done := load(target)) is not None:  # another process just built it
            return done, True
        partial = target.with_name(f".{target.name}.partial")
        if force and partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(exist_ok=True)
        try:
            job = Build(partial, key)
            if not job.resumed:  # what is there belongs to another key
                _empty(partial)
            build(job)
            for name in (PLAN, LEDGER):
                (partial / name).unlink(missing_ok=True)
            swap_in(partial, target)
        except UserError:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            shutil.rmtree(partial, ignore_errors=True)
            where = f" writing {exc.filename}" if exc.filename else ""
            raise UserError(f"no space left on the device{where} (in {target.parent}); the partial cache "
                            "was removed: free some space or set data.cache_dir / LLMCLI_CACHE_DIR") from None
    done = load(target)
    if done is None:
        raise UserError(f"the prepared data in {target} is incomplete after building it")
    return done, False


def _empty(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
