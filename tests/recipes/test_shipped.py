"""Shipped recipes: package data found by name from anywhere (`-c tiny`), a path always winning, and
the repository's configs/ being the same folder (one copy)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmcli.config_loader import load_config
from llmcli.errors import ConfigError
from llmcli.recipes.shipped import RECIPE_DIR, recipe_names, shipped_recipe

REPO = Path(__file__).resolve().parents[2]


def test_the_repositorys_configs_are_the_shipped_recipes():
    assert (REPO / "configs").resolve() == RECIPE_DIR
    assert recipe_names() == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert {"tiny", "shakespeare-char", "g2p-transformer"} <= set(recipe_names())


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_loads_and_opens_with_a_one_line_purpose(name):
    load_config(name)
    first = shipped_recipe(name).read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# ") and first.endswith(".") and len(first) <= 100, first


def test_a_name_finds_the_recipe_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("tiny") == load_config("tiny.yaml") == load_config(RECIPE_DIR / "tiny.yaml")
    assert load_config("tiny").train.max_steps == 50


def test_a_file_of_that_name_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("train: {max_steps: 7}\n")
    assert load_config("tiny").train.max_steps == 7


@pytest.mark.parametrize("name", ["nope", "sub/tiny", ".tiny", "tiny.yml"])
def test_what_is_neither_a_file_nor_a_recipe_is_refused_naming_the_recipes(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"config file not found: {name}.*shipped recipe: g2p-gru, "):
        load_config(name)


def test_train_takes_a_recipe_by_name(tmp_path, monkeypatch, cli, sample_txt):
    monkeypatch.chdir(tmp_path)
    result = cli("train", "-c", "tiny", "--out", tmp_path / "run", f"data.source={sample_txt}",
                 "train.max_steps=2", "train.eval_interval=2", "train.eval_batches=1")
    assert result.exit_code == 0, result.output
    assert load_config(tmp_path / "run" / "config.yaml").model.d_model == 64  # the recipe's
