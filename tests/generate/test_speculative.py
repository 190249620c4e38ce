"""Speculative decoding: greedy output = plain greedy (draft and prompt lookup), the rejection rule
keeps the target's distribution (chi-square on a tiny vocabulary), and the refusals."""

from __future__ import annotations

import collections
import itertools

import pytest
import torch

from llmcli.errors import UserError
from llmcli.generate.engine import Engine
from llmcli.generate.speculative import greedy_accept, lookup_proposal, rejection_accept
from llmcli.generate.speculator import Speculation
from llmcli.options.sampling import SamplingParams

scipy_stats = pytest.importorskip("scipy.stats")


def run(engine, prompts, params):
    ids = [engine.add(p, sp) for p, sp in zip(prompts, params, strict=True)]
    out: dict[int, list[int]] = collections.defaultdict(list)
    while engine.has_work():
        for ev in engine.step():
            out[ev.id].append(ev.token)
    return [out[i] for i in ids]


def test_lookup_and_greedy_rules():
    assert lookup_proposal([1, 2, 3, 9, 1, 2], k=3, max_ngram=2) == [3, 9, 1]
    assert lookup_proposal([5, 1, 2, 7, 1, 2, 8, 2], k=2, max_ngram=3) == [8, 2]  # latest 1-gram "2"
    assert lookup_proposal([1, 2, 3], k=2, max_ngram=2) == []
    assert greedy_accept([4, 5, 6], [4, 5, 7, 1]) == [4, 5, 7]
    assert greedy_accept([4, 5], [4, 5, 9]) == [4, 5, 9]
    assert greedy_accept([], [3]) == [3]


@pytest.fixture
def models(make_model):
    """A target and a different, smaller draft over the same 40-token vocabulary (block 32: the
    window slides within the runs below)."""
    target = make_model(40, block_size=32)
    draft = make_model(40, block_size=24, seed=3, n_layer=1, d_model=16, n_head=2)
    return target, draft


@pytest.mark.parametrize("mode", ["draft", "same-model draft", "prompt lookup", "value embeds"])
def test_speculative_greedy_equals_plain_greedy(models, make_model, run_engine, mode):
    target, draft = models
    if mode == "same-model draft":  # a window the runs never leave: the draft's context is the target's
        target, draft = make_model(40, block_size=128), make_model(40, block_size=128)
    if mode == "value embeds":  # rolled-back positions are rewritten with their tokens' value embeddings
        target = make_model(40, block_size=32, value_embeds=1)
    rng = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 40, (n,), generator=rng).tolist() for n in (5, 20, 1, 31)]
    prompts.append([1, 2, 3, 4] * 6)  # repetitive: prompt lookup proposes
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in (70, 25, 40, 10, 50)]
    plain, _ = run_engine(target, prompts, params, batch_size=2)
    spec = {"draft": Speculation(tokens=4, draft=draft), "prompt lookup": Speculation(tokens=3, lookup=3),
            "same-model draft": Speculation(tokens=5, draft=draft), "value embeds": Speculation(tokens=4, draft=draft)}[mode]
    engine = Engine(target, speculation=spec, max_batch_size=2)
    assert run(engine, prompts, params) == plain
    proposed, accepted = engine.stats.proposed_tokens, engine.stats.accepted_tokens
    assert proposed > 0 and 0 <= accepted <= proposed
    if mode == "same-model draft":
        assert accepted == proposed  # the target agrees with itself


def chi_square_pvalue(counts: collections.Counter, probs: dict) -> float:
    """p-value of observed `counts` against `probs` (cells with expectation < 5 pooled)."""
    total = sum(counts.values())
    cells = sorted(probs, key=lambda c: -probs[c])
    observed, expected, pool_o, pool_e = [], [], 0, 0.0
    for c in cells:
        if probs[c] * total >= 5:
            observed.append(counts[c])
            expected.append(probs[c] * total)
        else:
            pool_o, pool_e = pool_o + counts[c], pool_e + probs[c] * total
    if pool_e > 0:
        observed.append(pool_o)
        expected.append(pool_e)
    scale = sum(observed) / sum(expected)
    return float(scipy_stats.chisquare(observed, [e * scale for e in expected]).pvalue)


@pytest.mark.parametrize("deterministic", [False, True])
def test_rejection_rule_emits_the_target_distribution(deterministic):
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    firsts, seconds = collections.Counter(), collections.Counter()
    for _ in range(8000):
        guess = [2] if deterministic else [int(torch.multinomial(q[0], 1, generator=gen))]
        out = rejection_accept(guess, p, None if deterministic else q, gen)
        firsts[out[0]] += 1
        if len(out) == 2:
            seconds[out[1]] += 1
    assert chi_square_pvalue(firsts, dict(enumerate(p[0].tolist()))) > 1e-3
    assert chi_square_pvalue(seconds, dict(enumerate(p[1].tolist()))) > 1e-3  # the bonus token


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["draft", "prompt lookup"])
def test_sampled_speculative_tokens_follow_the_target(make_model, mode):
    """The joint distribution of the first three sampled tokens against the target's own, computed
    exactly; tokens 2 and 3 come out of one speculative round when its guess is kept."""
    vocab = 3
    target = make_model(vocab, std=0.3)
    draft = make_model(vocab, seed=5, std=0.3)
    prompt = [0, 1, 2, 0, 1]
    spec = Speculation(tokens=2, draft=draft) if mode == "draft" else Speculation(tokens=2, lookup=2)
    engine = Engine(target, speculation=spec, max_batch_size=8)
    n = 2000
    params = [SamplingParams(max_new_tokens=3, temperature=1.0, seed=s) for s in range(n)]
    samples = collections.Counter(tuple(t) for t in run(engine, [prompt] * n, params))
    probs = {}
    with torch.no_grad():
        for seq in itertools.product(range(vocab), repeat=3):
            logits = target(torch.tensor([prompt + list(seq[:2])]))[0, -3:].softmax(-1)
            probs[seq] = float(logits[0, seq[0]] * logits[1, seq[1]] * logits[2, seq[2]])
    assert engine.stats.accepted_tokens > 0 and engine.stats.proposed_tokens > engine.stats.accepted_tokens
    assert chi_square_pvalue(samples, probs) > 1e-3


def test_refusals(make_model, tiny_recurrent):
    target = make_model(40)
    with pytest.raises(UserError, match="cannot be rolled back"):
        Engine(tiny_recurrent("lstm", 40), speculation=Speculation(lookup=2))
    with pytest.raises(UserError, match="the draft .* cannot be rolled back"):
        Engine(target, speculation=Speculation(draft=tiny_recurrent("gru", 40)))
    engine = Engine(target, speculation=Speculation(lookup=2))
    with pytest.raises(UserError, match="repetition penalty"):
        engine.add([1, 2], SamplingParams(repetition_penalty=1.2))


# --- through the CLI --------------------------------------------------------------------------


@pytest.fixture
def runs(tmp_path, tiny_model, char_tokenizer, write_run):
    vocab = char_tokenizer.get_vocab_size()
    target = write_run(tmp_path / "target", tiny_model(vocab, std=0.15, block_size=48), char_tokenizer)
    draft = write_run(tmp_path / "draft", tiny_model(vocab, seed=2, std=0.15, n_layer=1), char_tokenizer)
    return target, draft


def test_cli_speculative_greedy_equals_plain_and_reports_acceptance(runs, cli):
    import json

    target, draft = runs
    base = ("generate", target, "--lines", "--json", "-n", "60", "--temperature", "0", "--ignore-eot")
    prompts = "ROMEO:\nthe the the the\n"
    plain = cli(*base, input=prompts)
    assert plain.exit_code == 0, plain.output
    for extra in (("--draft", draft, "--draft-tokens", "3"), ("--prompt-lookup", "2")):
        got = cli(*base, *extra, input=prompts)
        assert got.exit_code == 0, got.output
        rows = [json.loads(line) for line in got.stdout.splitlines()]
        assert [r["completion"] for r in rows] == [json.loads(line)["completion"] for line in plain.stdout.splitlines()]
        assert all(r["acceptance_rate"] is None or 0 <= r["acceptance_rate"] <= 1 for r in rows)
        assert "proposed tokens accepted" in got.stderr


def test_cli_refusals(tmp_path, runs, cli, one_line_error, tiny_model, tiny_recurrent, write_run, char_tokenizer):
    from llmcli.config import TokenizerConfig
    from llmcli.tokenizer import train_tokenizer

    target, draft = runs
    other_tok = train_tokenizer(TokenizerConfig(kind="char"), ["abcdefghij klmnop ROMEO:"])
    other = write_run(tmp_path / "other", tiny_model(other_tok.get_vocab_size()), other_tok)
    one_line_error(cli("generate", target, "ROMEO:", "--draft", other), "its tokenizer differs", alone=True)
    one_line_error(cli("generate", target, "x", "--draft", draft, "--prompt-lookup", "2"), "give one", alone=True)
    one_line_error(cli("generate", target, "x", "--prompt-lookup", "2", "--beams", "2"), "do not combine",
                   alone=True)
    one_line_error(cli("generate", target, "x", "--prompt-lookup", "2", "--repetition-penalty", "1.2"),
                   "--repetition-penalty does not combine with speculative decoding", alone=True)
    lstm = write_run(tmp_path / "lstm", tiny_recurrent("lstm", char_tokenizer.get_vocab_size()), char_tokenizer)
    one_line_error(cli("generate", lstm, "x", "--prompt-lookup", "2"), "cannot be rolled back", alone=True)
    one_line_error(cli("generate", target, "x", "--draft", lstm), "the draft (model.arch=lstm)", alone=True)


# --- batched verification -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["draft", "prompt lookup"])
@pytest.mark.parametrize("paged", [False, True], ids=["slot cache", "paged cache"])
def test_batched_verification_equals_each_row_alone(models, mode, paged):
    """Rows verified in one forward accept different numbers of guesses, and each row's tokens are
    those of running it alone (greedy and seeded sampling)."""
    target, draft = models
    spec = Speculation(tokens=4, draft=draft) if mode == "draft" else Speculation(tokens=3, lookup=2)
    cache = {"kv_blocks": 40, "block_len": 4} if paged else {}
    rng = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 40, (n,), generator=rng).tolist() for n in (6, 20)] + [[1, 2, 3, 4] * 5, [7, 8] * 4]
    for params in ([SamplingParams(max_new_tokens=n, temperature=0) for n in (40, 25, 50, 30)],
                   [SamplingParams(max_new_tokens=30, temperature=0.8, top_k=8, seed=s) for s in range(4)]):
        alone = [run(Engine(target, speculation=spec, max_batch_size=1, **cache), [p], [sp])[0]
                 for p, sp in zip(prompts, params, strict=True)]
        engine = Engine(target, speculation=spec, max_batch_size=4, **cache)
        kept, round_ = [], engine.runner.speculator.round

        def recorded(rows, round_=round_, kept=kept):  # what each row of each verification forward emitted
            out = round_(rows)
            kept.append([len(tokens) for tokens in out[0]])
            return out

        engine.runner.speculator.round = recorded
        batched = run(engine, prompts, params)
        assert batched == alone
        assert any(len(set(counts)) > 1 for counts in kept)  # rows of one forward kept different counts
        if params[0].greedy:
            plain = run(Engine(target, max_batch_size=4, **cache), prompts, params)
            assert batched == plain
