"""Quantized layers at run time: batch independence, closeness to float, the accelerator path,
dequantizing back, and reading the format off a model's modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from llmcli.quantize import modules as Q
from llmcli.quantize.kernels import fbgemm_available

FBGEMM = fbgemm_available()


@pytest.fixture
def make_model(tiny_model):
    return lambda preset="gpt2", seed=0: tiny_model(50, preset=preset, seed=seed, n_head=2, d_model=64, block_size=32)


@pytest.mark.skipif(not FBGEMM, reason="no fbgemm quantized engine in this torch build")
def test_dynamic_int8_rows_are_batch_independent_and_match_fbgemm(monkeypatch):
    """fbgemm (one call per row) and the float32 emulation of it (many rows) agree, so a token's
    output does not depend on the batch it is in."""
    torch.manual_seed(2)
    linear = nn.Linear(96, 80)
    layer = Q.QuantizedLinear.from_linear(linear, "int8", None, dynamic_activations=True)
    assert layer.dynamic_activations
    x = torch.randn(50, 96) * torch.logspace(-2, 1, 50)[:, None]
    x[7] = 0.0
    with torch.no_grad():
        alone = torch.cat([layer(row[None]) for row in x])  # fbgemm, one token per call
        few = layer(x[:Q.ROW_LOOP_MAX_TOKENS])  # fbgemm row by row
        many = layer(x)  # more than ROW_LOOP_MAX_TOKENS rows: float32 emulation
        reference = linear(x)
    assert torch.equal(few, alone[:Q.ROW_LOOP_MAX_TOKENS])
    scale = reference.abs().amax(dim=1, keepdim=True)
    assert float(((many - alone).abs() / scale).max()) <= 1e-4
    # Activation (7-bit per token) + weight (8-bit per channel) rounding: about 1% of the output.
    assert float(((alone - reference).abs() / scale).max()) <= 0.05
    torch.testing.assert_close(alone[7], linear.bias.detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
@pytest.mark.parametrize("method,group,tolerance", [("int8", None, 0.02), ("int4", 32, 0.15)])
def test_quantized_model_logits_stay_close(make_model, preset, method, group, tolerance, monkeypatch):
    monkeypatch.setattr(Q, "FBGEMM_MIN_MODEL_WEIGHTS", 0)  # the dynamic-activation path where available
    model = make_model(preset)
    idx = torch.randint(0, 50, (3, 20))
    with torch.no_grad():
        reference = model(idx)
        Q.quantize_model(model, Q.quantization_entry(method, group))
        logits = model(idx)
    assert sum(isinstance(m, Q.QuantizedLinear) for m in model.modules()) == (2 * 7 + 1 if preset == "llama" else 2 * 6)
    error = (logits - reference).abs().max() / reference.abs().max()
    assert float(error) <= tolerance, float(error)


@pytest.mark.parametrize("method,group", [("int8", None), ("int4", 32)])
def test_accelerator_path_computes_the_dequantized_matmul(method, group):
    """The CUDA path cannot run here (no GPU); its arithmetic, forced on the CPU, must match."""
    torch.manual_seed(4)
    layer = Q.QuantizedLinear.from_linear(nn.Linear(64, 48), method, group)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, layer.dequantize(), layer.bias)
        torch.testing.assert_close(layer._matmul_accelerator(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_compiled_int8_layer_is_one_graph_computing_the_dequantized_matmul():
    """What a compiled decode step runs: the int8 weight read inside the graph, no break out of it."""
    torch.manual_seed(5)
    layer = Q.QuantizedLinear.from_linear(nn.Linear(64, 48), "int8", None)
    x = torch.randn(3, 1, 64)
    with torch.inference_mode():
        explained = torch._dynamo.explain(layer)(x)
        compiled = torch.compile(layer, dynamic=False)(x)
        expected = torch.nn.functional.linear(x, layer.dequantize(), layer.bias)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    torch.testing.assert_close(compiled, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method,group,compiled", [("int8", None, True), ("int4", 32, False)])
def test_a_decode_step_compiles_int8_models_and_leaves_int4_ones_eager(make_model, method, group, compiled):
    from llmcli.generate.compiled import compiles

    model = make_model("llama")
    assert compiles(model)
    Q.quantize_model(model, Q.quantization_entry(method, group))
    assert compiles(model) is compiled


def test_dequantized_model_computes_what_the_weight_only_path_computes(make_model):
    model = make_model("llama")
    Q.quantize_model(model, Q.quantization_entry("int4", 32, include_embeddings=True))
    plain = Q.dequantize_model(model)
    assert not any(isinstance(m, Q.QuantizedWeight) for m in plain.modules())
    idx = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(plain(idx), model(idx), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method,group,embed", [("int8", None, False), ("int4", 64, True)])
def test_the_format_is_read_back_off_the_modules(make_model, method, group, embed):
    model = make_model("gpt2")
    assert Q.quantization_of(model) is None
    entry = Q.quantization_entry(method, group, include_embeddings=embed)
    Q.quantize_model(model, entry)
    assert Q.quantization_of(model) == entry
    assert isinstance(model.lm_head, Q.TiedQuantizedHead) == embed
