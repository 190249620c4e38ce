"""Writes that lose nothing: outputs never overlap inputs (for every command that writes), and what a
killed writer leaves behind is cleaned up the next time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmcli.errors import UserError
from llmcli.io import atomic_replace_dir, atomic_write_text, refuse_overlap


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_refuse_overlap_compares_real_paths(tmp_path):
    source = tmp_path / "a" / "b"
    source.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(source)
    for out, word in ((source, "is"), (tmp_path / "a", "contains"), (source / "c", "lies inside"),
                      (link, "is"), (link / "x", "lies inside")):
        with pytest.raises(UserError, match=f"{word} the source"):
            refuse_overlap(out, {"the source": source})
    refuse_overlap(tmp_path / "other", {"the source": source})
    refuse_overlap(tmp_path / "a" / "bb", {"the source": source})  # a sibling that shares a prefix


def test_what_a_killed_writer_left_is_cleaned_up(tmp_path):
    target = tmp_path / "out"
    pid = dead_pid()
    stale_dir = tmp_path / f".out.{pid}-abcd.tmp"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_text("half")
    stale_file = tmp_path / f".out.{pid}-efgh.tmp"
    stale_file.write_text("half")
    mine = tmp_path / f".out.{os.getpid()}-live.tmp"  # a writer that is still alive
    mine.write_text("in progress")
    atomic_replace_dir(target, lambda tmp: (tmp / "f").write_text("new"))
    assert not stale_dir.exists() and not stale_file.exists() and mine.exists()
    assert (target / "f").read_text() == "new"


def test_a_swap_cut_between_its_renames_is_undone(tmp_path):
    target = tmp_path / "out"
    old = tmp_path / ".out.old"  # the old directory was moved aside, the new one never took its name
    old.mkdir()
    (old / "f").write_text("old")
    atomic_write_text(tmp_path / "out.txt", "x")  # an unrelated write does not touch it
    assert old.exists()
    atomic_replace_dir(target, lambda tmp: (tmp / "f").write_text("new"))
    assert (target / "f").read_text() == "new" and not old.exists()


@pytest.fixture
def run_copy(trained_runs, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_runs["gpt2"], run)
    return run


@pytest.mark.parametrize("command", [
    lambda run, tmp: ["quantize", run, "--method", "int8", "--out", run / "best", "--overwrite"],
    lambda run, tmp: ["quantize", run / "best", "--method", "int8", "--out", run, "--overwrite"],
    lambda run, tmp: ["export", run, "--out", run / "hf", "--overwrite"],
    lambda run, tmp: ["export", run / "last", "--out", run, "--overwrite"],
    lambda run, tmp: ["train", "--init-from", run, "--out", run, "--overwrite", "train.max_steps=1"],
    lambda run, tmp: ["train", "--init-from", run, "--out", run / "ft", "train.max_steps=1"],
    lambda run, tmp: ["tokenizer", "train", "--out", run / "tokenizer.json", "--overwrite",
                      f"data.source={run / 'tokenizer.json'}"],
], ids=["quantize-into-run", "quantize-over-run", "export-into-run", "export-over-run", "train-over-init",
        "train-into-init", "tokenizer-over-data"])
def test_every_writing_command_refuses_to_overlap_its_inputs(run_copy, tmp_path, cli, one_line_error, command):
    before = tree(run_copy)
    one_line_error(cli(*command(run_copy, tmp_path)), "may not overlap an input")
    assert tree(run_copy) == before


def test_import_refuses_to_write_over_its_source(run_copy, tmp_path, cli, one_line_error):
    exported = tmp_path / "hf" / "model"
    assert cli("export", run_copy, "--out", exported).exit_code == 0
    before = tree(tmp_path / "hf")
    for out in (exported, exported.parent, exported / "sub"):
        one_line_error(cli("import", exported, "--out", out, "--overwrite"), "may not overlap an input")
    tokenizer = tmp_path / "tok" / "tokenizer.json"
    tokenizer.parent.mkdir()
    tokenizer.write_bytes((exported / "tokenizer.json").read_bytes())
    one_line_error(cli("import", exported, "--out", tokenizer.parent, "--overwrite", "--tokenizer", tokenizer),
                   "the tokenizer file")
    assert tree(tmp_path / "hf") == before and tokenizer.exists()
