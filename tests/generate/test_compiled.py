"""The compiled decode step: greedy output equal to the eager step's, on both caches, with slots
joining, leaving and sitting idle inside a bucket; the buckets it compiles."""

from __future__ import annotations

import pytest
import torch

from llmcli.device import PACK_MIN_WEIGHTS
from llmcli.generate.compiled import buckets, compiles
from llmcli.options.sampling import SamplingParams


def test_buckets_are_powers_of_two_and_the_slot_count():
    assert buckets(1) == [1] and buckets(2) == [1, 2] and buckets(8) == [1, 2, 4, 8]
    assert buckets(12) == [1, 2, 4, 8, 12]


def test_an_engine_names_the_buckets_it_compiles_and_warms_nothing_when_not_compiling(make_model):
    from llmcli.generate.engine import Engine

    model = make_model(40)
    assert Engine(model, max_batch_size=3, compile=True).compiled_buckets == (1, 2, 3)  # nothing compiled yet
    eager = Engine(model, max_batch_size=3)
    assert eager.compiled_buckets == () and eager.warm_up() is None


def test_only_families_with_bucket_rows_compile(make_model, tiny_recurrent, tiny_seq2seq):
    assert compiles(make_model(40))
    assert not compiles(tiny_recurrent("lstm", 40)) and not compiles(tiny_seq2seq("encoder-decoder"))


@pytest.mark.slow
@pytest.mark.parametrize("preset, paged, vocab, extra", [
    ("llama", False, 40, {}), ("gpt2", True, 40, {}),
    ("llama", False, PACK_MIN_WEIGHTS // 32, {}),  # a head eager packs
    ("llama", True, 40, {"value_embeds": 1}),  # the cached values hold the value embeddings
])
def test_compiled_and_eager_steps_give_the_same_greedy_tokens(make_model, run_engine, preset, paged, vocab, extra):
    model = make_model(vocab, preset=preset, block_size=48, **extra)
    rng = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 40, (n,), generator=rng).tolist() for n in (5, 17, 2, 40, 9)]
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (30, 12, 45, 20, 8)]
    cache = {"kv_blocks": 24, "block_len": 8} if paged else {}
    # 3 slots for 5 requests: they join as others leave, so steps run 1, 2 and 3 rows, in any slots.
    eager, _ = run_engine(model, prompts, params, batch_size=3, **cache)
    compiled, engine = run_engine(model, prompts, params, batch_size=3, compile=True, **cache)
    assert compiled == eager
    assert set(engine.runner.compiled.warmup_seconds) <= {1, 2, 3} and 3 in engine.runner.compiled.warmup_seconds
