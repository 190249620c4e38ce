"""The exceptions that mean "the user asked for something we cannot do".

The CLI prints them as a single line and exits non-zero; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input (config, files, options), reported without a traceback."""


class ConfigError(UserError):
    """A config value is unknown, of the wrong type or out of range."""


class FieldError(UserError):
    """An option has a bad value. It carries the option's field name, so that each boundary (the
    command line, an HTTP body) can name the field the way its users spell it."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(self.render(str))

    def render(self, name: Callable[[str], str]) -> str:
        """The message with the field spelled by `name`, e.g. `--top-p must be in (0, 1]; got 0.0`
        (a problem that starts with ":" follows the name directly: `--device: unknown ...`)."""
        return f"{name(self.field)}{'' if self.problem.startswith(':') else ' '}{self.problem}"
