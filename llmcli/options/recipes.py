"""Options of `llmcli recipes` (list, show, copy)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmcli.options.fields import REQUIRED, Options, argument


@dataclass(frozen=True, kw_only=True)
class RecipesOptions(Options):
    """The recipes that ship with llmcli: their purpose, model family and budget.

    Any command's -c NAME reads the shipped recipe NAME (a file of that name wins).

    Examples:

      llmcli recipes

      llmcli recipes show tiny

      llmcli recipes copy shakespeare-char my-char.yaml
    """


@dataclass(frozen=True, kw_only=True)
class RecipeShowOptions(Options):
    """Print a shipped recipe (YAML with its comments)."""

    name: str = argument(REQUIRED, metavar="NAME", help="The recipe's name (llmcli recipes lists them).")


@dataclass(frozen=True, kw_only=True)
class RecipeCopyOptions(Options):
    """Write an editable copy of a shipped recipe; an existing file is never replaced."""

    name: str = argument(REQUIRED, metavar="NAME", help="The recipe's name (llmcli recipes lists them).")
    path: Path = argument(REQUIRED, metavar="PATH", help="The file to write (a folder: PATH/NAME.yaml).")
