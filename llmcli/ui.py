"""Terminal output shared by the commands: live rich displays on a TTY, plain log lines elsewhere.

Results (tables, JSON) go to stdout; progress and logs go to stderr so that piping a command's
output never captures a progress bar.
"""

from __future__ import annotations

import time

from rich.console import Console

stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)


def interactive(console: Console = stderr) -> bool:
    """True when live displays (progress bars, spinners) make sense."""
    return console.is_terminal and not console.is_dumb_terminal


def log(message: str, console: Console = stderr) -> None:
    """A plain timestamped line: no colours or control characters when not on a TTY."""
    if interactive(console):
        console.print(message)
    else:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        console.print(f"{stamp} {message}", markup=False, highlight=False, soft_wrap=True)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_bytes(n: float) -> str:
    """Sizes as people read them: 512.0 KiB, 12.3 MiB, 1.25 GiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"
