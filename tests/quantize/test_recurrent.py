"""Quantized recurrent layers: the checkpoint `llmcli quantize` writes for lstm/gru/rnn (bit-exact
round trip, stored names and dtypes), which runtime each gets, rows of a batch equal to each row
alone, dequantizing, and the CLI table."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llmcli.checkpoint import load_model
from llmcli.generate.engine import Engine
from llmcli.models.base import Rows
from llmcli.options.checkpoints import QuantizeOptions
from llmcli.options.sampling import SamplingParams
from llmcli.quantize import modules as Q
from llmcli.quantize.command import quantize_checkpoint
from llmcli.quantize.kernels import fbgemm_available
from llmcli.quantize.recurrent import QuantizedRecurrent

ARCHES = ["lstm", "gru", "rnn"]


def quantize(run, out, method, group=None, embed=False):
    return quantize_checkpoint(QuantizeOptions(run_dir=run, out=out, method=method, group_size=group,
                                               include_embeddings=embed, eval_tokens=0, decode_tokens=0))


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("method,group,embed", [("int8", None, False), ("int4", 32, True)])
def test_round_trip_is_bit_exact(trained_runs, tmp_path, arch, method, group, embed):
    src, out = trained_runs[arch], tmp_path / "q"
    report = quantize(src, out, method, group, embed)
    assert report.layers == 2 + (1 if embed else 0)  # the recurrent stack's layers (+ the table; the head is tied)
    entry = json.loads((out / "model.json").read_text())["quantization"]
    expected = Q.quantize_model(load_model(src).eval(), entry)
    stored = load_file(str(out / "model.safetensors"))
    want = {k: v for k, v in expected.state_dict().items() if k not in expected.tied_weights()}
    assert stored.keys() == want.keys()
    assert all(torch.equal(stored[k], v) and stored[k].dtype == v.dtype for k, v in want.items())
    assert stored["rnn.weight_hh_l1"].dtype == (torch.int8 if method == "int8" else torch.uint8)
    assert "rnn.weight_hh_l1_scale" in stored and stored["rnn.bias_ih_l0"].dtype == torch.float32

    loaded = load_model(out).eval()
    assert isinstance(loaded.rnn, QuantizedRecurrent) and Q.quantization_of(loaded) == entry
    idx = torch.randint(0, loaded.config.vocab_size, (2, 40))
    with torch.no_grad():
        logits = loaded(idx)
        assert torch.equal(logits, expected(idx))
        reference = load_model(src).eval()(idx)
        plain = Q.dequantize_model(loaded)(idx)
    assert float((logits - reference).abs().max()) < 0.05 * float(reference.abs().max())
    assert float((plain - reference).abs().max()) < 0.05 * float(reference.abs().max())


@pytest.mark.parametrize("arch", ARCHES)
def test_runtime_and_rows_alone(trained_runs, tmp_path, arch):
    """int8 LSTM/GRU layers run fbgemm's dynamic kernel (where torch has it), tanh RNNs the float
    one; either way a row of a padded batch gets exactly what it gets alone."""
    quantize(trained_runs[arch], tmp_path / "q", "int8")
    model = load_model(tmp_path / "q").eval()
    assert model.rnn.dynamic_activations == (arch != "rnn" and fbgemm_available())
    idx = torch.randint(0, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    lengths = [12, 5, 9]
    with torch.inference_mode():
        batch = model(idx, state=model.new_decode_state(3), rows=Rows([0, 1, 2], [0, 0, 0], lengths))
        for b, n in enumerate(lengths):
            alone = model(idx[b:b + 1, :n], state=model.new_decode_state(1), rows=Rows([0], [0], [n]))
            torch.testing.assert_close(batch[b, :n], alone[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHES)
def test_int8_greedy_decoding_follows_float32(trained_runs, tmp_path, arch):
    quantize(trained_runs[arch], tmp_path / "q", "int8")

    def greedy(model):
        engine = Engine(model, max_batch_size=2)
        engine.add([0, 5, 6], SamplingParams(max_new_tokens=16, temperature=0, ignore_eot=True))
        tokens = []
        while engine.has_work():
            tokens += [ev.token for ev in engine.step()]
        return tokens

    fp32, int8 = greedy(load_model(trained_runs[arch]).eval()), greedy(load_model(tmp_path / "q").eval())
    assert sum(a == b for a, b in zip(fp32, int8, strict=True)) >= 12


def test_cli_quantize_table_and_group_size_check(trained_runs, tmp_path, cli, one_line_error):
    result = cli("quantize", trained_runs["lstm"], "--method", "int8", "--out", tmp_path / "q",
                 "--eval-tokens", "500", "--decode-tokens", "8")
    assert result.exit_code == 0, result.output
    assert "quantize int8: 2 layers" in result.stdout and "val perplexity" in result.stdout
    one_line_error(cli("quantize", trained_runs["gru"], "--method", "int4", "-g", "64", "--out", tmp_path / "q4"),
                   "--group-size 64 does not divide rnn.weight_ih_l0's input size 32")
    assert not (tmp_path / "q4").exists()


def test_outputs_may_not_overlap_a_recurrent_input(trained_runs, tmp_path, cli, one_line_error):
    run = trained_runs["rnn"]
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for command in (["quantize", run, "--method", "int8", "--overwrite", "--out", run / "best"],
                    ["train", "--init-from", run, "--out", run / "ft", "--overwrite"]):
        one_line_error(cli(*command), "an output may not overlap an input")
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
