"""Layer removal (`llmcli prune --layers`): each family's shallower model equals the original with
the layer taken out by hand, the scores are the loss each removal adds, and removing every layer
of a stack is refused in one line."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn

from llmcli.checkpoint import load_model, read_pruning, save_model
from llmcli.errors import UserError
from llmcli.models.base import Rows
from llmcli.prune import structured

VOCAB = 40


def _stepped(model, idx):
    """The logits of a prefill of all but 4 tokens, then one token at a time through the decode state."""
    B, T = idx.shape
    state = model.new_decode_state(B, T)
    out = [model(idx[:, :T - 4], state=state, rows=Rows(range(B), [0] * B, [T - 4] * B))]
    out += [model(idx[:, t:t + 1], state=state, rows=Rows(range(B), [t] * B, [1] * B)) for t in range(T - 4, T)]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_a_transformer_without_a_block_equals_the_hand_built_reference(tiny_model, preset):
    model = tiny_model(VOCAB, preset=preset, std=0.3, seed=3, n_layer=3)
    model = model.pruned({"heads": [[0, 1], [1], [0, 3]], "mlp": [list(range(50)), list(range(9)), list(range(128))]})
    shallower = model.without_layers({"layers": [0, 2]})
    assert shallower.config.n_layer == 2 and shallower.config.layer_heads == [2, 2]
    assert shallower.config.layer_ff == [50, 128]
    ref = copy.deepcopy(model)
    del ref.blocks[1]
    idx = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        got = shallower(idx)
        torch.testing.assert_close(got, ref(idx), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_stepped(shallower, idx), got, atol=1e-4, rtol=1e-4)  # the cache is renumbered


@pytest.mark.parametrize("preset,extra", [("gpt2", {}), ("llama", {"n_kv_head": 2})])
@pytest.mark.parametrize("value_embeds,kept,tables,layer_tables", [
    (1, [0, 1, 3], 1, None),  # a middle layer went: the first and last layers still share table 0
    (1, [1, 2, 3], 1, [-1, -1, 0]),  # the first went: table 0 stays for the last, listed per layer
    (1, [1, 2], 0, None),  # both readers of table 0 went, and the table with them
    (2, [0, 1, 3], 2, [0, 1, 1]),  # tables 0, 1 in layers 0, 1, 0, 1: 2 tables in 3 layers need the list
    (2, [1, 2], 2, [1, 0]),  # both tables stay: the kept layers 1 and 2 read tables 1 and 0
])
def test_a_transformer_with_value_embeds_without_layers_equals_skipping_them(tiny_model, tmp_path, preset, extra,
                                                                                value_embeds, kept, tables,
                                                                                layer_tables):
    model = tiny_model(VOCAB, preset=preset, std=0.3, seed=3, n_layer=4, value_embeds=value_embeds, **extra)
    shallower = model.without_layers({"layers": kept})
    c = shallower.config
    assert (c.n_layer, c.value_embeds, c.layer_value_embeds) == (len(kept), tables, layer_tables)
    assert shallower.num_params() == type(shallower).param_count(c)
    for new, old in enumerate(sorted({model.config.value_embed_of(i) for i in kept} - {None})):
        torch.testing.assert_close(shallower.value_embeds[new].weight, model.value_embeds[old].weight, rtol=0, atol=0)
    ref = copy.deepcopy(model)
    for i in set(range(4)) - set(kept):  # the original with the removed blocks passing x through
        ref.blocks[i].forward = lambda x, *args, **kwargs: x
    idx = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        got = shallower(idx)
        torch.testing.assert_close(got, ref(idx), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_stepped(shallower, idx), got, atol=1e-4, rtol=1e-4)
        save_model(shallower, tmp_path / "s")
        torch.testing.assert_close(load_model(tmp_path / "s")(idx), got, rtol=0, atol=0)
        # heads then go as usual: a table read by one layer loses that layer's removed heads' columns
        pruned = shallower.pruned({"heads": [[0] for _ in range(len(shallower.prune_groups()) - len(kept))],
                                   "mlp": [list(range(8))] * len(kept)})
        assert pruned.num_params() == type(pruned).param_count(pruned.config)
        if tables:
            assert pruned.value_embeds[0].weight.shape[1] == c.head_dim


def test_an_encoder_decoder_without_layers_equals_the_hand_built_reference(tiny_seq2seq):
    model = tiny_seq2seq("encoder-decoder", VOCAB, 30, std=0.3, seed=1, n_layer=3, n_encoder_layer=2)
    model = model.pruned({"heads": [[0], [1, 2], [3], [0, 1], [2], [0, 1, 2, 3], [2], [1]]})
    shallower = model.without_layers({"encoder": [1], "decoder": [0, 2]})
    c = shallower.config
    assert (c.n_encoder_layer, c.n_layer, c.encoder_layer_heads, c.layer_heads, c.cross_layer_heads) == \
        (1, 2, [2], [1, 1], [4, 1])
    ref = copy.deepcopy(model)
    del ref.encoder[0]
    del ref.decoder[1]
    g = torch.Generator().manual_seed(0)
    source, target = torch.randint(1, 30, (2, 9), generator=g), torch.randint(1, VOCAB, (2, 8), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(shallower(target, source=source), ref(target, source=source), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_a_recurrent_model_without_a_layer_equals_its_kept_layers_chained(tiny_recurrent, arch):
    model = tiny_recurrent(arch, VOCAB, std=0.3, seed=2, n_layer=3)
    shallower = model.without_layers({"layers": [0, 2]})
    assert shallower.config.n_layer == 2
    layers = []
    for i in (0, 2):  # one single-layer module per kept layer, holding that layer's weights
        layer = type(model.rnn)(model.rnn.input_size, model.rnn.hidden_size, batch_first=True)
        layer.load_state_dict({f"{n}_l0": getattr(model.rnn, f"{n}_l{i}") for n in ("weight_ih", "weight_hh",
                                                                                   "bias_ih", "bias_hh")})
        layers.append(layer)
    idx = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        x = model.tok_embed(idx)
        for layer in layers:
            x = layer(x)[0]
        torch.testing.assert_close(shallower(idx), model.lm_head(x), atol=1e-5, rtol=1e-5)


def test_a_recurrent_seq2seq_decoder_layer_takes_its_bridge_rows(tiny_seq2seq):
    model = tiny_seq2seq("gru-seq2seq", VOCAB, 30, std=0.3, seed=5, n_layer=3, n_encoder_layer=2)
    shallower = model.without_layers({"decoder": [0, 2]})
    H = model.config.hidden_size
    assert shallower.config.n_layer == 2 and shallower.config.encoder_layers == 2
    torch.testing.assert_close(shallower.bridge.weight, torch.cat([model.bridge.weight[:H], model.bridge.weight[2 * H:]]))
    torch.testing.assert_close(shallower.decoder.weight_hh_l1, model.decoder.weight_hh_l2)
    # encoder layer 1 reads both directions (64 wide), not the 32-wide embedding; decoder layer 1 reads 32
    assert [s.keeps_first for s in model.layer_stacks()] == [True, False]
    g = torch.Generator().manual_seed(0)
    source, target = torch.randint(1, 30, (1, 9), generator=g), torch.randint(1, VOCAB, (1, 6), generator=g)
    with torch.no_grad():
        full = shallower(target, source=source)
        state = shallower.new_decode_state(1)
        shallower.encode(source, state=state, rows=Rows([0], [0], [9]))
        steps = [shallower(target[:, t:t + 1], state=state, rows=Rows([0], [t], [1])) for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def test_layer_scores_are_the_loss_each_removal_adds(tiny_model):
    model = tiny_model(VOCAB, std=0.3, seed=1, n_layer=3)
    with torch.no_grad():  # block 1 adds nothing to the residual stream: leaving it out changes nothing
        nn.init.zeros_(model.blocks[1].attn.out_proj.weight)
        nn.init.zeros_(model.blocks[1].mlp.down_proj.weight)
        nn.init.zeros_(model.blocks[1].attn.out_proj.bias)
        nn.init.zeros_(model.blocks[1].mlp.down_proj.bias)
    idx = torch.randint(0, VOCAB, (4, 16))
    batches = [({"idx": idx[:, :-1]}, idx[:, 1:])]
    losses = structured.layer_losses(model, batches)
    assert set(losses) == {("layers", 0), ("layers", 1), ("layers", 2)}
    assert losses["layers", 1] == pytest.approx(0, abs=1e-6) and losses["layers", 0] != 0
    assert structured.select_layers(model, {("layers", 0): 0.5, ("layers", 1): 0.1, ("layers", 2): -0.2}, 2) \
        == {"layers": [0]}
    with pytest.raises(UserError, match=r"--layers 3: at most 2 of this model's 3 layers can go \(it keeps one\)"):
        structured.select_layers(model, losses, 3)


def test_a_first_layer_reading_the_embeddings_at_another_width_stays(tiny_recurrent):
    model = tiny_recurrent("gru", VOCAB, n_layer=2, d_hidden=16, tie_embeddings=False)
    assert set(structured.layer_losses(model, [({"idx": torch.zeros(1, 4, dtype=torch.long)},
                                                 torch.zeros(1, 4, dtype=torch.long))])) == {("layers", 1)}


@pytest.mark.slow
def test_pruning_with_layers_writes_a_shallower_run(trained_runs, tmp_path, cli):
    out = tmp_path / "p"
    result = cli("prune", trained_runs["llama"], "--out", out, "--heads", "0.25", "--layers", "1",
                 "--calibration-batches", "2", "--eval-tokens", "128", "--decode-tokens", "4")
    assert result.exit_code == 0, result.output
    assert "layers 1" in result.stdout
    saved = json.loads((out / "model.json").read_text())
    assert saved["n_layer"] == 1 and len(saved["layer_heads"]) == 1
    assert read_pruning(out)["layers"] == 1 and sum(map(len, read_pruning(out)["removed_layers"].values())) == 1
    assert cli("eval", out).exit_code == 0
    assert cli("generate", out, "LINE", "--max-new-tokens", "3").exit_code == 0


@pytest.mark.slow
def test_layers_of_a_seq2seq_run(seq2seq_runs, tmp_path, cli, one_line_error):
    out = tmp_path / "p"
    result = cli("prune", seq2seq_runs["gru-seq2seq"], "--out", out, "--layers", "2", "--calibration-batches", "2",
                 "--eval-tokens", "0", "--decode-tokens", "0")
    assert result.exit_code == 0, result.output
    assert (load_model(out).config.encoder_layers, load_model(out).config.n_layer) == (1, 1)
    assert cli("generate", out, "abc", "--max-new-tokens", "3").exit_code == 0
    shallow = tmp_path / "shallow"  # an encoder-decoder that only lost a layer is still a MarianMTModel
    assert cli("prune", seq2seq_runs["encoder-decoder"], "--out", shallow, "--layers", "1", "--calibration-batches", "2",
               "--eval-tokens", "0", "--decode-tokens", "0").exit_code == 0
    result = cli("export", shallow, "--format", "hf", "--out", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["encoder_layers"] + exported["decoder_layers"] == 3
    one_line_error(cli("prune", seq2seq_runs["encoder-decoder"], "--out", tmp_path / "o", "--layers", "3"),
                   "--layers 3: at most 2 of this model's 4 layers can go (encoder and decoder keep one each)")
    assert not (tmp_path / "o").exists()
