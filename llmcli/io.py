"""Crash-safe file writes: everything is written to a temporary name, then renamed into place.

A rename within one filesystem is atomic, so a reader (or a resumed run) sees either the old file
or the complete new one, never half of it. Temporary names carry the writer's process id
(`.NAME.PID-XXXX.tmp`), so what a killed process left behind is recognised and removed the next
time the same target is written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from llmcli.errors import UserError


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale(target: Path) -> None:
    """Remove the temporary files and folders that killed writers of `target` left next to it, and
    put back a directory whose swap (see atomic_replace_dir) was cut between its two renames."""
    if not target.parent.is_dir():
        return
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        pid = leftover.name[len(target.name) + 2:].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
    old = target.with_name(f".{target.name}.old")
    if old.exists() and not target.exists():
        os.replace(old, target)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-"


def read_text_file(path: str | Path, what: str) -> str:
    """The UTF-8 text of a file the user named; a one-line error "`what` not found: PATH" or "PATH:
    not UTF-8 text" otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)`, then move tmp_path over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; use the usual mode
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_replace_dir(target: str | Path, build: Callable[[Path], None]) -> None:
    """Build a directory at a temporary name next to `target`, then swap it in.

    The old directory is renamed aside before the new one takes its name and removed only after,
    so at every instant either the old or the new complete directory exists under some name.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 directories
        build(tmp)
        swap_in(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def swap_in(new: Path, target: Path) -> None:
    """Give the complete directory `new` the name `target`: an old `target` is renamed aside first
    and removed only after, so one of the two complete directories always exists."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(new, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def ensure_writable_dir(path: str | Path) -> Path:
    """Create `path` if needed and check we can write there; a UserError otherwise."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"output path exists and is not a directory: {path}") from None
    except OSError as exc:
        raise UserError(f"cannot create output directory {path}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"output directory is not writable: {path}")
    return path


def read_json_object(path: str | Path, *, what: str = "a JSON object") -> dict[str, Any]:
    """Parse a JSON file that must hold an object; a one-line UserError names the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected {what}")
    return value


def refuse_overlap(out: Path, inputs: Mapping[str, Path]) -> None:
    """A one-line UserError if writing `out` could touch any of `inputs` (see check_output_dir)."""
    target = Path(os.path.realpath(Path(out).expanduser()))
    for what, path in inputs.items():
        path = Path(os.path.realpath(Path(path).expanduser()))
        if target == path or target in path.parents or path in target.parents:
            where = "is" if target == path else "contains" if target in path.parents else "lies inside"
            raise UserError(f"--out {out} {where} {what} ({path}): an output may not overlap an input; "
                            "choose another directory")
