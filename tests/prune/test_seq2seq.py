"""Structured pruning of the sequence-to-sequence families: the smaller model equals the original
with the removed heads and units cut out by hand (teacher forcing and cached decoding), and a
pruned seq2seq run loads, generates, quantizes, fine-tunes and refuses what it cannot do."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from llmcli.checkpoint import load_model, read_pruning, save_model
from llmcli.config_loader import build_config
from llmcli.errors import ConfigError
from llmcli.models.base import Rows
from llmcli.options.checkpoints import PruneOptions
from llmcli.prune.command import prune_checkpoint

SRC, TGT = 30, 40


def _pairs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, SRC, (3, 11), generator=g), torch.randint(1, TGT, (3, 9), generator=g)


def _decoded(model, source, target):
    """Encode once, then the target one token at a time through the decode state."""
    state = model.new_decode_state(3, 16)
    rows = Rows([0, 1, 2], [0, 0, 0], [source.shape[1]] * 3)
    model.encode(source, state=state, rows=rows)
    return torch.cat([model(target[:, t:t + 1], state=state, rows=Rows([0, 1, 2], [t] * 3, [1] * 3))
                      for t in range(target.shape[1])], dim=1)


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_a_pruned_encoder_decoder_equals_the_hand_pruned_reference(tiny_seq2seq, placement):
    model = tiny_seq2seq("encoder-decoder", TGT, SRC, std=0.3, seed=2, norm_placement=placement, d_ff=48)
    heads = [[0, 2], [1], [0, 1, 3], [3], [1, 2], [0, 1, 2, 3]]  # encoder self x2, decoder self x2, cross x2
    mlp = [[0, 5, 7, 40], list(range(0, 48, 3)), [1, 2], list(range(47))]
    pruned = model.pruned({"heads": heads, "mlp": mlp})
    c = pruned.config
    assert (c.encoder_layer_heads, c.layer_heads, c.cross_layer_heads) == ([2, 1], [3, 1], [2, 4])
    assert (c.encoder_layer_ff, c.layer_ff) == ([4, 16], [2, 47])
    ref = copy.deepcopy(model)
    attentions = [ref.encoder[0].self_attn, ref.encoder[1].self_attn, ref.decoder[0].self_attn,
                  ref.decoder[1].self_attn, ref.decoder[0].cross_attn, ref.decoder[1].cross_attn]
    with torch.no_grad():  # a removed head or unit adds nothing once what it writes to is zero
        for attention, kept in zip(attentions, heads, strict=True):
            for h in set(range(4)) - set(kept):
                attention.out_proj.weight[:, h * 8:(h + 1) * 8] = 0
        for layer, kept in zip([*ref.encoder, *ref.decoder], mlp, strict=True):
            layer.fc2.weight[:, sorted(set(range(48)) - set(kept))] = 0
        source, target = _pairs()
        expected = ref(target, source=source)
        got = pruned(target, source=source)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_decoded(pruned, source, target), got, atol=1e-4, rtol=1e-4)
    assert pruned.num_params() < model.num_params()


@pytest.mark.parametrize("arch,bidirectional", [("gru-seq2seq", True), ("lstm-seq2seq", True),
                                                ("gru-seq2seq", False)])
def test_a_pruned_recurrent_seq2seq_model_equals_the_hand_pruned_reference(tiny_seq2seq, arch, bidirectional):
    model = tiny_seq2seq(arch, TGT, SRC, std=0.3, seed=4, bidirectional=bidirectional)
    H, gates = model.config.hidden_size, {"gru-seq2seq": 3, "lstm-seq2seq": 4}[arch]
    keep = [[1, 2, 5, 8, 13, 21, 30, 31], [0, 4, 9, 10, 11, 12, 20, 25], list(range(8)), list(range(24, 32))]
    pruned = model.pruned({"hidden": keep})
    assert pruned.config.hidden_size == 8 and pruned.memory_size == 8 * (2 if bidirectional else 1)
    ref = copy.deepcopy(model)
    suffixes = ("", "_reverse") if bidirectional else ("",)
    layers = [(ref.encoder, 0, suffixes), (ref.encoder, 1, suffixes), (ref.decoder, 0, ("",)), (ref.decoder, 1, ("",))]
    with torch.no_grad():  # a unit with no weights, biases or initial state stays exactly 0
        for (rnn, layer, sides), kept in zip(layers, keep, strict=True):
            gone = sorted(set(range(H)) - set(kept))
            rows = [g * H + u for g in range(gates) for u in gone]
            for side in sides:
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(rnn, f"{name}_l{layer}{side}")[rows] = 0
            if rnn is ref.decoder:  # the bridge makes the decoder's initial state
                ref.bridge.weight[[layer * H + u for u in gone]] = 0
                ref.bridge.bias[[layer * H + u for u in gone]] = 0
        source, target = _pairs(1)
        got = pruned(target, source=source)
        torch.testing.assert_close(got, ref(target, source=source), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_decoded(pruned, source, target), got, atol=1e-4, rtol=1e-4)


def test_pruned_seq2seq_configs_round_trip_and_are_checked(tiny_seq2seq, tmp_path):
    model = tiny_seq2seq("encoder-decoder", TGT, SRC)
    pruned = model.pruned({"heads": [[0], [1, 2], [3], [0, 1], [2], [1]]})
    save_model(pruned, tmp_path / "p")
    assert load_model(tmp_path / "p").config == pruned.config
    with pytest.raises(ConfigError, match="model.cross_layer_heads: needs one size per layer: 1 given, n_layer=2"):
        build_config({"model": {"arch": "encoder-decoder", "n_layer": 2, "cross_layer_heads": [2]},
                      "data": {"task": "seq2seq"}})
    with pytest.raises(ConfigError, match="model.encoder_layer_ff: needs one size per layer: 2 given, encoder layers=3"):
        build_config({"model": {"arch": "encoder-decoder", "n_layer": 2, "n_encoder_layer": 3,
                                "encoder_layer_ff": [5, 5]}, "data": {"task": "seq2seq"}})


def _served(run):
    """One greedy completion from `llmcli serve`'s app over checkpoint `run`."""
    from fastapi.testclient import TestClient

    from llmcli.load import load_checkpoint
    from llmcli.options.inference import ServeOptions
    from llmcli.serve.app import create_app
    from llmcli.serve.server import build_state

    loaded = load_checkpoint(run)
    state = build_state(loaded.model, loaded.tokenizer, ServeOptions(run_dir=run), stop_token_ids=loaded.end_ids,
                        source_tokenizer=loaded.source_tokenizer)
    with TestClient(create_app(state)) as client:
        reply = client.post("/v1/completions", json={"model": run.name, "prompt": "abc", "max_tokens": 4,
                                                     "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()


def prune(run, out, **kwargs):
    kwargs = {"eval_tokens": 0, "decode_tokens": 0, **kwargs}
    return prune_checkpoint(PruneOptions(run_dir=run, out=out, calibration_batches=2, **kwargs))


@pytest.mark.slow
@pytest.mark.parametrize("arch,part", [("encoder-decoder", "heads"), ("gru-seq2seq", "hidden")])
def test_a_pruned_seq2seq_run_loads_generates_and_quantizes(seq2seq_runs, tmp_path, cli, arch, part):
    out = tmp_path / "p"
    report = prune(seq2seq_runs[arch], out, sparsity=0.25, eval_tokens=128, decode_tokens=6)
    assert report.columns[1].parameters < report.columns[0].parameters
    assert read_pruning(out)[part] == 0.25 and report.columns[1].perplexity > 1
    result = cli("eval", out, "--json")
    assert result.exit_code == 0, result.output
    result = cli("generate", out, "abc", "--max-new-tokens", "4", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["source"] == "abc", result.output
    assert _served(out)["usage"]["completion_tokens"] >= 1
    result = cli("quantize", out, "--method", "int8", "--out", tmp_path / "q", "--eval-tokens", "64",
                 "--decode-tokens", "4")
    assert result.exit_code == 0, result.output
    assert load_model(tmp_path / "q").config.hidden_size == load_model(out).config.hidden_size


@pytest.mark.slow
def test_a_pruned_encoder_decoder_fine_tunes_and_refuses_marian_export(seq2seq_runs, tmp_path, cli, one_line_error):
    out = tmp_path / "ft"
    report = prune(seq2seq_runs["encoder-decoder"], out, heads=0.25, mlp=0.5, finetune_steps=3, eval_tokens=128,
                   overrides=["train.eval_interval=3", "train.eval_batches=1"])
    assert [c.name for c in report.columns] == ["original", "structured pruned", "+ 3 steps"]
    assert (out / "state").is_dir() and load_model(out).config.layer_ff is not None
    assert cli("generate", out, "abc", "--max-new-tokens", "3").exit_code == 0
    one_line_error(cli("export", out, "--format", "hf", "--out", tmp_path / "hf"),
                   "cannot be exported as MarianMTModel", "model.layer_heads")
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_pruning_every_head_of_a_seq2seq_layer_is_refused(seq2seq_runs, tmp_path, cli, one_line_error):
    out = tmp_path / "out"
    one_line_error(cli("prune", seq2seq_runs["encoder-decoder"], "--out", out, "--heads", "0.9"),
                   "--heads 0.9 would remove every attention head of", "layer")
    one_line_error(cli("prune", seq2seq_runs["gru-seq2seq"], "--out", out, "--heads", "0.5"),
                   "--heads: this model has no attention heads to prune")
    assert not out.exists()
