"""What every picture and terminal view shares: matplotlib figures on the headless Agg canvas,
an --out path checked before any work and written atomically, and tokens as readable labels."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from llmcli.errors import UserError
from llmcli.io import atomic_write

FORMATS = (".png", ".svg", ".pdf")


def check_out(out: Path) -> Path:
    """Refuse an --out picture path that cannot be written, before anything runs; nothing is
    left behind (the writability probe is a temporary file, removed at once)."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; name a file, e.g. {out / ('picture' + FORMATS[0])}")
    if out.suffix.lower() not in FORMATS:
        raise UserError(f"--out {out}: the file name must end in {', '.join(FORMATS[:-1])} or {FORMATS[-1]}")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"--out {out}: {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write in {parent} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)
    return out


def new_figure(width: float, height: float, dpi: int = 100) -> Any:
    """A matplotlib Figure drawn by the Agg canvas (no display, no pyplot state), laid out so that
    titles, labels and colour bars do not overlap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Any, out: Path) -> None:
    """Write `figure` to `out` (format from its suffix) atomically: a reader never sees half a file."""
    fmt = out.suffix.lower().lstrip(".")
    atomic_write(out, lambda tmp: figure.savefig(tmp, format=fmt, bbox_inches="tight"))


def token_label(text: str, width: int | None = None) -> str:
    """A token's text as a readable axis label: whitespace made visible, cut to `width`."""
    shown = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r").replace(" ", "␣") or "∅"
    return shown if width is None or len(shown) <= width else shown[: max(1, width - 1)] + "…"
