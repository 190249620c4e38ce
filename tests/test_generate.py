import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmcli.checkpoint import write_checkpoint
from llmcli.cli import app
from llmcli.config import Config, ModelConfig, TokenizerConfig
from llmcli.errors import UserError
from llmcli.generate import (
    Engine,
    Generator,
    IncrementalDecoder,
    SamplingParams,
    StopText,
    apply_repetition_penalty,
    sample,
    sampling_probs,
)
from llmcli.model import Transformer
from llmcli.tokenizer import decode, encode, save_tokenizer, train_tokenizer

runner = CliRunner()
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "ROMEO:\nBut, soft! what light through yonder window breaks?\n") * 3


def char_tokenizer():
    return train_tokenizer(TokenizerConfig(kind="char"), [TEXT])


def make_model(vocab: int, *, preset: str = "gpt2", block_size: int = 96, seed: int = 0, std: float = 0.15, **extra) -> Transformer:
    """A random model with large weights, so that its logits are far from ties."""
    torch.manual_seed(seed)
    arch = dict(norm="rmsnorm", pos="rope", act="swiglu", bias=False, tie_embeddings=False) if preset == "llama" else {}
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=32, block_size=block_size, vocab_size=vocab, **{**arch, **extra})
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model


@pytest.fixture
def tok():
    return char_tokenizer()


@pytest.fixture
def checkpoint(tmp_path, tok) -> Path:
    tok_path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, tok_path)
    model = make_model(tok.get_vocab_size(), block_size=32)
    cfg = Config()
    cfg.model = model.config
    directory = tmp_path / "run"
    write_checkpoint(directory, model, cfg, tok_path, {"step": 7})
    return directory


def run_engine(model, prompts, params, *, batch_size, record=False, add_later=None):
    """Tokens generated per request; `add_later` = {step: [(prompt, params)]} joins mid-way."""
    engine = Engine(model, max_batch_size=batch_size, record_logits=record)
    ids = [engine.add(p, sp) for p, sp in zip(prompts, params, strict=True)]
    out: dict[int, list[int]] = {}
    logits: dict[int, list[torch.Tensor]] = {}
    step = 0
    while engine.has_work() or (add_later and any(s >= step for s in add_later)):
        for prompt, sp in (add_later or {}).get(step, []):
            ids.append(engine.add(prompt, sp))
        for ev in engine.step():
            out.setdefault(ev.id, []).append(ev.token)
            if record:
                logits.setdefault(ev.id, []).append(ev.logits)
        step += 1
    return [out[i] for i in ids], [logits.get(i) for i in ids], engine


# --- engine ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["gpt2", "llama"])
def test_engine_cached_decoding_matches_full_recompute(preset):
    model = make_model(50, preset=preset, block_size=96, n_kv_head=2 if preset == "llama" else None)
    prompt = torch.randint(0, 50, (8,), generator=torch.Generator().manual_seed(1)).tolist()
    (tokens,), (logits,), _ = run_engine(model, [prompt], [SamplingParams(max_new_tokens=64, temperature=0)],
                                         batch_size=3, record=True)
    assert len(tokens) == 64
    seq = list(prompt)
    with torch.no_grad():
        for step, (token, got) in enumerate(zip(tokens, logits, strict=True)):
            full = model(torch.tensor([seq]))[0, -1]
            torch.testing.assert_close(got, full, rtol=0, atol=1e-5)
            assert token == int(full.argmax()), f"greedy token differs at step {step}"
            seq.append(token)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_engine_packs_large_weights_and_decodes_the_same_tokens(monkeypatch):
    import copy

    from llmcli import model as model_mod
    from llmcli.model import PackedLinear

    model = make_model(50, preset="llama")
    unpacked = copy.deepcopy(model)
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5]]
    params = [SamplingParams(max_new_tokens=40, temperature=0), SamplingParams(max_new_tokens=40, temperature=0)]
    reference, _, _ = run_engine(unpacked, prompts, params, batch_size=2)
    assert not any(isinstance(m, PackedLinear) for m in unpacked.modules())  # too small to pack
    monkeypatch.setattr(model_mod, "PACK_MIN_WEIGHTS", 0)
    packed, _, _ = run_engine(model, prompts, params, batch_size=2)
    assert isinstance(model.lm_head, PackedLinear)
    assert packed == reference


def test_batched_generation_equals_each_prompt_alone():
    model = make_model(40)
    rng = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 40, (n,), generator=rng).tolist() for n in (3, 17, 9, 1, 30)]
    greedy = [SamplingParams(max_new_tokens=n, temperature=0) for n in (20, 35, 12, 40, 25)]
    seeded = [SamplingParams(max_new_tokens=30, temperature=1.0, top_k=10, seed=s) for s in range(5)]
    for params in (greedy, seeded):
        alone = [run_engine(model, [p], [sp], batch_size=1)[0][0] for p, sp in zip(prompts, params, strict=True)]
        # 2 slots for 5 requests: the queued ones join as others finish.
        batched, _, engine = run_engine(model, prompts, params, batch_size=2)
        assert batched == alone
        assert [len(t) for t in batched] == [sp.max_new_tokens for sp in params]
        assert engine.num_running == 0 and engine.num_waiting == 0


def test_sequence_joining_midway_equals_running_alone():
    model = make_model(40)
    a, b = [1, 2, 3, 4], [7, 8, 9]
    pa = SamplingParams(max_new_tokens=30, temperature=0.9, seed=11)
    pb = SamplingParams(max_new_tokens=20, temperature=0.0)
    alone_a = run_engine(model, [a], [pa], batch_size=1)[0][0]
    alone_b = run_engine(model, [b], [pb], batch_size=1)[0][0]
    both, _, _ = run_engine(model, [a], [pa], batch_size=2, add_later={6: [(b, pb)]})
    assert both == [alone_a, alone_b]


def test_fixed_seed_reproduces_samples_and_seeds_differ():
    model = make_model(40)
    params = SamplingParams(max_new_tokens=40, temperature=1.0, seed=5)
    first = run_engine(model, [[1, 2]], [params], batch_size=1)[0][0]
    again = run_engine(model, [[1, 2]], [params], batch_size=1)[0][0]
    other = run_engine(model, [[1, 2]], [SamplingParams(max_new_tokens=40, temperature=1.0, seed=6)],
                       batch_size=1)[0][0]
    assert first == again and first != other


def test_sliding_past_the_window_keeps_going_and_is_exact():
    model = make_model(30, block_size=16)
    engine = Engine(model, max_batch_size=2, record_logits=True)
    request_id = engine.add(list(range(1, 21)), SamplingParams(max_new_tokens=50, temperature=0))
    request = engine.get(request_id)
    assert request.dropped_prompt_tokens == 4 and len(request.prompt_ids) == 16
    tokens, checked = [], 0
    while engine.has_work():
        for ev in engine.step():
            tokens.append(ev.token)
            if request.slides and request.position == engine.slide_keep and checked < request.slides:
                # Just refilled: the logits are those of the last block_size/2 tokens alone.
                context = request.tokens[-1 - engine.slide_keep:-1]
                with torch.no_grad():
                    full = model(torch.tensor([context]))[0, -1]
                torch.testing.assert_close(ev.logits, full, rtol=0, atol=1e-5)
                checked += 1
    assert len(tokens) == 50 and request.slides >= 3 and checked == request.slides


def test_stop_token_ends_a_sequence_and_vocab_padding_is_never_sampled():
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


def test_cancel_frees_the_slot():
    model = make_model(30)
    engine = Engine(model, max_batch_size=1)
    first = engine.add([1], SamplingParams(max_new_tokens=100, temperature=0))
    second = engine.add([2], SamplingParams(max_new_tokens=3, temperature=0))
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    engine.cancel(first)
    events = engine.step()
    assert [e.id for e in events] == [second]


# --- sampling on crafted logits ----------------------------------------------------------------


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


def test_repetition_penalty_in_the_engine_matches_a_reference_loop():
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


# --- text: incremental decoding and stop strings -----------------------------------------------


def test_stop_text_cuts_exactly_and_holds_back_possible_prefixes():
    s = StopText(["END", "\n\n"])
    assert s.push("hello E") == "hello "  # "E" may start END
    assert s.push("N") == ""
    assert s.push("X more") == "ENX more"
    assert s.push(" \n") == " "
    assert s.push("\nafter") == ""
    assert s.stopped and s.text == "hello ENX more "
    s = StopText(["abc", "bc"])
    assert s.push("xab") == "x"
    assert s.push("c") == ""  # both match; the earlier occurrence wins
    assert s.text == "x"
    s = StopText(["zz"])
    assert s.push("az") == "a" and s.push("", final=True) == "z" and not s.stopped


def test_incremental_decoding_never_splits_a_character():
    text = "naïve café 😀 — ünïcödé ✓ " * 4
    bpe = train_tokenizer(TokenizerConfig(kind="bpe", vocab_size=280, min_frequency=2), [text])
    ids = encode(bpe, text)
    assert len(ids) > len(text.encode()) // 4  # many characters span several tokens
    decoder = IncrementalDecoder(bpe)
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text == decode(bpe, ids)
    assert not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces)  # something had to wait for its last byte


def test_generator_stop_strings_cut_across_tokens(tok):
    model = make_model(tok.get_vocab_size())
    gen = Generator(model, tok, max_batch_size=2)
    params = SamplingParams(max_new_tokens=40, temperature=0, ignore_eot=True)
    (free,) = gen.generate(["ROMEO:"], params)
    assert len(free.completion) >= 20 and free.finish_reason == "length"
    stop = free.completion[10:13]  # three char tokens
    (cut,) = gen.generate(["ROMEO:"], SamplingParams(max_new_tokens=40, temperature=0, ignore_eot=True,
                                                     stop=(stop,)))
    assert cut.completion == free.completion[:free.completion.index(stop)]
    assert cut.finish_reason == "stop" and cut.tokens == free.completion.index(stop) + 3


def test_generator_streams_the_same_text_it_returns(tok):
    model = make_model(tok.get_vocab_size(), block_size=16)
    gen = Generator(model, tok, max_batch_size=3)
    streamed: dict[int, str] = {}
    results = gen.generate(["All:", "", "Speak"], SamplingParams(max_new_tokens=40, temperature=1.0, seed=3),
                           on_event=lambda ev: streamed.__setitem__(ev.id, streamed.get(ev.id, "") + ev.text))
    for r in results:
        assert streamed.get(r.id, "") == r.completion
        assert "<|endoftext|>" not in r.completion


def test_unseen_characters_and_bad_params_are_user_errors(tok):
    gen = Generator(make_model(tok.get_vocab_size()), tok)
    with pytest.raises(UserError, match=r"3 character\(s\) .* never saw: '#' '1' 'Z'"):
        gen.submit("Zap #1 ROMEO")
    with pytest.raises(UserError, match="temperature"):
        gen.submit("ROMEO", SamplingParams(temperature=-1))
    with pytest.raises(UserError, match="top_p must be in"):
        SamplingParams(top_p=0).validate(cli=False)


# --- the command -------------------------------------------------------------------------------


def invoke(*args, input=None):
    return runner.invoke(app, ["generate", *map(str, args)], input=input)


def test_cli_json_output_shape(checkpoint):
    result = invoke(checkpoint, "ROMEO:", "-n", "12", "--num-samples", "3", "--seed", "1", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert set(row) == {"prompt", "completion", "tokens", "prefill_tokens_per_second",
                            "decode_tokens_per_second"}
        assert row["prompt"] == "ROMEO:" and 1 <= row["tokens"] <= 12 and row["decode_tokens_per_second"] >= 0
    again = invoke(checkpoint, "ROMEO:", "-n", "12", "--num-samples", "3", "--seed", "1", "--json")
    assert [json.loads(line)["completion"] for line in again.stdout.splitlines()] == [r["completion"] for r in rows]


def test_cli_text_output_and_stdin_lines(checkpoint):
    result = invoke(checkpoint, "--lines", "-n", "8", "--temperature", "0", "--ignore-eot",
                    input="All:\n\nSpeak\n")
    assert result.exit_code == 0, result.output
    parts = result.stdout.split("---\n")
    assert len(parts) == 2 and parts[0].startswith("All:") and parts[1].startswith("Speak")
    streamed = invoke(checkpoint, "All:", "-n", "8", "--temperature", "0", "--ignore-eot")
    whole = invoke(checkpoint, "All:", "-n", "8", "--temperature", "0", "--ignore-eot", "--no-stream")
    assert streamed.stdout == whole.stdout == parts[0]


def test_cli_empty_prompt_starts_a_document(checkpoint):
    result = invoke(checkpoint, "", "-n", "5", "--seed", "0", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt"] == ""


def test_cli_long_prompt_is_truncated_with_a_warning(checkpoint):
    result = invoke(checkpoint, "Speak, speak. " * 10, "-n", "40", "--seed", "0")
    assert result.exit_code == 0, result.output
    assert "longer than the context window (32 tokens)" in result.stderr


@pytest.mark.parametrize("args,message", [
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
    (["--min-p", "1.5"], "--min-p must be in [0, 1]"),
    (["--min-p", "-0.1"], "--min-p must be in [0, 1]"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["--num-samples", "0"], "--num-samples must be at least 1"),
    (["--stop", ""], "stop string cannot be empty"),
])
def test_cli_bad_options_are_one_line_errors(checkpoint, args, message):
    result = invoke(checkpoint, "ROMEO:", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_bad_inputs_are_one_line_errors(checkpoint, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    (tmp_path / "noweights").mkdir()
    cases = [
        ([checkpoint, "--prompt-file", empty], "is empty"),
        ([checkpoint, "--prompt-file", blank, "--lines"], "is empty"),
        ([checkpoint, "--prompt-file", tmp_path / "missing.txt"], "not found"),
        ([checkpoint, "ROMEO", "--prompt-file", empty], "not both"),
        ([tmp_path / "noweights", "ROMEO"], "no model.safetensors"),
        ([tmp_path / "nothing", "ROMEO"], "checkpoint not found"),
        ([checkpoint, "Zebra 42"], "never saw: '2' '4' 'Z'"),
    ]
    for args, message in cases:
        result = invoke(*args, input="")
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.startswith("error: ") and message in result.stderr, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1
    result = invoke(checkpoint, input="")
    assert result.exit_code == 2 and "stdin is empty" in result.stderr
