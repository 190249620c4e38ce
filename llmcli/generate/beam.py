"""Beam search over a model's decode state, for seq2seq and decoder-only models alike.

It runs on the engine's runner (runner.py): its decode state (a slot cache), its packed weights
and its forwards. Each request holds `beams` consecutive slots. It starts with one live beam: its
source is encoded into the first slot (seq2seq) and its prompt prefilled there. Every step scores
each live beam's continuations (sum of token log-probabilities), takes the best 2 x beams of them,
and keeps the best `beams` that do not end the sequence; an end token among the best `beams` files
a finished hypothesis scored sum / length^length_penalty (length counts the end token). The slots
are then reordered to follow their beams (`copy_slots`: a hypothesis that forks copies its
parent's KV cache or recurrent state, and its encoder memory) and every live beam of every request
advances by one token in one forward. A request is done when it has `beams` finished hypotheses
and, unless `early_stopping`, no live beam can still score better than the worst of them (its
score over the current length); or when it reaches max_new_tokens, when its live beams are
finished as they stand. Requests join and leave the running set as slots free up, as in the
engine. One beam is greedy decoding.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from llmcli.generate.runner import ModelRunner, encode_sources, prefill
from llmcli.models.base import LanguageModel


@dataclass(frozen=True)
class BeamSettings:
    beams: int
    max_new_tokens: int
    length_penalty: float = 1.0
    early_stopping: bool = False
    returns: int = 1  # hypotheses kept per request, best first


@dataclass
class Hypothesis:
    tokens: list[int]  # the generated tokens, the end token left out
    logprob: float  # their summed log-probability (the end token's included)
    score: float  # logprob / length ** length_penalty
    finished: bool  # ended with the end token (else cut at max_new_tokens)


@dataclass
class _Group:
    index: int  # which request
    base: int  # its first slot
    beams: list[list[int]] = field(default_factory=list)  # live beams' tokens
    scores: list[float] = field(default_factory=list)
    done: list[Hypothesis] = field(default_factory=list)
    position: int = 0  # tokens in each live beam's slot
    parents: list[int] = field(default_factory=list)  # the beam each live beam continues


class BeamSearch:
    """Beam search for many requests at once (see the module docstring). `vocab_size` masks model
    ids beyond the tokenizer's; `eos_id` ends a hypothesis."""

    def __init__(self, model: LanguageModel, *, batch_size: int, beams: int, eos_id: int, vocab_size: int | None = None):
        self.model, self.beams, self.eos = model.eval(), beams, eos_id
        self.runner = ModelRunner(model, slots=batch_size * beams, vocab_size=vocab_size)
        self.device, self.vocab = self.runner.device, self.runner.vocab_size
        self.batch_size = batch_size
        self.tokens = 0  # beam tokens decoded, over every run

    @torch.inference_mode()
    def run(self, prompts: Sequence[Sequence[int]], settings: BeamSettings,
            sources: Sequence[Sequence[int]] | None = None) -> list[list[Hypothesis]]:
        """The best `settings.returns` hypotheses of each prompt (its source too, for seq2seq)."""
        waiting = deque(range(len(prompts)))
        free = list(range(self.batch_size - 1, -1, -1))
        running: list[_Group] = []
        results: list[list[Hypothesis]] = [[] for _ in prompts]
        limit = self._limit(prompts, settings)
        while waiting or running:
            admitted = []
            while waiting and free:
                admitted.append(_Group(waiting.popleft(), free.pop() * self.beams))
            logits = self._start(admitted, prompts, sources) if admitted else None
            stepped = self._advance(running) if running else None
            for groups, out in ((running, stepped), (admitted, logits)):
                for group, rows in zip(groups, out or [], strict=True):
                    self._select(group, rows, settings, limit[group.index])
            finished = [g for g in running + admitted if not g.beams]
            for group in finished:
                results[group.index] = sorted(group.done, key=lambda h: -h.score)[:settings.returns]
                free.append(group.base // self.beams)
            running = [g for g in running + admitted if g.beams]
            self._reorder(running)
        return results

    def _limit(self, prompts: Sequence[Sequence[int]], settings: BeamSettings) -> list[int]:
        context = self.model.context_length
        if context is None:
            return [settings.max_new_tokens] * len(prompts)
        return [max(1, min(settings.max_new_tokens, context - len(p))) for p in prompts]

    def _start(self, groups: list[_Group], prompts, sources) -> list[torch.Tensor]:
        """Encode each new request's source and prefill its prompt into its first slot: [1, V] each."""
        runner, slots = self.runner, [g.base for g in groups]
        if sources is not None:
            encode_sources(runner.decoder, runner.state, [sources[g.index] for g in groups], slots, self.device)
        toks = [list(prompts[g.index]) for g in groups]
        last = prefill(runner.decoder, runner.state, toks, slots, [0] * len(toks), self.device)
        for g, t in zip(groups, toks, strict=True):
            g.beams, g.scores, g.position = [[]], [0.0], len(t)
        return [row[None] for row in last]

    def _advance(self, groups: list[_Group]) -> list[torch.Tensor]:
        """One forward for every live beam of every running request: [live beams, V] per request."""
        slots = [g.base + b for g in groups for b in range(len(g.beams))]
        tokens = [beam[-1] for g in groups for beam in g.beams]
        out = self.runner.decode(tokens, slots, [g.position for g in groups for _ in g.beams])
        for g in groups:
            g.position += 1
        self.tokens += len(slots)
        return list(out.split([len(g.beams) for g in groups]))

    def _select(self, group: _Group, logits: torch.Tensor, settings: BeamSettings, limit: int) -> None:
        """The next live beams of one request (and their parents), and its finished hypotheses."""
        logits = logits.float()
        logits[:, self.vocab:] = float("-inf")
        totals = logits.log_softmax(-1) + torch.tensor(group.scores, device=logits.device)[:, None]
        k = min(2 * settings.beams, totals.numel())
        best, flat = totals.flatten().topk(k)
        vocab = logits.shape[-1]
        beams, scores, parents = [], [], []
        for rank, (score, index) in enumerate(zip(best.tolist(), flat.tolist(), strict=True)):
            parent, token = divmod(index, vocab)
            tokens = group.beams[parent]
            if token == self.eos:
                if rank < settings.beams:
                    group.done.append(Hypothesis(tokens, score, score / (len(tokens) + 1) ** settings.length_penalty, True))
                continue
            if len(beams) < settings.beams:
                beams.append(tokens + [token])
                scores.append(score)
                parents.append(parent)
        length = len(beams[0]) if beams else 0
        if beams and length >= limit:  # out of room: the live beams end here as they are
            group.done += [Hypothesis(b, s, s / len(b) ** settings.length_penalty, False)
                           for b, s in zip(beams, scores, strict=True)]
            beams = []
        elif beams and len(group.done) >= settings.beams:
            worst = min(h.score for h in group.done)
            if settings.early_stopping or max(scores) / length ** settings.length_penalty <= worst:
                beams = []
        group.beams, group.scores, group.parents = beams, scores, parents

    def _reorder(self, groups: list[_Group]) -> None:
        """Make each live beam's slot hold its parent's state, then feed it the beam's last token."""
        sources, targets = [], []
        for g in groups:
            for b, parent in enumerate(g.parents):
                if parent != b:
                    sources.append(g.base + parent)
                    targets.append(g.base + b)
        if sources:
            self.runner.state.copy_slots(sources, targets)
