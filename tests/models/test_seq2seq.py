"""The sequence-to-sequence families: padding is masked, cached decoding equals a full recompute,
one beam is greedy, and the engine's rows equal decoding alone."""

from __future__ import annotations

import pytest
import torch

from llmcli.generate.beam import BeamSearch, BeamSettings
from llmcli.generate.engine import Engine
from llmcli.models.base import Rows
from llmcli.options.sampling import SamplingParams
from tests.conftest import SEQ2SEQ_ARCHES

EOT = 0  # the start and end token of these tests' target side


def _sources(count: int, seed: int = 1, vocab: int = 30) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (int(n),), generator=g).tolist() + [0]
            for n in torch.randint(2, 18, (count,), generator=g)]


def _padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out, torch.tensor([len(r) for r in rows])


def _greedy(model, source: list[int], steps: int) -> list[int]:
    """Greedy decoding by full recomputation: the whole target prefix every step, no cache."""
    ids = [EOT]
    for _ in range(steps):
        logits = model(torch.tensor([ids]), source=torch.tensor([source]))
        ids.append(int(logits[0, -1].argmax()))
    return ids[1:]


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHES)
def test_padding_never_changes_outputs(arch, tiny_seq2seq):
    """A pair's logits are the same alone and in a padded batch, whatever the padding holds."""
    model = tiny_seq2seq(arch, std=0.2)
    sources, targets = _sources(4), _sources(4, seed=2, vocab=40)
    for pad in (0, 7):
        src, src_len = _padded(sources, pad)
        tgt, _ = _padded(targets, pad)
        batch = model(tgt, source=src, source_lengths=src_len)
        for i, (s, t) in enumerate(zip(sources, targets, strict=True)):
            alone = model(torch.tensor([t]), source=torch.tensor([s]))
            torch.testing.assert_close(batch[i, :len(t)], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHES)
def test_cached_decode_equals_full_recompute(arch, tiny_seq2seq):
    """encode once + one token at a time through the decode state (the cross-attention keys and
    values or encoder states kept per slot) gives teacher forcing's logits, for rows in any slot."""
    model = tiny_seq2seq(arch, std=0.2)
    sources, targets = _sources(3), [[EOT, *t[:-1]] for t in _sources(3, seed=3, vocab=40)]
    state = model.new_decode_state(5, 24)
    slots = [4, 1, 2]
    src, src_len = _padded(sources, 5)
    with torch.no_grad():
        model.encode(src, state=state, rows=Rows(slots, [0, 0, 0], src_len.tolist()))
        for slot, s, t in zip(slots, sources, targets, strict=True):
            full = model(torch.tensor([t]), source=torch.tensor([s]))[0]
            steps = [model(torch.tensor([[tok]]), state=state, rows=Rows([slot], [pos], [1]))[0, 0]
                     for pos, tok in enumerate(t)]
            torch.testing.assert_close(torch.stack(steps), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHES)
def test_one_beam_is_greedy(arch, tiny_seq2seq):
    model = tiny_seq2seq(arch, std=0.3)
    sources = _sources(3)
    search = BeamSearch(model, batch_size=2, beams=1, eos_id=EOT)
    found = search.run([[EOT]] * 3, BeamSettings(1, 10), sources)
    for source, (best,) in zip(sources, found, strict=True):
        expected = _greedy(model, source, 10)
        if EOT in expected:
            expected = expected[:expected.index(EOT)]
        assert best.tokens == expected


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHES)
def test_beams_find_at_least_greedys_score(arch, tiny_seq2seq):
    """More beams never end with a worse best hypothesis than greedy (length_penalty=0: log-probs)."""
    model = tiny_seq2seq(arch, std=0.3)
    sources = _sources(3, seed=4)
    greedy = BeamSearch(model, batch_size=3, beams=1, eos_id=EOT).run([[EOT]] * 3, BeamSettings(1, 8, 0.0), sources)
    wide = BeamSearch(model, batch_size=3, beams=4, eos_id=EOT).run([[EOT]] * 3, BeamSettings(4, 8, 0.0), sources)
    for (g,), (w,) in zip(greedy, wide, strict=True):
        assert w.logprob >= g.logprob - 1e-5


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHES)
def test_engine_rows_equal_decoding_alone(arch, tiny_seq2seq):
    """Sources joining a running batch (fewer slots than requests) decode as they would alone."""
    model = tiny_seq2seq(arch, std=0.3)
    sources = _sources(5, seed=5)
    params = SamplingParams(max_new_tokens=9, temperature=0)

    def run(batch: list[list[int]], slots: int) -> list[list[int]]:
        engine = Engine(model, max_batch_size=slots)
        ids = [engine.add([EOT], params, stop_token_ids=[EOT], source_ids=s) for s in batch]
        out: dict[int, list[int]] = {i: [] for i in ids}
        while engine.has_work():
            for ev in engine.step():
                out[ev.id].append(ev.token)
        return [out[i] for i in ids]

    together = run(sources, 3)
    for source, tokens in zip(sources, together, strict=True):
        assert run([source], 1) == [tokens]
        expected = _greedy(model, source, 9)
        assert tokens == (expected[:expected.index(EOT) + 1] if EOT in expected else expected)


def test_a_source_longer_than_the_encoder_is_refused(tiny_seq2seq):
    model = tiny_seq2seq()
    with pytest.raises(ValueError, match="at most 20 tokens"):
        model(torch.tensor([[EOT]]), source=torch.ones(1, 21, dtype=torch.long))


@pytest.mark.parametrize("arch", SEQ2SEQ_ARCHES)
def test_beam_hypotheses_stop_at_their_first_end_token(arch, tiny_seq2seq):
    """No hypothesis holds the end token, and each one's log-probability is teacher forcing's over
    its tokens plus one end token: it ended the first time it chose the end token (whose logit is
    raised here, so that many beams end early and at different lengths)."""
    model = tiny_seq2seq(arch, std=0.3)
    with torch.no_grad():
        model.lm_head.bias[EOT] += 2.5
    sources = _sources(4, seed=6)
    search = BeamSearch(model, batch_size=4, beams=4, eos_id=EOT)
    found = search.run([[EOT]] * 4, BeamSettings(4, 12, returns=4), sources)
    lengths = set()
    for source, hypotheses in zip(sources, found, strict=True):
        assert len(hypotheses) == 4
        for h in hypotheses:
            assert EOT not in h.tokens
            ended = h.tokens + [EOT] if h.finished else h.tokens
            logits = model(torch.tensor([[EOT, *ended[:-1]]]), source=torch.tensor([source]))[0]
            expected = logits.log_softmax(-1)[torch.arange(len(ended)), torch.tensor(ended)].sum().item()
            assert h.logprob == pytest.approx(expected, abs=1e-4)
            lengths.add((h.finished, len(h.tokens)))
    assert len({n for finished, n in lengths if finished}) >= 2
