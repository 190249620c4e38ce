"""The recurrent families (lstm, gru, rnn): shapes, dropout, the per-slot state (decoding = one full
forward, padded prefills = each row alone), tied heads, counting, and refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llmcli.errors import UserError
from llmcli.models.base import Rows
from llmcli.models.recurrent import Recurrent
from llmcli.models.registry import build_model

ARCHES = ["lstm", "gru", "rnn"]
VOCAB = 41


@pytest.fixture
def make(tiny_recurrent):
    return lambda arch, **extra: tiny_recurrent(arch, VOCAB, std=0.3, **extra)


@pytest.mark.parametrize("arch", ARCHES)
def test_logits_shape_dtype_and_torch_layer(make, arch):
    model = make(arch)
    assert type(model.rnn) is {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[arch]
    assert model.context_length is None
    logits = model(torch.randint(0, VOCAB, (3, 50)))  # longer than block_size: no context limit
    assert logits.shape == (3, 50, VOCAB) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHES)
def test_decoding_with_the_state_equals_one_forward(make, arch):
    """A padded prefill of three prompts into scattered slots, then one token per step: every
    row's logits equal a plain forward over its whole sequence."""
    model = make(arch)
    idx = torch.randint(0, VOCAB, (3, 30), generator=torch.Generator().manual_seed(1))
    lengths, slots = [11, 4, 7], [3, 0, 5]
    state = model.new_decode_state(6)
    with torch.no_grad():
        full = model(idx)
        logits = model(idx[:, :11], state=state, rows=Rows(slots, [0, 0, 0], lengths))
        for b, n in enumerate(lengths):
            torch.testing.assert_close(logits[b, :n], full[b, :n], rtol=0, atol=1e-5)
        positions = list(lengths)
        for _ in range(12):
            step = torch.stack([idx[b, p] for b, p in enumerate(positions)])[:, None]
            logits = model(step, state=state, rows=Rows(slots, positions, [1, 1, 1]))
            for b, p in enumerate(positions):
                torch.testing.assert_close(logits[b, 0], full[b, p], rtol=0, atol=1e-5)
            positions = [p + 1 for p in positions]
    assert [state.positions[s] for s in slots] == positions


@pytest.mark.parametrize("arch", ARCHES)
def test_a_slot_restarts_at_zero_and_cannot_be_rewound(make, arch):
    model = make(arch)
    state = model.new_decode_state(2)
    a, b = torch.randint(0, VOCAB, (1, 9)), torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        model(a, state=state, rows=Rows([1], [0], [9]))
        again = model(b, state=state, rows=Rows([1], [0], [5]))  # a new sequence takes the slot
        torch.testing.assert_close(again, model(b), rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="continues from there or restarts at 0"):
            model(b[:, :1], state=state, rows=Rows([1], [3], [1]))
        with pytest.raises(ValueError, match="slots must be in"):
            model(b[:, :1], state=state, rows=Rows([2], [0], [1]))


@pytest.mark.parametrize("arch", ARCHES)
def test_dropout_only_in_training(make, arch):
    model = make(arch, dropout=0.3)
    assert model.rnn.dropout == 0.3
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), model(idx), rtol=0, atol=0)
        model.train()
        assert not torch.allclose(model(idx), model(idx))


def test_tied_head_shares_the_embedding_and_untied_sizes_may_differ(make):
    tied = make("lstm")
    assert tied.lm_head.weight is tied.tok_embed.weight and tied.tied_weights() == {"lm_head.weight": "tok_embed.weight"}
    untied = make("gru", d_hidden=48, tie_embeddings=False)
    assert untied.rnn.hidden_size == 48 and untied.lm_head.weight.shape == (VOCAB, 48)
    assert untied.num_params() > tied.num_params()
    # tied with a wider hidden state: a projection to d_model, then the embedding matrix
    projected = Recurrent(dataclasses.replace(untied.config, tie_embeddings=True))
    assert projected.lm_head.weight is projected.tok_embed.weight and projected.proj.weight.shape == (32, 48)
    assert projected.num_params() == Recurrent.param_count(projected.config)
    assert projected(torch.randint(0, VOCAB, (2, 5))).shape == (2, 5, VOCAB)


def test_embedding_dropout_drops_whole_words_while_training(make):
    model = make("lstm", embed_dropout=0.5)
    idx = torch.tensor([[3, 3, 3, 3, 5, 5, 5, 5]] * 8)
    assert torch.equal(model._embed(idx), model.tok_embed(idx))  # eval: the table as it is
    model.train()
    torch.manual_seed(0)
    rows = model._embed(idx).reshape(-1, 32)
    for word in (3, 5):
        used = rows[(idx == word).flatten()]
        assert (used == 0).all() or torch.allclose(used, 2 * model.tok_embed.weight[word].expand_as(used))
    draws = {bool((model._embed(idx)[0, 0] == 0).all()) for _ in range(20)}
    assert draws == {True, False}


def test_weight_drop_drops_hidden_to_hidden_entries_while_training(make):
    model = make("lstm", weight_drop=0.5, dropout=0.0)
    idx = torch.randint(0, VOCAB, (2, 12))
    before = {n: p.clone() for n, p in model.rnn.named_parameters()}
    assert torch.equal(model(idx), model(idx))  # eval: no mask
    model.train()
    torch.manual_seed(0)
    dropped = model(idx)
    model.config = dataclasses.replace(model.config, weight_drop=0.0)
    assert not torch.allclose(dropped, model(idx))
    # the same as running the layer with those entries zeroed and the rest doubled
    torch.manual_seed(0)
    masks = {n: torch.nn.functional.dropout(p, 0.5) for n, p in model.rnn.named_parameters() if "weight_hh" in n}
    manual = torch.func.functional_call(model.rnn, masks, (model.tok_embed(idx), None))[0]
    assert torch.allclose(dropped, model.lm_head(manual).float(), atol=1e-6)
    assert all(torch.equal(p, before[n]) for n, p in model.rnn.named_parameters())  # weights untouched


@pytest.mark.parametrize("arch,gates", [("lstm", 4), ("gru", 3), ("rnn", 1)])
def test_flops_count_every_weight_matrix(make, arch, gates):
    model = make(arch, d_hidden=48, tie_embeddings=False)
    d, h = 32, 48
    matrices = gates * h * (d + h) + gates * h * (h + h) + VOCAB * h
    assert model.flops_per_token() == 6 * matrices


def test_the_registry_builds_every_arch(make):
    for arch in ARCHES:
        assert isinstance(build_model(make(arch).config), Recurrent)
    with pytest.raises(UserError, match="vocab_size is not set"):
        Recurrent(dataclasses.replace(make("rnn").config, vocab_size=None))
