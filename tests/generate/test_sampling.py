"""Sampling filters and the inverse-CDF draw, on crafted logits."""

from __future__ import annotations

import math
import re

import pytest
import torch

from llmcli.errors import FieldError
from llmcli.generate.sampling import apply_repetition_penalty, sample, sampling_probs
from llmcli.options.sampling import SamplingParams


def probs_of(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    logits = torch.tensor([logits], dtype=torch.float32)
    return sampling_probs(logits, torch.tensor([temperature]), torch.tensor([top_k]), torch.tensor([top_p]),
                          torch.tensor([min_p]))[0]


P = [0.5, 0.3, 0.15, 0.05]
LOGITS = [math.log(p) for p in P]


def test_temperature_scales_logits():
    got = probs_of([2.0, 1.0, 0.0], temperature=0.5)
    torch.testing.assert_close(got, torch.softmax(torch.tensor([4.0, 2.0, 0.0]), -1))
    torch.testing.assert_close(probs_of(LOGITS), torch.tensor(P))


def test_top_k_keeps_the_k_most_likely():
    got = probs_of([0.0, 3.0, 1.0, 2.0], top_k=2)
    expected = torch.softmax(torch.tensor([3.0, 2.0]), -1)
    torch.testing.assert_close(got, torch.tensor([0.0, expected[0], 0.0, expected[1]]))
    torch.testing.assert_close(probs_of(LOGITS, top_k=10), torch.tensor(P))  # k > vocab: everything


@pytest.mark.parametrize("top_p,kept", [(0.4, 1), (0.75, 2), (0.85, 3), (0.97, 4), (1.0, 4)])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    got = probs_of(LOGITS, top_p=top_p)
    expected = torch.tensor(P[:kept] + [0.0] * (4 - kept))
    torch.testing.assert_close(got, expected / expected.sum())


def test_top_p_tiny_keeps_one_token():
    assert probs_of(LOGITS, top_p=1e-9).tolist() == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("min_p,kept", [(0.0, 4), (0.2, 3), (0.5, 2), (0.9, 1), (1.0, 1)])
def test_min_p_drops_tokens_below_a_fraction_of_the_top(min_p, kept):
    got = probs_of(LOGITS, min_p=min_p)
    expected = torch.tensor(P[:kept] + [0.0] * (4 - kept))
    torch.testing.assert_close(got, expected / expected.sum())


def test_filters_compose_in_order():
    # top-k 3 renormalizes [.5,.3,.15] -> then top-p .8 keeps 2 of them, then min-p .7 keeps 1.
    assert probs_of(LOGITS, top_k=3, top_p=0.8).nonzero().flatten().tolist() == [0, 1]
    assert probs_of(LOGITS, top_k=3, top_p=0.8, min_p=0.7).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    got = apply_repetition_penalty(logits, seen, torch.tensor([2.0]))
    assert got.tolist() == [[1.0, -4.0, 1.0, -1.0]]


def test_sample_uses_the_cdf_and_greedy_rows_take_the_argmax():
    logits = torch.tensor([LOGITS] * 5)
    temperature = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    zeros, ones = torch.zeros(5, dtype=torch.long), torch.ones(5)
    uniforms = torch.tensor([0.0, 0.49, 0.51, 0.99, 0.99])
    got = sample(logits, temperature, zeros, ones, torch.zeros(5), uniforms)
    assert got.tolist() == [0, 0, 1, 3, 0]
    many = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    drawn = sample(torch.tensor([LOGITS]).expand(20000, 4), torch.ones(20000), torch.zeros(20000, dtype=torch.long),
                   torch.ones(20000), torch.zeros(20000), many)
    freq = torch.bincount(drawn, minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.tensor(P), atol=0.015, rtol=0)


@pytest.mark.parametrize("field,value,words", [
    ("temperature", -1, "temperature must be >= 0"), ("top_p", 0, "top_p must be in (0, 1]"),
    ("top_k", -1, "top_k must be an integer >= 0"), ("max_new_tokens", 0, "max_new_tokens must be a positive integer"),
    ("min_p", 1.5, "min_p must be in [0, 1]"), ("repetition_penalty", 0, "repetition_penalty must be > 0"),
    ("seed", -1, "seed must be an integer in [0, 2^63)"), ("stop", ("",), "stop: a stop string cannot be empty"),
])
def test_sampling_params_refuse_bad_values_naming_the_field(field, value, words):
    with pytest.raises(FieldError, match=re.escape(words)) as caught:
        SamplingParams(**{field: value})
    assert caught.value.field == field
