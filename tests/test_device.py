"""Device and dtype choice, and CPU decoding with oneDNN-packed weights."""

from __future__ import annotations

import pytest
import torch

from llmcli import device as device_mod
from llmcli.checkpoint import load_model, save_model
from llmcli.device import PackedLinear, packed_for_decoding, select_device, select_dtype
from llmcli.errors import FieldError
from llmcli.models.base import Rows
from llmcli.quantize.modules import QuantizedWeight, quantization_entry, quantize_model

VOCAB = 67
PRESET_VARIANTS = [
    pytest.param("gpt2", {}, id="gpt2"),
    pytest.param("llama", {}, id="llama"),
    pytest.param("llama", {"n_kv_head": 2}, id="llama-gqa"),
]
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")


def test_device_and_dtype_names():
    assert select_device("cpu").type == "cpu"
    assert select_dtype("auto", torch.device("cpu")) == torch.float32
    assert select_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(FieldError, match="unknown device 'gpu0'"):
        select_device("gpu0")
    with pytest.raises(FieldError, match="unknown dtype 'int4'"):
        select_dtype("int4", torch.device("cpu"))


@needs_onednn
@pytest.mark.parametrize("preset,extra", PRESET_VARIANTS)
@torch.no_grad()
def test_packed_copy_computes_like_the_original_which_is_unchanged(tmp_path, monkeypatch, tiny_model, preset,
                                                                  extra):
    monkeypatch.setattr(device_mod, "PACK_MIN_WEIGHTS", 0)  # the test model's weights are all small
    model = tiny_model(VOCAB, preset=preset, **extra)
    tokens = torch.randint(0, VOCAB, (3, 20))
    reference, state, count = model(tokens), model.state_dict(), model.num_params()
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())

    packed = packed_for_decoding(model)
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == linears
    assert all(not isinstance(m, torch.nn.Linear) for m in packed.modules())
    torch.testing.assert_close(packed(tokens), reference, rtol=0, atol=1e-5)
    cache = model.new_decode_state(2)
    cached = packed(tokens[:2], state=cache, rows=Rows([0, 1], [0, 0], [20, 20]))
    torch.testing.assert_close(cached, reference[:2], rtol=0, atol=1e-5)

    # The model itself is untouched: its layers, parameter count, state and saved weights.
    assert sum(isinstance(m, torch.nn.Linear) for m in model.modules()) == linears
    assert model.num_params() == count
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    save_model(model, tmp_path)
    torch.testing.assert_close(load_model(tmp_path)(tokens), reference, rtol=0, atol=0)


@needs_onednn
def test_only_large_float32_cpu_linears_are_packed(monkeypatch, tiny_model):
    model = tiny_model(VOCAB, preset="llama")
    big = model.blocks[0].mlp.up_proj.weight.numel()
    monkeypatch.setattr(device_mod, "PACK_MIN_WEIGHTS", big)
    large = {name for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and m.weight.numel() >= big}
    assert len(large) == 3 * model.config.n_layer  # gate, up and down of each block; q/k/v/out are smaller
    packed = packed_for_decoding(model)
    assert {name for name, m in packed.named_modules() if isinstance(m, PackedLinear)} == large

    monkeypatch.setattr(device_mod, "PACK_MIN_WEIGHTS", 0)
    half = tiny_model(VOCAB, preset="llama").to(torch.bfloat16)
    assert packed_for_decoding(half) is half  # nothing to pack: the model itself
    quantized = quantize_model(tiny_model(VOCAB, preset="gpt2"), quantization_entry("int8"))
    layers = [name for name, m in quantized.named_modules() if isinstance(m, QuantizedWeight)]
    packed = packed_for_decoding(quantized)  # the float LM head; quantized layers keep their kernels
    assert [name for name, m in packed.named_modules() if isinstance(m, PackedLinear)] == ["lm_head"]
    assert layers == [name for name, m in packed.named_modules() if isinstance(m, QuantizedWeight)]


def test_threads_follow_the_option_then_the_environment(monkeypatch):
    from llmcli.device import configure_threads

    assert configure_threads(3) == 3 and torch.get_num_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert configure_threads(None) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(device_mod, "_busy_cores", lambda: 1)
    monkeypatch.setattr(device_mod, "_cores", lambda: 4)
    assert configure_threads(None) == 3
    monkeypatch.setattr(device_mod, "_busy_cores", lambda: 9)
    assert configure_threads(None) == 1
