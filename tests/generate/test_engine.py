"""The continuous-batching engine: cached decoding = full recompute, batch rows = running alone."""

from __future__ import annotations

import copy

import pytest
import torch

from llmcli import device as device_mod
from llmcli.device import PackedLinear
from llmcli.errors import UserError
from llmcli.generate.engine import Engine
from llmcli.options.sampling import SamplingParams


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_engine_cached_decoding_matches_full_recompute(make_model, run_engine, last_logits, preset):
    model = make_model(50, preset=preset, block_size=96, n_kv_head=2 if preset == "llama" else None)
    prompt = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(1)).tolist()
    with last_logits(model) as logits:
        (tokens,), _ = run_engine(model, [prompt], [SamplingParams(max_new_tokens=64, temperature=0)], batch_size=3)
    assert len(tokens) == 64 and len(logits) == 64
    seq = list(prompt)
    with torch.no_grad():
        for step, (token, got) in enumerate(zip(tokens, logits, strict=True)):
            full = model(torch.tensor([seq]))[0, -1]
            torch.testing.assert_close(got, full, rtol=0, atol=1e-5)
            assert token == int(full.argmax()), f"greedy token differs at step {step}"
            seq.append(token)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_engine_packs_large_weights_and_decodes_the_same_tokens(make_model, run_engine, monkeypatch):
    model = make_model(50, preset="llama")
    unpacked = copy.deepcopy(model)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    params = [SamplingParams(max_new_tokens=40, temperature=0), SamplingParams(max_new_tokens=40, temperature=0)]
    reference, _ = run_engine(unpacked, prompts, params, batch_size=2)
    assert not any(isinstance(m, PackedLinear) for m in unpacked.modules())  # too small to pack
    monkeypatch.setattr(device_mod, "PACK_MIN_WEIGHTS", 0)
    count = model.num_params()
    packed, engine = run_engine(model, prompts, params, batch_size=2)
    assert isinstance(engine.runner.decoder.lm_head, PackedLinear)
    assert packed == reference
    # The engine decodes with a packed copy: the model itself reports and holds what it did.
    assert not any(isinstance(m, PackedLinear) for m in model.modules()) and model.num_params() == count


def test_batched_generation_equals_each_prompt_alone(make_model, run_engine):
    model = make_model(40)
    rng = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 40, (n,), generator=rng).tolist() for n in (3, 17, 9, 1, 30)]
    greedy = [SamplingParams(max_new_tokens=n, temperature=0) for n in (20, 35, 12, 40, 25)]
    seeded = [SamplingParams(max_new_tokens=30, temperature=1.0, top_k=10, seed=s) for s in range(5)]
    for params in (greedy, seeded):
        alone = [run_engine(model, [p], [sp], batch_size=1)[0][0] for p, sp in zip(prompts, params, strict=True)]
        # 2 slots for 5 requests: the queued ones join as others finish.
        batched, engine = run_engine(model, prompts, params, batch_size=2)
        assert batched == alone
        assert [len(t) for t in batched] == [sp.max_new_tokens for sp in params]
        assert engine.num_running == 0 and engine.num_waiting == 0


def test_sequence_joining_midway_equals_running_alone(make_model, run_engine):
    model = make_model(40)
    a, b = [1, 2, 3, 4], [7, 8, 9]
    pa = SamplingParams(max_new_tokens=30, temperature=0.9, seed=11)
    pb = SamplingParams(max_new_tokens=20, temperature=0.0)
    alone_a = run_engine(model, [a], [pa], batch_size=1)[0][0]
    alone_b = run_engine(model, [b], [pb], batch_size=1)[0][0]
    both, _ = run_engine(model, [a], [pa], batch_size=2, add_later={6: [(b, pb)]})
    assert both == [alone_a, alone_b]


def test_fixed_seed_reproduces_samples_and_seeds_differ(make_model, run_engine):
    model = make_model(40)
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=5)
    first = run_engine(model, [[1, 2]], [params], batch_size=1)[0][0]
    again = run_engine(model, [[1, 2]], [params], batch_size=1)[0][0]
    other = run_engine(model, [[1, 2]], [SamplingParams(max_new_tokens=40, temperature=1.0, seed=6)],
                       batch_size=1)[0][0]
    assert first == again and first != other


def test_sliding_past_the_window_keeps_going_and_is_exact(make_model, last_logits):
    model = make_model(30, block_size=16)
    engine = Engine(model, max_batch_size=2)
    request_id = engine.add(list(range(1, 21)), SamplingParams(max_new_tokens=50, temperature=0))
    request = engine.get(request_id)
    assert request.dropped_prompt_tokens == 4 and len(request.prompt_ids) == 16
    tokens, checked, keep = [], 0, engine.scheduler.slide_keep
    while engine.has_work():
        with last_logits(model) as logits:
            events = engine.step()
        seq = engine.scheduler.sequence(request_id)
        slides = request.metrics.slides
        for ev in events:
            tokens.append(ev.token)
            if slides and seq is not None and seq.cached == keep and checked < slides:
                # Just refilled: the logits are those of the last block_size/2 tokens alone.
                context = request.tokens[-1 - keep:-1]
                with torch.no_grad():
                    full = model(torch.tensor([context]))[0, -1]
                torch.testing.assert_close(logits[-1], full, rtol=0, atol=1e-5)
                checked += 1
    assert len(tokens) == 50 and request.metrics.slides >= 3 and checked == request.metrics.slides


def test_stop_token_ends_a_sequence_and_vocab_padding_is_never_sampled(make_model, run_engine):
    model = make_model(40)
    with torch.no_grad():
        model.lm_head.weight[30:] += 100.0  # the padded ids would win every time
    engine = Engine(model, max_batch_size=1, vocab_size=30)
    engine.add([1, 2, 3], SamplingParams(max_new_tokens=20, temperature=1.0, seed=0))
    tokens = [ev.token for _ in range(20) for ev in engine.step()]
    assert tokens and all(t < 30 for t in tokens)
    greedy_first = run_engine(model, [[1, 2, 3]], [SamplingParams(max_new_tokens=5, temperature=0)],
                              batch_size=1)[0][0][0]
    engine = Engine(model, max_batch_size=1)
    engine.add([1, 2, 3], SamplingParams(max_new_tokens=5, temperature=0), stop_token_ids=[greedy_first])
    (event,) = engine.step()
    assert event.finished and event.finish_reason == "eot" and not engine.has_work()


def test_cancel_frees_the_slot(make_model):
    model = make_model(30)
    engine = Engine(model, max_batch_size=1)
    first = engine.add([1], SamplingParams(max_new_tokens=100, temperature=0))
    second = engine.add([2], SamplingParams(max_new_tokens=3, temperature=0))
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    engine.cancel(first)
    events = engine.step()
    assert [e.id for e in events] == [second]


def test_a_steady_decode_step_reuses_the_previous_plan_until_a_request_joins_or_leaves(make_model):
    engine = Engine(make_model(30), max_batch_size=3)
    scheduler, runner = engine.scheduler, engine.runner
    params = SamplingParams(max_new_tokens=7, temperature=0)
    engine.add([1, 2, 3], params)
    engine.add([4, 5], params)
    engine.step()  # both prompts prefilled

    def step():
        plan = scheduler.schedule()
        scheduler.update(plan, runner.execute(plan))
        return plan

    first = step()
    assert step() is first and first.decode_only and first.argmax
    engine.add([6], params)  # a request joins: the next plan admits it
    joined = step()
    assert joined is not first and len(joined.admitted) == 1
    steady = step()
    assert step() is steady and len(steady.decode) == 3
    step()  # the first two requests generate their 7th token and finish
    left = step()
    assert left is not steady and len(left.decode) == 1


def test_repetition_penalty_in_the_engine_matches_a_reference_loop(make_model, run_engine):
    model = make_model(30)
    prompt, penalty = [1, 2, 3], 3.0
    plain = run_engine(model, [prompt], [SamplingParams(max_new_tokens=30, temperature=0)], batch_size=1)[0][0]
    params = SamplingParams(max_new_tokens=30, temperature=0, repetition_penalty=penalty)
    # Another sequence without a penalty in the same batch must not be affected, nor affect it.
    penalized, other = run_engine(model, [prompt, [4, 5]], [params, SamplingParams(max_new_tokens=30, temperature=0)],
                                  batch_size=2)[0]
    assert other == run_engine(model, [[4, 5]], [SamplingParams(max_new_tokens=30, temperature=0)], batch_size=1)[0][0]
    seq, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(30):
            logits = model(torch.tensor([seq]))[0, -1]
            for t in set(seq):
                logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
            expected.append(int(logits.argmax()))
            seq.append(expected[-1])
    assert penalized == expected != plain


# --- recurrent models: one hidden state per slot ------------------------------------------------


@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_recurrent_engine_matches_full_recompute_and_never_slides(tiny_recurrent, run_engine, last_logits, arch):
    model = tiny_recurrent(arch, 40, std=0.4, block_size=16)
    prompt = torch.randint(0, 40, (40,), generator=torch.Generator().manual_seed(3)).tolist()  # > block_size
    with last_logits(model) as logits:
        (tokens,), engine = run_engine(model, [prompt], [SamplingParams(max_new_tokens=60, temperature=0)],
                                       batch_size=2)
    assert engine.max_len is None and len(tokens) == 60
    seq = list(prompt)
    with torch.no_grad():
        for token, got in zip(tokens, logits, strict=True):
            full = model(torch.tensor([seq]))[0, -1]  # the whole history: nothing was dropped
            torch.testing.assert_close(got, full, rtol=0, atol=5e-5)  # float sums over ~100 steps
            assert token == int(full.argmax())
            seq.append(token)


@pytest.mark.parametrize("arch", ["lstm", "gru", "rnn"])
def test_recurrent_batch_rows_equal_each_prompt_alone(tiny_recurrent, run_engine, arch):
    model = tiny_recurrent(arch, 40, std=0.4)
    rng = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 40, (n,), generator=rng).tolist() for n in (3, 17, 9, 1, 30)]
    greedy = [SamplingParams(max_new_tokens=n, temperature=0) for n in (20, 35, 12, 40, 25)]
    seeded = [SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=s) for s in range(5)]
    for params in (greedy, seeded):
        alone = [run_engine(model, [p], [sp], batch_size=1)[0][0] for p, sp in zip(prompts, params, strict=True)]
        batched, _ = run_engine(model, prompts, params, batch_size=3)  # prefills padded together, joins midway
        assert batched == alone


# --- chunked prefill: a step's token budget -----------------------------------------------------


@pytest.mark.parametrize("preset, paged", [("gpt2", False), ("llama", True)])
def test_chunked_prefill_equals_one_shot_prefill(make_model, run_engine, preset, paged):
    model = make_model(40, preset=preset, block_size=64)
    rng = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 40, (n,), generator=rng).tolist() for n in (50, 5, 33, 64)]
    cache = {"kv_blocks": 48, "block_len": 4} if paged else {}
    for params in ([SamplingParams(max_new_tokens=n, temperature=0) for n in (30, 40, 20, 10)],
                   [SamplingParams(max_new_tokens=25, temperature=1.0, top_p=0.9, seed=s) for s in range(4)]):
        whole, one_shot = run_engine(model, prompts, params, batch_size=3, **cache)
        chunked, engine = run_engine(model, prompts, params, batch_size=3, max_num_batched_tokens=7, **cache)
        assert chunked == whole
        assert engine.stats.steps > one_shot.stats.steps  # the prompts did take several steps each


def test_running_sequences_decode_while_a_long_prompt_is_prefilled_in_chunks(make_model):
    model = make_model(40, block_size=96)
    engine = Engine(model, max_batch_size=2, max_num_batched_tokens=10)
    running = engine.add([1, 2, 3], SamplingParams(max_new_tokens=40, temperature=0))
    engine.step()
    engine.step()
    long = engine.add(list(range(5, 35)) * 2, SamplingParams(max_new_tokens=5, temperature=0))  # 60 tokens
    steps = 0
    while True:
        events = engine.step()
        if any(ev.id == long for ev in events):
            break
        steps += 1
        assert [ev.id for ev in events] == [running]  # one token a step, never stalled
    assert steps == 60 // 9  # 9 of each step's 10 tokens go to the prompt, the other to the decode
    with pytest.raises(UserError, match="fewer than the sequences a step decodes"):
        Engine(model, max_batch_size=4, max_num_batched_tokens=3)
