"""`llmcli recipes`: the list (purpose, family, budget), show, copy (never over a file), and the
recipes of a wheel: `pip install .` into an empty environment, then list and train one."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from llmcli.recipes.shipped import RECIPE_DIR, recipe_names

REPO = Path(__file__).resolve().parents[2]


def test_the_list_names_each_recipe_with_its_family_budget_and_purpose(cli):
    result = cli("recipes")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for name in recipe_names():
        row = next(i for i, line in enumerate(lines) if line.startswith(name + " "))
        purpose = (RECIPE_DIR / f"{name}.yaml").read_text().splitlines()[0].removeprefix("# ")
        assert lines[row + 1].strip() == purpose
    assert any(line.split() == ["tiny", "transformer,", "char", "50", "steps"] for line in lines)
    assert any(line.split() == ["g2p-gru", "gru-seq2seq,", "char", "->", "word", "5", "min"] for line in lines)
    assert any(line.split()[:4] == ["shakespeare-char", "transformer", "(llama),", "char"] for line in lines)


def test_show_prints_the_file_as_it_is(cli):
    result = cli("recipes", "show", "g2p-gru")
    assert result.exit_code == 0 and result.stdout == (RECIPE_DIR / "g2p-gru.yaml").read_text()


def test_copy_writes_an_editable_copy_and_never_overwrites(cli, one_line_error, tmp_path):
    mine = tmp_path / "sub" / "mine.yaml"
    assert cli("recipes", "copy", "tiny", mine).exit_code == 0
    assert mine.read_text() == (RECIPE_DIR / "tiny.yaml").read_text()
    assert cli("recipes", "copy", "tiny", tmp_path).exit_code == 0  # a folder: FOLDER/NAME.yaml
    assert (tmp_path / "tiny.yaml").read_text() == mine.read_text()
    mine.write_text("# edited\n")
    one_line_error(cli("recipes", "copy", "tiny", mine), f"{mine} already exists", alone=True)
    one_line_error(cli("recipes", "copy", "tiny", tmp_path), "tiny.yaml already exists", alone=True)
    assert mine.read_text() == "# edited\n"


@pytest.mark.parametrize("args", [("show", "nope"), ("copy", "nope", "x.yaml")])
def test_an_unknown_name_is_one_line_naming_the_recipes(cli, one_line_error, tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    one_line_error(cli("recipes", *args), "no recipe named 'nope'; shipped: g2p-gru, ", alone=True)
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.slow
def test_a_wheel_carries_the_recipes(tmp_path):
    """`pip install .` (a copy of this checkout, no dependencies) into an empty environment that reuses
    the installed dependencies through a .pth line; then, outside the repository, `llmcli recipes`
    and `llmcli train -c tiny` work from the installed copy."""
    source = tmp_path / "src"
    for name in ("llmcli", "pyproject.toml", "README.md"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                            if (REPO / name).is_dir() else {}))
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env_dir], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": env_dir, "platbase": env_dir}))
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
                    "--no-build-isolation", source], check=True, cwd=tmp_path)
    shutil.rmtree(source)  # nothing may come from the source tree now
    where = subprocess.run([python, "-c", "import llmcli; print(llmcli.__file__)"], capture_output=True,
                           text=True, check=True, cwd=tmp_path).stdout
    assert Path(where).is_relative_to(site)
    llmcli = [str(env_dir / "bin" / "llmcli")]
    env = {**os.environ, "LLMCLI_CACHE_DIR": str(tmp_path / "cache")}
    listed = subprocess.run([*llmcli, "recipes"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert listed.returncode == 0 and "shakespeare-char" in listed.stdout, listed.stderr
    trained = subprocess.run([*llmcli, "train", "-c", "tiny", "--out", "R"], capture_output=True, text=True,
                             cwd=tmp_path, env=env)
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "R" / "best" / "model.safetensors").is_file()
