"""`llmcli attention`: the weights a real forward pass computes, as pictures, a terminal view and
JSON; layer/head selection, aggregation, generated tokens, and one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmcli.load import load_checkpoint
from tests.conftest import RECURRENT_ARCHES

TEXT = "the quick brown"


@pytest.fixture
def run(trained_runs):
    return trained_runs["llama"]


def model_maps(run, text=TEXT):
    loaded = load_checkpoint(run)
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    (maps,) = model.attention_maps(torch.tensor([ids]))
    return maps.weights.numpy()


def dump(cli, run, *args):
    result = cli("attention", run, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_json_holds_the_models_own_weights(cli, run):
    body = dump(cli, run, TEXT)
    expected = model_maps(run)  # [layers, heads, T, T]
    assert body["tokens"] == {"text": list(TEXT), "generated": []}
    assert [(m["layer"], m["head"]) for m in body["maps"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for m in body["maps"]:
        weights = np.array(m["weights"])
        assert m["queries"] == m["keys"] == list(TEXT)
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(weights, expected[m["layer"], m["head"]], atol=1e-6)
        assert np.all(np.triu(weights, 1) == 0)


def test_layer_head_and_aggregate_select_what_is_shown(cli, run):
    expected = model_maps(run)
    (one,) = dump(cli, run, TEXT, "--layer", "1", "--head", "0")["maps"]
    np.testing.assert_allclose(one["weights"], expected[1, 0], atol=1e-6)
    heads = dump(cli, run, TEXT, "--head", "1")["maps"]
    assert [(m["layer"], m["head"]) for m in heads] == [(0, 1), (1, 1)]
    for how, combine in (("mean", np.mean), ("max", np.max)):
        maps = dump(cli, run, TEXT, "--aggregate", how)["maps"]
        assert [(m["layer"], m["head"]) for m in maps] == [(0, how), (1, how)]
        for m in maps:
            np.testing.assert_allclose(m["weights"], combine(expected[m["layer"]], axis=0), atol=1e-6)


def test_generate_covers_the_generated_tokens(cli, run):
    body = dump(cli, run, "LINE 3", "--generate", "8")
    generated = body["tokens"]["generated"]
    greedy = cli("generate", run, "LINE 3", "-n", "8", "--temperature", "0", "--json", "--ignore-eot")
    assert "".join(generated) == json.loads(greedy.stdout.splitlines()[0])["completion"]
    tokens = list("LINE 3") + generated
    assert len(generated) == 8
    for m in body["maps"]:
        assert m["queries"] == m["keys"] == tokens
        np.testing.assert_allclose(np.array(m["weights"]).sum(-1), 1.0, atol=1e-5)
    expected = model_maps(run, "LINE 3" + "".join(generated))
    np.testing.assert_allclose(body["maps"][3]["weights"], expected[1, 1], atol=1e-6)


def test_pictures_are_written_and_read_back(cli, run, tmp_path, read_png):
    grid, one = tmp_path / "grid.png", tmp_path / "figs" / "one.png"
    assert cli("attention", run, TEXT, "--out", grid).exit_code == 0
    result = cli("attention", run, "LINE 1", "--generate", "6", "--layer", "0", "--aggregate", "max", "--out", one)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stderr and "6 generated" in result.stderr
    big, small = read_png(grid, (400, 400)), read_png(one, (200, 200))
    assert big.shape[0] > small.shape[0]  # two rows of panels against one
    assert (tmp_path / "svg.svg").exists() is False
    assert cli("attention", run, "x", "--out", tmp_path / "svg.svg").exit_code == 0
    assert (tmp_path / "svg.svg").read_text().lstrip().startswith("<?xml")


def test_the_terminal_view_shades_each_cell(cli, run):
    result = cli("attention", run, "fox", "--layer", "1")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "self-attention, layer 1, head 0" in out and "self-attention, layer 1, head 1" in out
    assert "shades:" in out and "layer 0" not in out
    assert "██" in out or "▓▓" in out  # the first token attends only to itself: weight 1
    assert out.count(" f ") >= 2  # its token labels the rows of both panels


def test_bad_inputs_are_one_line_errors_and_write_nothing(cli, run, tmp_path, one_line_error, monkeypatch):
    out = tmp_path / "a.png"
    cases = [
        (("",), "TEXT is empty"),
        ((TEXT, "--layer", "2"), "--layer 2 is out of range: the model's self-attention has 2 layers (0..1)"),
        ((TEXT, "--head", "5"), "--head 5 is out of range"),
        ((TEXT, "--layer", "-1"), "--layer must be >= 0"),
        ((TEXT, "--aggregate", "median"), "--aggregate must be mean or max"),
        ((TEXT, "--aggregate", "mean", "--head", "0"), "give --aggregate or --head, not both"),
        (("x" * 40,), "more than the model's context of 32"),
        ((TEXT, "--generate", "30"), "+ 30 to generate"),
        (("é",), "never saw"),
    ]
    for args, message in cases:
        one_line_error(cli("attention", run, *args, "--out", out), message)
        assert not out.exists(), args
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    one_line_error(cli("attention", run, TEXT, "--out", blocker / "a.png"), "is not a directory")
    one_line_error(cli("attention", run, TEXT, "--out", tmp_path), "is a directory")
    one_line_error(cli("attention", run, TEXT, "--out", tmp_path / "a.jpg"), "must end in .png, .svg or .pdf")
    one_line_error(cli("attention", tmp_path / "nothing", TEXT), "checkpoint not found")
    monkeypatch.setattr("llmcli.insight.attention.TERMINAL_MAX_TOKENS", 8)
    assert cli("attention", run, "LINE 123").exit_code == 0
    one_line_error(cli("attention", run, "LINE 1234"), "9 tokens are too many for the terminal view (at most 8)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_an_unwritable_out_is_refused_before_any_work(cli, run, one_line_error, monkeypatch):
    import llmcli.checkpoint

    monkeypatch.setattr(llmcli.checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    one_line_error(cli("attention", run, TEXT, "--out", "/sys/llmcli-attention.png"), "cannot write in /sys")


@pytest.mark.parametrize("arch", RECURRENT_ARCHES)
def test_a_recurrent_language_model_is_refused_in_one_line(cli, trained_runs, arch, tmp_path, one_line_error):
    """A plain LSTM/GRU/RNN LM has no attention: the family interface's default refusal."""
    out = tmp_path / "a.png"
    for extra in (("--out", out), ("--json",), ()):
        result = cli("attention", trained_runs[arch], TEXT, *extra)
        one_line_error(result, f"model.arch='{arch}' has no attention weights to show")
        assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []
