"""How every option of every command is declared, once.

Each command's options are a frozen dataclass (in this package's modules, one per area): its fields
(type, default, and `option()` / `argument()` metadata: flags and help) are what `llmcli/cli.py`
turns into the command line, and the same object is what the package function receives, so no
option is spelled twice. Range checks live on the fields too and run when the object is built; they
raise `FieldError` with the field's name, which each boundary renders its own way (`--top-p` on the
command line, `top_p` in an HTTP body). This package imports nothing heavy: the CLI reads it to
answer `--help` without torch. Here: the field helpers, the `Options` base and the groups several
commands share (config + overrides, threads).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from llmcli.errors import FieldError

REQUIRED = dataclasses.MISSING  # an option() or argument() without a default must be given


@dataclass(frozen=True)
class Spec:
    """How one field appears on the command line."""

    flags: tuple[str, ...]  # e.g. ("--max-new-tokens", "-n"); () for a positional argument
    help: str
    argument: bool = False
    metavar: Optional[str] = None
    check: Optional[tuple[Callable[[Any], bool], str]] = None  # (value is fine, the rule in words)
    cli_type: Any = None  # the type Typer parses, when it differs from the field's
    convert: Optional[Callable[[Any], Any]] = None  # parsed value -> field value
    typer: dict = field(default_factory=dict)  # more typer.Option arguments (envvar, dir_okay...)


def option(default: Any = REQUIRED, *flags: str, help: str, check=None, cli_type=None,
           convert=None, metavar=None, **typer: Any) -> Any:
    """A `--flag` option; without `default` it is required."""
    spec = Spec(flags, help, check=check, cli_type=cli_type, convert=convert, metavar=metavar, typer=typer)
    return field(default=default, metadata={"cli": spec})


def argument(default: Any = REQUIRED, *, help: str, metavar: str | None = None,
             **typer: Any) -> Any:
    """A positional argument; without `default` it is required."""
    return field(default=default, metadata={"cli": Spec((), help, argument=True, metavar=metavar, typer=typer)})


def nested(cls: type) -> Any:
    """A group of options declared by another dataclass (its fields become this command's flags)."""
    return field(default_factory=cls, metadata={"nested": True})


def is_integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


AT_LEAST_ONE = (lambda v: is_integer(v) and v >= 1, "at least 1")


NOT_NEGATIVE = (lambda v: is_integer(v) and v >= 0, ">= 0")
FRACTION = (lambda v: is_number(v) and 0 <= v < 1, "in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class Options:
    """Base of every options dataclass: checks each field's rule, then `check()` (cross-field)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            spec = f.metadata.get("cli")
            value = getattr(self, f.name)
            if spec is not None and spec.check is not None and value is not None:
                ok, rule = spec.check
                if not ok(value):
                    raise FieldError(f.name, f"must be {rule}; got {value!r}")
        self.check()

    def check(self) -> None:
        """Rules between fields, or ones a single predicate cannot say; raise FieldError."""


def flag_names(cls: type) -> dict[str, str]:
    """Field name -> its long flag (or its metavar, for arguments), nested groups included."""
    names = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("nested"):
            names.update(flag_names(f.default_factory))  # type: ignore[arg-type]
            continue
        spec: Spec = f.metadata["cli"]
        longs = [flag for flag in spec.flags if flag.startswith("--")]
        names[f.name] = longs[0] if longs else (spec.metavar or f.name.upper())
    return names


DEVICE_HELP = "auto, cpu, cuda or cuda:N."


AUTO_DTYPE_HELP = "auto (bfloat16 on a GPU, else float32), float32, bfloat16, float16."


def threads_option() -> Any:
    return option(None, "--threads", help="CPU threads for the model (default: one per core, fewer when other "
                                          "processes keep cores busy; see docs/training.md). Small models run fastest "
                                          "on 1.", check=AT_LEAST_ONE)


def config_option(help: str = "YAML config file, or the name of a shipped recipe (llmcli recipes).") -> Any:
    return option(None, "--config", "-c", help=help, dir_okay=False)


def overrides_argument() -> Any:
    return argument(None, metavar="[OVERRIDES]...",
                    help="section.key=value pairs applied over the config, e.g. train.max_steps=50 "
                         "model.n_layer=2.")


@dataclass(frozen=True, kw_only=True)
class ConfigOptions(Options):
    config: Optional[Path] = config_option()
    overrides: Optional[list[str]] = overrides_argument()
