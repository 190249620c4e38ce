"""Tests for llmcli/hf/mapping.py: our state dict <-> transformers' tensor names, in memory."""

from __future__ import annotations

import pytest

from llmcli.hf.mapping import state_dict_from_hf, state_dict_to_hf


@pytest.mark.parametrize("preset,extra", [
    pytest.param("gpt2", {"d_ff": 80, "dropout": 0.1, "norm_eps": 1e-6}, id="gpt2"),
    pytest.param("gpt2", {"tie_embeddings": False}, id="gpt2-untied"),
    pytest.param("llama", {"n_kv_head": 2, "d_ff": 96, "rope_theta": 500.0}, id="llama-gqa"),
    pytest.param("llama", {"tie_embeddings": True, "block_size": 100}, id="llama-tied"),
])
def test_tensor_mapping_round_trips_both_ways(make_model, state_equal, preset, extra):
    model = make_model(preset, **extra)
    hf_state = state_dict_to_hf(model.state_dict(), model.config)
    state_equal(state_dict_from_hf(hf_state, model.config), model.state_dict())
