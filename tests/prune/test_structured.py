"""Structured pruning: each family's smaller model equals the original with the removed units cut
out by hand, pruned configs round-trip, and the importance ranks units by what they do."""

from __future__ import annotations

import copy

import pytest
import torch

from llmcli.checkpoint import load_model, save_model
from llmcli.config_loader import build_config
from llmcli.errors import ConfigError, UserError
from llmcli.models.base import Rows
from llmcli.prune import structured

VOCAB = 40


def hand_pruned_transformer(model, keep):
    """The original with the removed heads' and MLP units' contributions zeroed by hand."""
    ref = copy.deepcopy(model)
    c = model.config
    group = c.n_head // c.kv_heads * c.head_dim
    with torch.no_grad():
        for layer, block in enumerate(ref.blocks):
            for g in set(range(block.attn.n_kv_head)) - set(keep["heads"][layer]):
                block.attn.out_proj.weight[:, g * group:(g + 1) * group] = 0
            for u in set(range(block.mlp.down_proj.in_features)) - set(keep["mlp"][layer]):
                block.mlp.down_proj.weight[:, u] = 0
    return ref


@pytest.mark.parametrize("preset,extra", [("gpt2", {}), ("llama", {}), ("llama", {"n_kv_head": 2})])
def test_a_pruned_transformer_equals_the_hand_pruned_reference(tiny_model, preset, extra):
    model = tiny_model(VOCAB, preset=preset, std=0.3, seed=3, **extra)
    groups = model.config.kv_heads
    keep = {"heads": [[0, groups - 1], [1]], "mlp": [[0, 3, 17, 40, 100], list(range(0, model.config.ff_dim, 2))]}
    pruned = model.pruned(keep)
    ratio = model.config.n_head // groups
    assert pruned.config.layer_heads == [2 * ratio, ratio]
    assert pruned.config.layer_ff == [5, model.config.ff_dim // 2]
    assert pruned.num_params() == type(pruned).param_count(pruned.config) < model.num_params()
    idx = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        expected = hand_pruned_transformer(model, keep)(idx)
        got = pruned(idx)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        state = pruned.new_decode_state(2, 24)  # the KV cache has each layer's own kv heads
        stepped = pruned(idx[:, :20], state=state, rows=Rows([0, 1], [0, 0], [20, 20]))
        last = pruned(idx[:, 20:], state=state, rows=Rows([0, 1], [20, 20], [4, 4]))
    torch.testing.assert_close(torch.cat([stepped, last], 1), got, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset,extra", [("gpt2", {}), ("llama", {"n_kv_head": 2})])
def test_value_embedding_columns_go_with_their_heads(tiny_model, preset, extra):
    """Layers 0 and 3 share table 0, so they are one "heads" group: the kv groups kept there are
    kept in both, and the table keeps those groups' columns."""
    model = tiny_model(VOCAB, preset=preset, std=0.3, seed=3, n_layer=4, value_embeds=1, **extra)
    groups = [g for g in model.prune_groups() if g.part == "heads"]
    assert [g.where for g in groups] == ["layers 0 and 3", "layer 1", "layer 2"]
    kv = model.config.kv_heads
    keep = {"heads": [[kv - 1], [0], list(range(kv))], "mlp": [[0, 3, 17], [1], list(range(40)), [5, 6]]}
    pruned = model.pruned(keep)
    ratio, head_dim = model.config.n_head // kv, model.config.head_dim
    assert pruned.config.layer_heads == [ratio, ratio, kv * ratio, ratio]
    table = model.value_embeds[0].weight[:, (kv - 1) * head_dim:kv * head_dim]
    torch.testing.assert_close(pruned.value_embeds[0].weight, table, rtol=0, atol=0)
    assert pruned.num_params() == type(pruned).param_count(pruned.config) < model.num_params()
    per_layer = {"heads": [keep["heads"][0], keep["heads"][1], keep["heads"][2], keep["heads"][0]],
                 "mlp": keep["mlp"]}
    idx = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        expected = hand_pruned_transformer(model, per_layer)(idx)
        got = pruned(idx)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        state = pruned.new_decode_state(2, 24)
        stepped = pruned(idx[:, :20], state=state, rows=Rows([0, 1], [0, 0], [20, 20]))
        last = pruned(idx[:, 20:], state=state, rows=Rows([0, 1], [20, 20], [4, 4]))
    torch.testing.assert_close(torch.cat([stepped, last], 1), got, atol=1e-5, rtol=1e-5)


def test_pruning_a_model_with_value_embeds_scores_shared_heads_together(tiny_model, tmp_path):
    model = tiny_model(VOCAB, preset="llama", std=0.3, seed=2, n_layer=4, value_embeds=1)
    idx = torch.randint(0, VOCAB, (4, 16))
    batches = [({"idx": idx[:, :-1]}, idx[:, 1:])]
    scores = structured.importance(model, batches)
    assert sorted(scores) == [("heads", 0), ("heads", 1), ("heads", 2)] + [("mlp", i) for i in range(4)]
    assert (scores["heads", 0] > 0).all()
    pruned, _ = structured.prune(model, {"heads": 0.5}, batches)
    heads = pruned.config.layer_heads
    assert heads[0] == heads[3] and sum(heads) < 16
    save_model(pruned, tmp_path / "p")
    loaded = load_model(tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), pruned(idx), rtol=0, atol=0)
    with pytest.raises(UserError, match="would remove every attention head of layers 0 and 3"):
        structured.select(model.prune_groups(), scores, {"heads": 0.99})


@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_a_pruned_recurrent_model_equals_the_hand_pruned_reference(tiny_recurrent, arch):
    model = tiny_recurrent(arch, VOCAB, std=0.3, seed=5)
    keep = {"hidden": [[1, 2, 5, 8, 13, 21, 30, 31], [0, 4, 9, 10, 11, 12, 20, 25]]}
    pruned = model.pruned(keep)
    assert pruned.config.hidden_size == 8 and not pruned.config.tie_embeddings
    ref = copy.deepcopy(model)
    gates, H = {"lstm": 4, "gru": 3, "rnn": 1}[arch], model.config.hidden_size
    with torch.no_grad():  # a unit with no weights or biases in stays exactly 0 in every family
        for layer, kept in enumerate(keep["hidden"]):
            for u in set(range(H)) - set(kept):
                rows = [g * H + u for g in range(gates)]
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    getattr(ref.rnn, f"{name}_l{layer}")[rows] = 0
    idx = torch.randint(0, VOCAB, (3, 12))
    with torch.no_grad():
        torch.testing.assert_close(pruned(idx), ref(idx), atol=1e-5, rtol=1e-5)


def test_pruned_configs_round_trip_through_model_json(tiny_model, tmp_path):
    model = tiny_model(VOCAB, preset="llama", n_kv_head=2)
    pruned = model.pruned({"heads": [[1], [0, 1]], "mlp": [[0, 1], [2]]})
    save_model(pruned, tmp_path / "p")
    loaded = load_model(tmp_path / "p")
    assert loaded.config == pruned.config and loaded.config.layer_heads == [2, 4]
    assert "layer_heads" not in model.config.to_dict()  # an unpruned model.json stays as it was


@pytest.mark.parametrize("fields,message", [
    ({"layer_heads": [4]}, "model.layer_heads: needs one size per layer: 1 given, n_layer=2"),
    ({"layer_heads": [4, 3], "n_kv_head": 2}, "layer 1 has 3 heads: at most n_head=4, in whole groups of"),
    ({"layer_heads": [4, 8]}, "layer 1 has 8 heads"),
    ({"layer_ff": [0, 5]}, "model.layer_ff[0]: must be >= 1"),
    ({"layer_ff": "wide"}, "model.layer_ff: must be a list of integers"),
    ({"arch": "lstm", "layer_ff": [3, 3]}, "model.layer_ff: does not apply to model.arch=lstm"),
])
def test_bad_layer_sizes_are_refused(fields, message):
    with pytest.raises(ConfigError) as err:
        build_config({"model": {"n_layer": 2, **fields}})
    assert message in str(err.value)


def test_importance_ranks_a_silent_head_and_unit_lowest(tiny_model):
    model = tiny_model(VOCAB, std=0.3, seed=1)
    with torch.no_grad():
        model.blocks[1].attn.out_proj.weight[:, 8:16] = 0  # head 1 of layer 1 adds nothing
        model.blocks[0].mlp.down_proj.weight[:, 7] = 0
    idx = torch.randint(0, VOCAB, (4, 16))
    batches = [({"idx": idx[:, :-1]}, idx[:, 1:])]
    scores = structured.importance(model, batches)
    assert scores["heads", 1][1] == 0 and (scores["heads", 1][[0, 2, 3]] > 0).all()
    assert scores["mlp", 0][7] == 0 and scores["mlp", 0].sum() > 0
    keep = structured.select(model.prune_groups(), scores, {"heads": 1 / 8, "mlp": 1 / 256})
    assert keep["heads"] == [[0, 1, 2, 3], [0, 2, 3]] and 7 not in keep["mlp"][0]
    with pytest.raises(UserError, match="would remove every attention head of layer"):
        structured.select(model.prune_groups(), scores, {"heads": 0.9})


def test_families_without_structured_pruning_say_so(tiny_model):
    from llmcli.models.base import LanguageModel

    bare = LanguageModel()
    bare.config = tiny_model(VOCAB).config
    with pytest.raises(UserError, match="model.arch='transformer' has no structured pruning"):
        bare.prune_groups()


def test_attention_maps_of_layers_with_different_head_counts_are_refused(tiny_model, tiny_seq2seq):
    pruned = tiny_model(VOCAB).pruned({"heads": [[0, 1], [3]]})
    with pytest.raises(UserError, match="self-attention: the layers of this pruned model have 2, 1 heads"):
        pruned.attention_maps(torch.zeros(1, 5, dtype=torch.long))
    seq2seq = tiny_seq2seq("encoder-decoder", VOCAB, 30).pruned({"heads": [[0], [1, 2], [3], [0, 1], [2], [1]]})
    with pytest.raises(UserError, match="encoder self-attention: the layers of this pruned model have 1, 2 heads"):
        seq2seq.attention_maps(torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    same = tiny_model(VOCAB).pruned({"heads": [[0, 1], [2, 3]]})  # the same count in every layer still draws
    assert same.attention_maps(torch.zeros(1, 5, dtype=torch.long))[0].weights.shape == (2, 2, 5, 5)
