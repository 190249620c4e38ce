"""`llmcli recipes`: the shipped configs with their purpose, family and budget; `show` prints one,
`copy` writes an editable copy (never over an existing file)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from llmcli import ui
from llmcli.config import Config
from llmcli.config_loader import load_config
from llmcli.errors import UserError
from llmcli.options.recipes import RecipeCopyOptions, RecipeShowOptions, RecipesOptions
from llmcli.recipes.shipped import find_recipe, recipe_names


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    purpose: str  # the file's first comment line
    family: str  # e.g. "transformer (llama), char" or "gru-seq2seq, char -> word"
    budget: str  # e.g. "10 min" or "50 steps"


def read_recipe(path: Path) -> Recipe:
    first = (path.read_text(encoding="utf-8").splitlines() or [""])[0]
    cfg = load_config(path)
    return Recipe(path.stem, path, first.removeprefix("#").strip() if first.startswith("#") else "",
                  family(cfg), budget(cfg))


def family(cfg: Config) -> str:
    m = cfg.model
    tokens = cfg.tokenizer.kind
    if cfg.data.task == "seq2seq" and cfg.source_tokenizer.kind != "shared":
        tokens = f"{cfg.source_tokenizer.kind} -> {tokens}"
    return f"{m.arch}{f' ({m.preset})' if m.preset else ''}, {tokens}"


def budget(cfg: Config) -> str:
    t = cfg.train
    limits = [f"{t.max_minutes:g} min" if t.max_minutes else "", f"{t.max_steps:,} steps" if t.max_steps else "",
              f"{t.max_epochs} epochs" if t.max_epochs else ""]
    return " or ".join(limit for limit in limits if limit)


def recipes_command(opts: RecipesOptions) -> None:
    """Two lines a recipe (name, family, budget; then its purpose): readable at any terminal width."""
    found = [read_recipe(find_recipe(name)) for name in recipe_names()]
    name_width, family_width = (max(len(getattr(r, key)) for r in found) for key in ("name", "family"))
    for recipe in found:
        ui.stdout.print(f"{recipe.name:<{name_width}}  {recipe.family:<{family_width}}  {recipe.budget}\n"
                        f"    {recipe.purpose}", markup=False, soft_wrap=True)
    ui.stdout.print("\nTrain one with `llmcli train -c NAME --out DIR`; `llmcli recipes show NAME` prints it and "
                    "`llmcli recipes copy NAME FILE` writes an editable copy.", markup=False, soft_wrap=True)


def show_command(opts: RecipeShowOptions) -> None:
    sys.stdout.write(find_recipe(opts.name).read_text(encoding="utf-8"))


def copy_command(opts: RecipeCopyOptions) -> None:
    source = find_recipe(opts.name)
    target = opts.path / source.name if opts.path.is_dir() else opts.path
    if target.exists():
        raise UserError(f"{target} already exists; not overwriting it (choose another path)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "x", encoding="utf-8") as fh:  # "x": never replaces a file that appeared meanwhile
        fh.write(source.read_text(encoding="utf-8"))
    ui.stdout.print(f"wrote {target}; edit it, then `llmcli train -c {target} --out runs/{opts.name}`",
                    markup=False, soft_wrap=True)
