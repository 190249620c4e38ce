"""The engine on a paged KV cache: the same tokens as the slot cache, preemption that resumes
exactly, prefix blocks shared and diverging correctly, and the limits of a small pool."""

from __future__ import annotations

import pytest
import torch

from llmcli.errors import UserError
from llmcli.generate.engine import Engine
from llmcli.options.sampling import SamplingParams


def _prompts(lengths, vocab=40, seed=2):
    rng = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=rng).tolist() for n in lengths]


GREEDY = [SamplingParams(max_new_tokens=n, temperature=0) for n in (20, 35, 12, 40, 25)]
SEEDED = [SamplingParams(max_new_tokens=30, temperature=1.0, top_k=10, seed=s) for s in range(5)]


@pytest.mark.parametrize("preset,extra", [("gpt2", {}), ("llama", {"n_kv_head": 2}),
                                          ("llama", {"n_kv_head": 2, "value_embeds": 1})],
                         ids=["gpt2", "llama", "value-embeds"])
def test_paged_equals_slot_with_joins_and_leaves(make_model, run_engine, preset, extra):
    model = make_model(40, preset=preset, **extra)
    prompts = _prompts((3, 17, 9, 1, 30))
    for params in (GREEDY, SEEDED):
        slot, _ = run_engine(model, prompts, params, batch_size=2, add_later={5: [(prompts[0], params[1])]})
        paged, engine = run_engine(model, prompts, params, batch_size=2, add_later={5: [(prompts[0], params[1])]},
                                   kv_blocks=64, block_len=4)
        assert paged == slot
        assert engine.cache_use().blocks_used == 0 and engine.stats.preemptions == 0


def test_paged_encoder_decoder_equals_slot(tiny_seq2seq, run_engine):
    model = tiny_seq2seq("encoder-decoder", std=0.3)
    sources = [s + [1] for s in _prompts((5, 12, 3, 8), vocab=30, seed=4)]
    params = [SamplingParams(max_new_tokens=30, temperature=0)] * 4
    slot, _ = run_engine(model, [[0]] * 4, params, batch_size=3, sources=sources)
    paged, _ = run_engine(model, [[0]] * 4, params, batch_size=3, sources=sources, kv_blocks=12, block_len=4)
    assert paged == slot and {len(t) for t in slot} == {23}  # to the end of the decoder's context


def test_preempted_sequences_resume_with_the_same_tokens(make_model, run_engine):
    model = make_model(40)
    prompts = _prompts((10, 6, 14, 3, 9), seed=5)
    for params in (GREEDY, SEEDED):
        free, _ = run_engine(model, prompts, params, batch_size=4)
        # 4 slots but 16 blocks of 4 tokens: the sequences outgrow the pool and take turns.
        tight, engine = run_engine(model, prompts, params, batch_size=4, kv_blocks=16, block_len=4)
        assert tight == free and engine.stats.preemptions > 0


def test_shared_prefix_blocks_are_reused_and_diverge_correctly(make_model, run_engine):
    model = make_model(40)
    header = _prompts((13,), seed=7)[0]
    params = SamplingParams(max_new_tokens=15, temperature=0)
    engine = Engine(model, max_batch_size=3, kv_blocks=40, block_len=4)
    first = engine.get(engine.add(header + [1, 2], params))
    engine.step()  # its prompt fills three blocks, now cached
    second = engine.get(engine.add(header + [5], params))
    third = engine.get(engine.add(header[:6], params))
    engine.step()
    blocks = {r.id: engine.scheduler.sequence(r.id).blocks for r in (first, second, third)}
    assert blocks[second.id][:3] == blocks[first.id][:3] and blocks[third.id][:1] == blocks[first.id][:1]
    assert blocks[third.id][1] not in blocks[first.id]  # diverges inside block 2: a block of its own
    pool = engine.scheduler.paged.pool
    assert [pool.refs[b] for b in blocks[first.id][:3]] == [3, 2, 2]
    assert pool.hit_tokens == 12 + 4 and engine.cache_use().prefix_hit_rate == 16 / (15 + 14 + 6)
    out: dict[int, list[int]] = {r.id: r.tokens[len(r.prompt_ids):] for r in (first, second, third)}
    while engine.has_work():
        for ev in engine.step():
            out[ev.id].append(ev.token)
    prompts = [header + [1, 2], header + [5], header[:6]]
    uncached, _ = run_engine(model, prompts, [params] * 3, batch_size=3, kv_blocks=40, block_len=4,
                             prefix_cache=False)
    assert list(out.values()) == uncached
    assert pool.used == 0 and pool.available == 40  # all free again, the full ones still cached


def test_paged_window_slides_like_the_slot_cache(make_model, run_engine):
    model = make_model(30, block_size=16)
    params = [SamplingParams(max_new_tokens=50, temperature=0), SamplingParams(max_new_tokens=40, temperature=0)]
    prompts = [list(range(1, 21)), [3, 4]]
    slot, _ = run_engine(model, prompts, params, batch_size=2)
    paged, engine = run_engine(model, prompts, params, batch_size=2, kv_blocks=8, block_len=4)
    assert paged == slot and engine.stats.preemptions == 0


def test_a_pool_smaller_than_the_context_narrows_the_window_and_refuses_longer_prompts(make_model):
    model = make_model(40)
    engine = Engine(model, max_batch_size=2, kv_blocks=3, block_len=4)
    assert engine.max_prompt_tokens == 12 and engine.scheduler.window == 12 and engine.scheduler.slide_keep == 6
    with pytest.raises(UserError, match="the prompt has 13 tokens; the paged KV cache holds at most 12 "
                                        r"\(3 blocks of 4\)"):
        engine.add(list(range(13)), SamplingParams(max_new_tokens=5))
    engine.add(list(range(12)), SamplingParams(max_new_tokens=30, temperature=0))
    tokens = [ev.token for _ in range(30) for ev in engine.step()]
    assert len(tokens) == 30 and not engine.has_work()


def test_families_without_paging_refuse_it(tiny_recurrent, make_model):
    with pytest.raises(UserError, match="model.arch=lstm has no paged KV cache"):
        Engine(tiny_recurrent("lstm", 40), kv_blocks=8)
    with pytest.raises(UserError, match="at least one block"):
        Engine(make_model(40), kv_blocks=0)
