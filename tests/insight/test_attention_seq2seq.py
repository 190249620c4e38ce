"""`llmcli attention` on sequence-to-sequence runs: TEXT is the source, the target the model's own
greedy output; cross-attention has the target tokens down and the source tokens across, and a
trained G2P model's cross-attention follows the letters in order."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmcli.load import load_checkpoint

EOT = "<|endoftext|>"


def dump(cli, run, *args) -> dict:
    result = cli("attention", run, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def model_maps(run, source: str, decoder_input: list[str]) -> dict:
    """The model's own maps for `source` and the decoder's inputs, by name."""
    loaded = load_checkpoint(run)
    model, tokenizer = loaded.model, loaded.tokenizer
    source_ids = [*loaded.source_tokenizer.encode(source).ids, 0]
    inputs = [tokenizer.token_to_id(t) for t in decoder_input]
    return {m.name: m.weights.numpy() for m in model.attention_maps(torch.tensor([source_ids]), torch.tensor([inputs]))}


@pytest.mark.parametrize("arch", ["encoder-decoder", "gru-seq2seq"])
def test_the_target_is_the_greedy_output_and_the_maps_are_the_models(cli, seq2seq_runs, arch):
    run = seq2seq_runs[arch]
    body = dump(cli, run, "abcd")
    tokens = body["tokens"]
    greedy = json.loads(cli("generate", run, "abcd", "--temperature", "0", "--json").stdout.splitlines()[0])
    generated = tokens["generated"]
    assert tokens["text"] == [*"abcd", EOT]
    assert " ".join(t for t in generated if t != EOT) == greedy["target"]
    assert generated[-1] == EOT or len(generated) == 12  # to the end token, or the target's limit
    assert tokens["decoder input"] == [EOT, *generated[:-1]]
    expected = model_maps(run, "abcd", tokens["decoder input"])
    names = ["encoder self-attention"] * 8 + ["decoder self-attention"] * 8 if arch == "encoder-decoder" else []
    assert [m["name"] for m in body["maps"]] == names + ["cross-attention"] * (8 if names else 1)
    for m in body["maps"]:
        weights = np.array(m["weights"])
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(weights, expected[m["name"]][m["layer"], m["head"]], atol=1e-6)
        if m["name"] == "cross-attention":
            assert m["queries"] == generated and m["keys"] == tokens["text"]
        if m["name"] == "decoder self-attention":
            assert m["queries"] == generated and m["keys"] == tokens["decoder input"]


def test_generate_caps_the_target_and_pictures_and_terminal_views_are_drawn(cli, seq2seq_runs, tmp_path, read_png):
    run = seq2seq_runs["encoder-decoder"]
    body = dump(cli, run, "abcdef", "--generate", "2", "--layer", "1", "--head", "0")
    assert len(body["tokens"]["generated"]) <= 2
    assert [m["name"] for m in body["maps"]] == ["encoder self-attention", "decoder self-attention", "cross-attention"]
    out = tmp_path / "g2p.png"
    result = cli("attention", run, "abcdef", "--aggregate", "mean", "--out", out)
    assert result.exit_code == 0, result.output
    read_png(out, (200, 400))  # a row of panels per layer of each of the three kinds: taller than wide
    shown = cli("attention", seq2seq_runs["gru-seq2seq"], "abc")
    assert shown.exit_code == 0, shown.output
    assert "cross-attention, layer 0, head 0" in shown.stdout


def test_bad_sources_are_one_line_errors(cli, seq2seq_runs, tmp_path, one_line_error):
    run, out = seq2seq_runs["encoder-decoder"], tmp_path / "a.png"
    for args, message in ((("abcdabcdabcdabcd",), "the source has 17 tokens (with its end token)"),
                          (("xyz",), "never saw"), (("   ",), "the source is empty"),
                          (("abc", "--generate", "13"), "--generate 13 is more than the 12 target tokens")):
        one_line_error(cli("attention", run, *args, "--out", out), message)
    assert not out.exists()


def alignment(weights: np.ndarray) -> list[int]:
    """The source position each target step attends to most (the end token's step left out)."""
    return weights[:-1].argmax(-1).tolist()


@pytest.mark.slow
def test_a_trained_g2p_models_cross_attention_is_monotonic(cli, g2p_run):
    """Over a few words as long as its training words, the most attended letter (last decoder layer, mean of its heads) moves
    forward or stays at >= 80% of the target steps, and sweeps at least half of each word; an
    attention stuck on one letter (as an untrained model's is) fails the second check."""
    steps = forward = 0
    for word in ("speaker", "phone", "computer", "garden", "window", "remember", "letter", "basket"):
        body = dump(cli, g2p_run, word, "--aggregate", "mean", "--layer", "1")
        (cross,) = [m for m in body["maps"] if m["name"] == "cross-attention"]
        path = alignment(np.array(cross["weights"]))
        assert len(path) >= 2, (word, body["tokens"]["generated"])
        steps += len(path) - 1
        forward += int((np.diff(path) >= 0).sum())
        assert max(path) - min(path) >= len(word) / 2, (word, body["tokens"]["generated"], path)
    assert forward / steps >= 0.8, (forward, steps)
