"""Tests for llmcli/model.py: shapes, causality, KV cache, checkpoints, counts, HF parity."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from llmcli import model as model_mod
from llmcli import quantize
from llmcli.config import PRESETS, ModelConfig
from llmcli.errors import UserError
from llmcli.hf import state_dict_from_hf
from llmcli.model import (
    KVCache,
    PackedLinear,
    Transformer,
    load_model,
    model_config_from_json,
    pack_for_cpu_decoding,
    save_model,
)

VOCAB = 67


def make_config(preset: str = "gpt2", **overrides) -> ModelConfig:
    fields = dict(PRESETS[preset], preset=preset, n_layer=2, n_head=4, d_model=32, vocab_size=VOCAB,
                  block_size=96)
    fields.update(overrides)
    return ModelConfig(**fields)


def make_model(preset: str = "gpt2", seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(make_config(preset, **overrides)).eval()


PRESET_VARIANTS = [
    pytest.param("gpt2", {}, id="gpt2"),
    pytest.param("llama", {}, id="llama"),
    pytest.param("llama", {"n_kv_head": 2}, id="llama-gqa"),
]


# --- shapes and causality --------------------------------------------------------------------


@pytest.mark.parametrize("preset,extra", PRESET_VARIANTS)
def test_logits_shape_and_dtype(preset, extra):
    model = make_model(preset, **extra)
    idx = torch.randint(0, VOCAB, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, VOCAB)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_gqa_has_fewer_kv_parameters():
    full, grouped = make_model("llama"), make_model("llama", n_kv_head=1)
    assert grouped.blocks[0].attn.k_proj.weight.shape == (8, 32)
    assert grouped.num_params() < full.num_params()


@pytest.mark.parametrize("preset,extra", PRESET_VARIANTS)
def test_future_tokens_do_not_change_earlier_logits(preset, extra):
    model = make_model(preset, **extra)
    idx = torch.randint(0, VOCAB, (2, 24))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_dropout_only_in_training():
    model = make_model("gpt2", dropout=0.2)
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), model(idx), rtol=0, atol=0)
        model.train()
        assert not torch.allclose(model(idx), model(idx))


def test_too_long_input_and_bad_config_raise():
    model = make_model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 97, dtype=torch.long))
    with pytest.raises(UserError, match="vocab_size"):
        Transformer(make_config(vocab_size=None))


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = Transformer(make_config("llama", n_kv_head=2)).train()
    idx = torch.randint(0, VOCAB, (4, 33))
    inputs, targets = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_param_groups_split_matrices_from_vectors():
    model = make_model("gpt2")
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


# --- KV cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,extra", PRESET_VARIANTS)
@torch.no_grad()
def test_cached_decoding_matches_full_recompute(preset, extra):
    model = make_model(preset, **extra)
    prompt_len, steps = 8, 64
    tokens = torch.randint(0, VOCAB, (1, prompt_len))
    cache = KVCache(model.config, max_slots=3, max_len=96)
    slots = torch.tensor([1])
    logits = model(tokens, cache=cache, slots=slots, positions=torch.arange(prompt_len)[None])
    torch.testing.assert_close(logits, model(tokens), rtol=0, atol=1e-5)
    for step in range(steps):
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        position = torch.tensor([[tokens.shape[1]]])
        tokens = torch.cat([tokens, next_token], dim=1)
        logits = model(next_token, cache=cache, slots=slots, positions=position)
        full = model(tokens)[:, -1:]
        torch.testing.assert_close(logits, full, rtol=0, atol=1e-5)
        assert logits[:, -1].argmax() == full[:, -1].argmax(), f"greedy token differs at step {step}"
    assert tokens.shape[1] == prompt_len + steps


@pytest.mark.parametrize("preset,extra", PRESET_VARIANTS)
@torch.no_grad()
def test_right_padded_batched_prefill_matches_each_row_alone(preset, extra):
    model = make_model(preset, **extra)
    lengths = [5, 11, 8]
    rows = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    width = max(lengths)
    padded = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    cache = KVCache(model.config, max_slots=4)
    # A stale sequence in slot 2 must not leak into the new one placed there.
    model(torch.randint(0, VOCAB, (1, 30)), cache=cache, slots=torch.tensor([2]),
          positions=torch.arange(30)[None])
    slots = torch.tensor([2, 0, 3])
    positions = torch.arange(width).expand(len(rows), width)
    batched = model(padded, cache=cache, slots=slots, positions=positions)
    for i, row in enumerate(rows):
        alone = model(row[None])
        torch.testing.assert_close(batched[i, : len(row)], alone[0], rtol=0, atol=1e-5)
    # Then one decode step for all rows at once, each at its own position.
    next_tokens = torch.randint(0, VOCAB, (len(rows), 1))
    step = model(next_tokens, cache=cache, slots=slots, positions=torch.tensor(lengths)[:, None])
    for i, row in enumerate(rows):
        alone = model(torch.cat([row, next_tokens[i]])[None])[:, -1]
        torch.testing.assert_close(step[i], alone, rtol=0, atol=1e-5)


@torch.no_grad()
def test_cache_rejects_out_of_range_positions_and_slots():
    model = make_model("llama")
    cache = KVCache(model.config, max_slots=2, max_len=16)
    one = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="max_len=16"):
        model(one, cache=cache, slots=torch.tensor([0]), positions=torch.tensor([[16]]))
    with pytest.raises(ValueError, match="slots"):
        model(one, cache=cache, slots=torch.tensor([2]), positions=torch.tensor([[0]]))
    with pytest.raises(ValueError, match="slots"):
        model(one, cache=cache)
    big = KVCache(model.config, max_slots=1, max_len=200)
    with pytest.raises(ValueError, match="block_size=96"):
        model(one, cache=big, slots=torch.tensor([0]), positions=torch.tensor([[96]]))


# --- checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_save_load_round_trip_is_bit_exact(tmp_path, preset):
    model = make_model(preset, seed=3)
    save_model(model, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["model.json", "model.safetensors"]
    loaded = load_model(tmp_path / "ckpt").eval()
    assert loaded.config == model.config
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert (loaded.lm_head.weight is loaded.tok_embed.weight) == model.config.tie_embeddings
    idx = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))
    half = load_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert half.tok_embed.weight.dtype == torch.bfloat16
    assert (half.lm_head.weight is half.tok_embed.weight) == model.config.tie_embeddings


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "nope")
    save_model(make_model(), tmp_path / "a")
    (tmp_path / "a" / "model.json").unlink()
    with pytest.raises(UserError, match="model.json"):
        load_model(tmp_path / "a")
    save_model(make_model(), tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors"):
        load_model(tmp_path / "b")
    save_model(make_model(), tmp_path / "c")
    config = json.loads((tmp_path / "c" / "model.json").read_text())
    (tmp_path / "c" / "model.json").write_text(json.dumps({**config, "d_model": 64}))
    with pytest.raises(UserError, match="model.safetensors.*shape"):
        load_model(tmp_path / "c")
    (tmp_path / "c" / "model.json").write_text(json.dumps({**config, "norm": "batchnorm"}))
    with pytest.raises(UserError, match="model.norm.*model.json"):
        model_config_from_json(tmp_path / "c" / "model.json")


# --- counting -----------------------------------------------------------------------------------


def test_num_params_counts_tied_embedding_once():
    tied = make_model("gpt2")
    untied = make_model("gpt2", tie_embeddings=False)
    unique = sum(p.numel() for p in {id(p): p for p in tied.parameters()}.values())
    assert tied.num_params() == unique
    assert untied.num_params() - tied.num_params() == VOCAB * 32
    embeddings = VOCAB * 32 + 96 * 32
    assert tied.num_params(non_embedding=True) == tied.num_params() - embeddings


def test_flops_per_token_formula():
    cfg = make_config("gpt2")
    model = Transformer(cfg)
    d, L, V = cfg.d_model, cfg.n_layer, cfg.vocab_size
    matmul = L * (4 * d * d + 2 * d * 4 * d) + V * d  # q,k,v,out + up,down; + lm head
    assert model.flops_per_token(seq_len=50) == 6 * matmul + 12 * L * d * 50
    assert model.flops_per_token() == 6 * matmul + 12 * L * d * cfg.block_size
    assert model.flops_per_token(100) > model.flops_per_token(50)


# --- Hugging Face parity ----------------------------------------------------------------------


def _randomize(module: torch.nn.Module) -> None:
    """HF inits norms to 1 and biases to 0; perturb everything so the mapping is really tested."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def test_matches_hf_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = make_config("gpt2", n_layer=3, d_model=48, n_head=4, block_size=64)
    hf_config = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.d_model, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.ff_dim, activation_function="gelu_new",
        layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    _randomize(hf)
    ours = Transformer(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg, "gpt2"))
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    print(f"gpt2 max |logit diff| = {diff:.3e}")
    assert diff <= 1e-4


def test_matches_hf_llama_with_gqa():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = make_config("llama", n_layer=3, d_model=64, n_head=4, n_kv_head=2, d_ff=96, block_size=64,
                      rope_theta=500.0, norm_eps=1e-6)
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ff_dim,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        rope_theta=cfg.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    _randomize(hf)
    ours = Transformer(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg, "llama"))
    idx = torch.randint(0, cfg.vocab_size, (2, 50))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    print(f"llama max |logit diff| = {diff:.3e}")
    assert diff <= 1e-4


def test_config_json_round_trip(tmp_path):
    cfg = make_config("llama", n_kv_head=2)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    assert model_config_from_json(path) == cfg


# --- CPU decoding with oneDNN-packed weights ----------------------------------------------------


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")


@needs_onednn
@pytest.mark.parametrize("preset,extra", PRESET_VARIANTS)
@torch.no_grad()
def test_packed_model_computes_and_saves_like_the_original(tmp_path, monkeypatch, preset, extra):
    monkeypatch.setattr(model_mod, "PACK_MIN_WEIGHTS", 0)  # the test model's weights are all small
    model = make_model(preset, **extra)
    tokens = torch.randint(0, VOCAB, (3, 20))
    reference, state = model(tokens), model.state_dict()
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())

    assert pack_for_cpu_decoding(model) == linears
    assert all(not isinstance(m, torch.nn.Linear) for m in model.modules())
    torch.testing.assert_close(model(tokens), reference, rtol=0, atol=1e-5)
    cache = KVCache(model.config, max_slots=2)
    positions = torch.arange(20).expand(2, 20)
    cached = model(tokens[:2], cache=cache, slots=torch.tensor([0, 1]), positions=positions)
    torch.testing.assert_close(cached, reference[:2], rtol=0, atol=1e-5)

    packed_state = model.state_dict()
    assert packed_state.keys() == state.keys()
    assert all(torch.equal(packed_state[k], state[k]) for k in state)
    save_model(model, tmp_path)
    torch.testing.assert_close(load_model(tmp_path)(tokens), reference, rtol=0, atol=0)


@needs_onednn
def test_only_large_float32_cpu_linears_are_packed(monkeypatch):
    model = make_model("llama")
    big = model.blocks[0].mlp.up_proj.weight.numel()
    monkeypatch.setattr(model_mod, "PACK_MIN_WEIGHTS", big)
    large = {name for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and m.weight.numel() >= big}
    assert len(large) == 3 * model.config.n_layer  # gate, up and down of each block; q/k/v/out are smaller
    assert pack_for_cpu_decoding(model) == len(large)
    assert {name for name, m in model.named_modules() if isinstance(m, PackedLinear)} == large

    monkeypatch.setattr(model_mod, "PACK_MIN_WEIGHTS", 0)
    assert pack_for_cpu_decoding(make_model("llama").to(torch.bfloat16)) == 0
    quantized = quantize.quantize_model(make_model("gpt2"), quantize.quantization_entry("int8"))
    layers = [name for name, m in quantized.named_modules() if isinstance(m, quantize.QuantizedWeight)]
    assert pack_for_cpu_decoding(quantized) == 1  # the float LM head; quantized layers keep their kernels
    assert isinstance(quantized.lm_head, PackedLinear)
    assert layers == [name for name, m in quantized.named_modules() if isinstance(m, quantize.QuantizedWeight)]
