"""The recipes that ship inside the package, found by name: `-c tiny` reads llmcli/configs/tiny.yaml
wherever llmcli is installed (the repository's configs/ is a link to that folder, so there is one
copy). A file path always wins over a recipe of the same name."""

from __future__ import annotations

from pathlib import Path

from llmcli.errors import UserError

RECIPE_DIR = Path(__file__).resolve().parent.parent / "configs"


def recipe_names() -> list[str]:
    return sorted(path.stem for path in RECIPE_DIR.glob("*.yaml"))


def shipped_recipe(name: str) -> Path | None:
    """The shipped recipe called `name` (`tiny` or `tiny.yaml`); None when `name` is a path or no
    recipe has that name."""
    stem = name.removesuffix(".yaml")
    if not stem or Path(stem).name != stem or stem.startswith("."):
        return None
    path = RECIPE_DIR / f"{stem}.yaml"
    return path if path.is_file() else None


def find_recipe(name: str) -> Path:
    path = shipped_recipe(name)
    if path is None:
        raise UserError(f"no recipe named {name!r}; shipped: {', '.join(recipe_names())} (llmcli recipes)")
    return path
