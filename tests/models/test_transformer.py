"""The transformer family: shapes, causality, the KV cache, counting, and HF parity of its maths."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmcli.errors import UserError
from llmcli.hf.mapping import state_dict_from_hf
from llmcli.models.base import Rows
from llmcli.models.transformer import Transformer

VOCAB = 67

PRESET_VARIANTS = [
    pytest.param("gpt2", {}, id="gpt2"),
    pytest.param("llama", {}, id="llama"),
    pytest.param("llama", {"n_kv_head": 2}, id="llama-gqa"),
]
# With the learning-efficiency options (qk_norm, relu2, logit_softcap, value embeddings): shapes,
# causality, caching and attention maps hold.
WITH_OPTIONS = [*PRESET_VARIANTS, pytest.param("llama", {"qk_norm": True, "act": "relu2", "logit_softcap": 5.0},
                                               id="options"),
                pytest.param("llama", {"n_kv_head": 2, "value_embeds": 1}, id="value-embeds")]


@pytest.fixture
def make_model(tiny_model):
    return lambda preset="gpt2", seed=0, **overrides: tiny_model(VOCAB, preset=preset, seed=seed, **overrides)


def prefill_rows(slots, lengths):
    return Rows(slots, [0] * len(slots), lengths)


# --- shapes and causality --------------------------------------------------------------------


@pytest.mark.parametrize("preset,extra", WITH_OPTIONS)
def test_logits_shape_and_dtype(make_model, preset, extra):
    model = make_model(preset, **extra)
    idx = torch.randint(0, VOCAB, (3, 17))
    logits = model(idx)
    assert logits.shape == (3, 17, VOCAB)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_qk_norm_relu2_and_softcap_do_what_they_say(make_model, monkeypatch):
    idx = torch.randint(0, VOCAB, (2, 10))
    plain = make_model("llama", std=0.5)
    capped = make_model("llama", std=0.5, logit_softcap=2.0)
    assert torch.allclose(capped(idx), 2.0 * torch.tanh(plain(idx) / 2.0), atol=1e-5)
    assert plain(idx).abs().max() > 2.0 and capped(idx).abs().max() < 2.0
    x = torch.randn(2, 5, 32)
    mlp = make_model("gpt2", act="relu2").blocks[0].mlp
    assert torch.allclose(mlp(x), mlp.down_proj(F.relu(mlp.up_proj(x)) ** 2))
    # qk_norm: attention sees queries and keys of unit RMS per head, whatever the projections' scale
    normed = make_model("llama", qk_norm=True)
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, *a, **kw: seen.append((q, k)) or real(q, k, *a, **kw))
    with torch.no_grad():
        for m in normed.modules():
            if isinstance(m, torch.nn.Linear) and m.out_features == 32:
                m.weight.mul_(7.0)
        normed(idx)
    assert len(seen) == 2
    for q, k in seen:
        for t in (q, k):  # rope rotates pairs of dims: the RMS over the head is kept
            assert torch.allclose(t.pow(2).mean(-1).sqrt(), torch.ones(t.shape[:-1]), atol=1e-4)


def test_value_embeds_feed_the_first_and_last_layers_values(make_model, monkeypatch):
    model = make_model("gpt2", n_layer=6, value_embeds=2)
    assert [model.config.value_embed_of(i) for i in range(6)] == [0, 1, None, None, 0, 1]
    assert [b.attn.value_gate is not None for b in model.blocks] == [True, True, False, False, True, True]
    idx = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():  # the table dominates: each gated layer's values are its table's rows
        for block in model.blocks:
            if block.attn.value_gate is not None:
                block.attn.value_gate.copy_(torch.tensor([0.0, 1.0]))
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, *a, **kw: seen.append(v) or real(q, k, v, *a, **kw))
    with torch.no_grad():
        model(idx)
    assert len(seen) == 6
    for layer in (0, 1, 4, 5):
        rows = model.value_embeds[model.config.value_embed_of(layer)].weight[idx]
        torch.testing.assert_close(seen[layer], rows.view(2, 10, 4, 8).transpose(1, 2), rtol=0, atol=0)
    assert not torch.allclose(seen[0], seen[2])  # the middle layers keep their projected values


def test_zero_value_embeds_is_the_plain_model_and_gates_one_zero_undo_them(make_model):
    plain, embedded = make_model("llama", n_layer=4), make_model("llama", n_layer=4, value_embeds=1, seed=1)
    assert plain.config.value_embeds == 0 and not any("value" in k for k in plain.state_dict())
    assert set(embedded.state_dict()) - set(plain.state_dict()) == {
        "value_embeds.0.weight", "blocks.0.attn.value_gate", "blocks.3.attn.value_gate"}
    assert embedded.value_embeds[0].weight.shape == (VOCAB, 32)
    embedded.load_state_dict(plain.state_dict(), strict=False)
    idx = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert not torch.allclose(embedded(idx), plain(idx))
        for i in (0, 3):
            embedded.blocks[i].attn.value_gate.copy_(torch.tensor([1.0, 0.0]))
        torch.testing.assert_close(embedded(idx), plain(idx), rtol=0, atol=0)


@pytest.mark.parametrize("extra", [{}, {"n_kv_head": 2}, {"n_kv_head": 2, "layer_heads": [2, 4, 2, 4]}])
def test_value_embeds_are_counted_as_embeddings(make_model, extra):
    model = make_model("llama", n_layer=4, value_embeds=2, **extra)
    assert model.num_params() == Transformer.param_count(model.config)
    tables = sum(t.weight.numel() for t in model.value_embeds)
    assert tables == VOCAB * (model.config.kv_heads_in(0) + model.config.kv_heads_in(1)) * 8
    plain = make_model("llama", n_layer=4, **extra)
    assert model.num_params(non_embedding=True) == plain.num_params(non_embedding=True) + 4 * 2
    assert Transformer.activation_bytes(model.config, 64) > Transformer.activation_bytes(plain.config, 64)


@pytest.mark.parametrize("value_embeds,extra,message", [
    (-1, {}, "model.value_embeds=-1: between 0 and n_layer / 2 = 2 tables"),
    (3, {}, "model.value_embeds=3: between 0 and n_layer / 2 = 2 tables"),
    (1, {"layer_heads": [2, 4, 4, 4]}, "layers 0 and 3 share value-embedding table 0, so they need the same heads"),
])
def test_bad_value_embeds_are_refused(make_model, value_embeds, extra, message):
    with pytest.raises(UserError, match=message):
        make_model("llama", n_layer=4, value_embeds=value_embeds, **extra)


def test_gqa_has_fewer_kv_parameters(make_model):
    full, grouped = make_model("llama"), make_model("llama", n_kv_head=1)
    assert grouped.blocks[0].attn.k_proj.weight.shape == (8, 32)
    assert grouped.num_params() < full.num_params()


@pytest.mark.parametrize("preset,extra", WITH_OPTIONS)
def test_future_tokens_do_not_change_earlier_logits(make_model, preset, extra):
    model = make_model(preset, **extra)
    idx = torch.randint(0, VOCAB, (2, 24))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_dropout_only_in_training(make_model):
    model = make_model("gpt2", dropout=0.2)
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), model(idx), rtol=0, atol=0)
        model.train()
        assert not torch.allclose(model(idx), model(idx))


def test_too_long_input_and_bad_config_raise(make_model):
    model = make_model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 97, dtype=torch.long))
    with pytest.raises(UserError, match="vocab_size"):
        Transformer(dataclasses.replace(model.config, vocab_size=None))


def test_overfits_one_batch(make_model):
    model = make_model("llama", n_kv_head=2).train()
    idx = torch.randint(0, VOCAB, (4, 33))
    inputs, targets = idx[:, :-1], idx[:, 1:]
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=1e-2)
    for _ in range(150):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_param_groups_split_matrices_from_vectors(make_model):
    model = make_model("gpt2")
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


# --- KV cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,extra", WITH_OPTIONS)
@torch.no_grad()
def test_cached_decoding_matches_full_recompute(make_model, preset, extra):
    model = make_model(preset, **extra)
    prompt_len, steps = 8, 64
    tokens = torch.randint(0, VOCAB, (1, prompt_len))
    cache = model.new_decode_state(3, 96)
    logits = model(tokens, state=cache, rows=prefill_rows([1], [prompt_len]))
    torch.testing.assert_close(logits, model(tokens), rtol=0, atol=1e-5)
    for step in range(steps):
        next_token = logits[:, -1].argmax(-1, keepdim=True)
        position = tokens.shape[1]
        tokens = torch.cat([tokens, next_token], dim=1)
        logits = model(next_token, state=cache, rows=Rows([1], [position], [1]))
        full = model(tokens)[:, -1:]
        torch.testing.assert_close(logits, full, rtol=0, atol=1e-5)
        assert logits[:, -1].argmax() == full[:, -1].argmax(), f"greedy token differs at step {step}"
    assert tokens.shape[1] == prompt_len + steps


@pytest.mark.parametrize("preset,extra", WITH_OPTIONS)
@torch.no_grad()
def test_right_padded_batched_prefill_matches_each_row_alone(make_model, preset, extra):
    model = make_model(preset, **extra)
    lengths = [5, 11, 8]
    rows = [torch.randint(0, VOCAB, (n,)) for n in lengths]
    width = max(lengths)
    padded = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    cache = model.new_decode_state(4)
    # A stale sequence in slot 2 must not leak into the new one placed there.
    model(torch.randint(0, VOCAB, (1, 30)), state=cache, rows=prefill_rows([2], [30]))
    slots = [2, 0, 3]
    batched = model(padded, state=cache, rows=prefill_rows(slots, lengths))
    for i, row in enumerate(rows):
        alone = model(row[None])
        torch.testing.assert_close(batched[i, : len(row)], alone[0], rtol=0, atol=1e-5)
    # Then one decode step for all rows at once, each at its own position.
    next_tokens = torch.randint(0, VOCAB, (len(rows), 1))
    step = model(next_tokens, state=cache, rows=Rows(slots, lengths, [1] * len(rows)))
    for i, row in enumerate(rows):
        alone = model(torch.cat([row, next_tokens[i]])[None])[:, -1]
        torch.testing.assert_close(step[i], alone, rtol=0, atol=1e-5)


@torch.no_grad()
def test_cache_rejects_out_of_range_positions_and_slots(make_model):
    model = make_model("llama")
    cache = model.new_decode_state(2, 16)
    one = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="max_len=16"):
        model(one, state=cache, rows=Rows([0], [16], [1]))
    with pytest.raises(ValueError, match="slots"):
        model(one, state=cache, rows=Rows([2], [0], [1]))
    with pytest.raises(ValueError, match="slots"):
        model(one, state=cache)
    big = model.new_decode_state(1, 200)
    with pytest.raises(ValueError, match="block_size=96"):
        model(one, state=big, rows=Rows([0], [96], [1]))


@torch.no_grad()
def test_the_cached_forward_never_reads_the_device(make_model, monkeypatch):
    """Decoding does no host sync: every index the cache needs comes from the host-side Rows."""
    model = make_model("llama", n_kv_head=2)
    cache = model.new_decode_state(3)
    model(torch.randint(0, VOCAB, (2, 6)), state=cache, rows=prefill_rows([0, 2], [6, 4]))
    synced = []
    for name in ("tolist", "item", "__bool__", "__int__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, _recording(original, name, synced))
    model(torch.randint(0, VOCAB, (2, 1)), state=cache, rows=Rows([0, 2], [6, 4], [1, 1]))
    monkeypatch.undo()
    assert synced == []


def _recording(method, name, calls):
    def wrapper(self, *args, **kwargs):
        calls.append(name)
        return method(self, *args, **kwargs)

    return wrapper


# --- counting -----------------------------------------------------------------------------------


def test_num_params_counts_tied_embedding_once(make_model):
    tied = make_model("gpt2")
    untied = make_model("gpt2", tie_embeddings=False)
    unique = sum(p.numel() for p in {id(p): p for p in tied.parameters()}.values())
    assert tied.num_params() == unique
    assert untied.num_params() - tied.num_params() == VOCAB * 32
    embeddings = VOCAB * 32 + 96 * 32
    assert tied.num_params(non_embedding=True) == tied.num_params() - embeddings


def test_flops_per_token_formula(make_model):
    model = make_model("gpt2")
    cfg = model.config
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


def test_matches_hf_gpt2(make_model):
    transformers = pytest.importorskip("transformers")
    cfg = make_model("gpt2", n_layer=3, d_model=48, n_head=4, block_size=64).config
    hf_config = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.d_model, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.ff_dim, activation_function="gelu_new",
        layer_norm_epsilon=cfg.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    _randomize(hf)
    ours = Transformer(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg, "gpt2"))
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    print(f"gpt2 max |logit diff| = {diff:.3e}")
    assert diff <= 1e-4


def test_matches_hf_llama_with_gqa(make_model):
    transformers = pytest.importorskip("transformers")
    cfg = make_model("llama", n_layer=3, d_model=64, n_head=4, n_kv_head=2, d_ff=96, block_size=64,
                     rope_theta=500.0, norm_eps=1e-6).config
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ff_dim,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
        attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
        rope_theta=cfg.rope_theta, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    _randomize(hf)
    ours = Transformer(cfg).eval()
    ours.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg, "llama"))
    idx = torch.randint(0, cfg.vocab_size, (2, 50))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max().item()
    print(f"llama max |logit diff| = {diff:.3e}")
    assert diff <= 1e-4


# --- attention weights (llmcli attention) -------------------------------------------------------


def hand_attention(model: Transformer, layer: int, x: np.ndarray) -> np.ndarray:
    """Layer `layer`'s attention weights [H, T, T] from its input `x` [T, d_model], in float64
    numpy from the weights alone: norm, projections, rotary positions, scores, causal softmax."""
    cfg, attn = model.config, model.blocks[layer].attn
    block = model.blocks[layer]
    w = {name: p.detach().double().numpy() for name, p in block.named_parameters()}
    if cfg.norm == "layernorm":
        h = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + cfg.norm_eps)
        h = h * w["attn_norm.weight"] + w["attn_norm.bias"]
    else:
        h = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * w["attn_norm.weight"]

    def project(name: str, heads: int) -> np.ndarray:
        y = h @ w[f"attn.{name}.weight"].T + w.get(f"attn.{name}.bias", 0.0)
        return y.reshape(len(x), heads, cfg.head_dim).transpose(1, 0, 2)  # [heads, T, D]

    q, k = project("q_proj", attn.n_head), project("k_proj", attn.n_kv_head)
    if cfg.pos == "rope":
        half = cfg.head_dim // 2
        freq = cfg.rope_theta ** (-np.arange(half) * 2 / cfg.head_dim)
        angle = np.arange(len(x))[:, None] * np.concatenate([freq, freq])[None]

        def rotate(t: np.ndarray) -> np.ndarray:
            return t * np.cos(angle) + np.concatenate([-t[..., half:], t[..., :half]], -1) * np.sin(angle)

        q, k = rotate(q), rotate(k)
    k = np.repeat(k, attn.n_head // attn.n_kv_head, axis=0)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(cfg.head_dim)
    scores = np.where(np.tril(np.ones((len(x), len(x)), dtype=bool)), scores, -np.inf)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("preset,extra", PRESET_VARIANTS)
def test_attention_maps_are_what_the_forward_computes(make_model, preset, extra):
    model = make_model(preset, std=0.3, **extra)
    idx = torch.randint(0, VOCAB, (1, 11))
    inputs = []  # each block's input (the residual stream), captured from the model's own forward
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: inputs.append(args[0][0].detach().double().numpy()))
    (maps,) = model.attention_maps(idx)
    assert maps.name == "self-attention" and maps.queries == maps.keys == ("text",)
    assert maps.weights.shape == (2, 4, 11, 11) and maps.weights.dtype == torch.float32
    torch.testing.assert_close(maps.weights.sum(-1), torch.ones(2, 4, 11), rtol=0, atol=1e-5)
    assert (maps.weights.triu(1) == 0).all()  # nothing attends to a later token
    for layer in range(2):
        expected = hand_attention(model, layer, inputs[layer])
        np.testing.assert_allclose(maps.weights[layer].double().numpy(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset,extra", PRESET_VARIANTS)
def test_the_explicit_attention_path_gives_the_sdpa_logits(make_model, preset, extra):
    model = make_model(preset, std=0.3, **extra)
    idx = torch.randint(0, VOCAB, (2, 13))
    record: list[torch.Tensor] = []
    with torch.no_grad():
        explicit, fused = model.lm_head(model._forward(idx, None, None, record)).float(), model(idx)
    assert len(record) == 2 and record[0].shape == (2, 4, 13, 13)
    torch.testing.assert_close(explicit, fused, rtol=0, atol=1e-5)


def test_attention_maps_cover_generated_tokens(make_model):
    model = make_model("llama")
    idx, generated = torch.randint(0, VOCAB, (1, 5)), torch.randint(0, VOCAB, (1, 3))
    (both,) = model.attention_maps(idx, generated)
    (alone,) = model.attention_maps(torch.cat([idx, generated], 1))
    assert both.queries == both.keys == ("text", "generated") and both.weights.shape == (2, 4, 8, 8)
    torch.testing.assert_close(both.weights, alone.weights, rtol=0, atol=0)
