"""Speculative decoding as a runner strategy (`generate` or `serve` with `--draft RUN` or `--prompt-lookup N`).

Each decoding row of a step is one speculative round (the rules are in speculative.py): up to
`lookahead` guesses (the scheduler's room for this row: its limits, the step's token budget, its
cache blocks), then one target forward for every row at once over its last token and its guesses,
right-padded to the longest, and each row keeps its own number of guesses plus one token of the
target's. Rows of a batch accept different counts; a rejected guess's keys and values stay in the
cache past the row's position, where attention never reads them and the next step overwrites
them, so nothing is rolled back (slot or paged cache alike).

A draft model keeps its own decode state, one slot per target slot, holding a window of the
sequence and the guesses it made; after a round its slot keeps what the sequence still has. Its
context may be shorter than the target's: past it, its slot restarts from the last half. Guesses
are drawn (or, greedy, taken) from the draft's distribution after the request's sampling filters;
prompt lookup guesses the tokens that followed the latest earlier occurrence of the last n-gram.
Greedy output is token for token the plain engine's. Requests with a repetition penalty are
refused (it would change between guesses), as are models whose decode state cannot be rolled back
to a position (a recurrent state).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmcli.device import packed_for_decoding
from llmcli.errors import UserError
from llmcli.generate.runner import batched
from llmcli.generate.sampling import sampling_probs
from llmcli.generate.scheduler import Decode
from llmcli.generate.speculative import draw, greedy_accept, lookup_proposal, rejection_accept
from llmcli.models.base import LanguageModel, Rows
from llmcli.options.sampling import SamplingParams, SpeculationOptions

if TYPE_CHECKING:
    from llmcli.generate.runner import ModelRunner
    from llmcli.generate.scheduler import Sequence as Seq


@dataclass(frozen=True)
class Speculation:
    """What proposes: a `draft` model, else prompt lookup over n-grams up to `lookup`; `tokens` = k,
    the most guesses per round."""

    tokens: int = 4
    draft: LanguageModel | None = None
    lookup: int = 0

    def start(self, runner: ModelRunner) -> Speculator:
        return Speculator(self, runner)


def load_speculation(spec: SpeculationOptions, target_dir: Path, tokenizer: Any, device: torch.device,
                     dtype: torch.dtype) -> Speculation:
    """--draft / --prompt-lookup as a Speculation (generate and serve); a draft with another
    tokenizer than the target's is refused."""
    from llmcli.load import load_checkpoint

    if spec.draft is None:
        return Speculation(tokens=spec.draft_tokens, lookup=spec.prompt_lookup)
    draft = load_checkpoint(spec.draft, device, dtype)
    if draft.tokenizer.to_str() != tokenizer.to_str():
        raise UserError(f"--draft {spec.draft}: its tokenizer differs from {target_dir}'s; speculative decoding "
                        "needs the same token ids in both models")
    return Speculation(tokens=spec.draft_tokens, draft=draft.model)


def check_speculative(model: LanguageModel, what: str) -> None:
    """Refuse a model speculative decoding cannot drive, naming why."""
    if model.task != "lm" or not model.rewinds_decode_state:
        raise UserError(f"{what} (model.arch={model.config.arch}) cannot decode speculatively: its decode state "
                        "cannot be rolled back to a position (a transformer decoder's KV cache can)")


def distributions(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """A request's sampling distribution [n, V] at each row of `logits` [n, V]."""
    n = logits.shape[0]

    def rows(value, dtype):
        return torch.full((n,), value, dtype=dtype, device=logits.device)

    return sampling_probs(logits, rows(params.temperature, torch.float32), rows(params.top_k, torch.long),
                          rows(params.top_p, torch.float32), rows(params.min_p, torch.float32))


class Speculator:
    """One speculative round per decoding row, all rows in one verification forward (module docstring)."""

    def __init__(self, spec: Speculation, runner: ModelRunner):
        check_speculative(runner.model, "the model")
        self.spec, self.runner = spec, runner
        self.draft = DraftModel(spec.draft, runner) if spec.draft is not None else None

    def admit(self, seq: Seq) -> None:
        if self.draft is not None:
            self.draft.forget(seq.slot)

    def round(self, rows: Sequence[Decode]) -> tuple[list[list[int]], list[int]]:
        """(the tokens each row emits: its kept guesses and one of the target's; the guesses made)."""
        guesses, q = self._propose(rows)
        # 0) a constrained row's guesses stop at the first its format forbids; the masks along them
        allowed: list[torch.Tensor | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            constraint = row.seq.request.constraint
            if constraint is not None:
                guesses[i], allowed[i] = constraint.masks_along(guesses[i])
                if q is not None and q[i] is not None:
                    q[i] = q[i][:len(guesses[i])]
        # 1) one forward: each row's last token and its guesses, right-padded to the longest (rows
        #    whose padding would pass the context go in a forward of their own)
        logits: list[torch.Tensor] = [None] * len(rows)
        for group in batched(list(range(len(rows))), lambda i: 1 + len(guesses[i]), 1 << 62,
                             lambda i: rows[i].seq.cached, self.runner.model.context_length):
            for i, row_logits in zip(group, self._verify([rows[i] for i in group], [guesses[i] for i in group]),
                                     strict=True):
                logits[i] = row_logits
        # 2) each row keeps its own number of guesses
        out = []
        for i, (row, guess) in enumerate(zip(rows, guesses, strict=True)):
            r, row_logits = row.seq.request, logits[i][:1 + len(guess)]
            if allowed[i] is not None:  # the target checks each position against the format's mask there
                row_logits = row_logits.masked_fill(~allowed[i].to(row_logits.device), -math.inf)
            if r.params.greedy:
                out.append(greedy_accept(guess, row_logits.argmax(-1).tolist()))
            else:
                p = distributions(row_logits, r.params)
                out.append(rejection_accept(guess, p, q[i] if q is not None else None, r.generator))
        if self.draft is not None:
            for row, tokens in zip(rows, out, strict=True):
                self.draft.keep(row.seq, len(row.seq.request.tokens) + len(tokens) - 1)
        return out, [len(g) for g in guesses]

    def _verify(self, rows: Sequence[Decode], guesses: list[list[int]]) -> torch.Tensor:
        """The target's logits [n, longest, V] over each row's last token and its guesses."""
        runner = self.runner
        idx = torch.zeros(len(rows), 1 + max(map(len, guesses)), dtype=torch.long)
        for i, (row, guess) in enumerate(zip(rows, guesses, strict=True)):
            idx[i, :1 + len(guess)] = torch.tensor([row.seq.request.tokens[-1], *guess])
        where = Rows([r.seq.slot for r in rows], [r.seq.cached for r in rows], [1 + len(g) for g in guesses],
                     [r.seq.request.adapter for r in rows])
        return runner.masked(runner.decoder(idx.to(runner.device), state=runner.state, rows=where))

    def _propose(self, rows: Sequence[Decode]) -> tuple[list[list[int]], list[torch.Tensor] | None]:
        """Each row's guesses and, from a draft, their distributions (None: deterministic guesses)."""
        if self.draft is None:
            return [lookup_proposal(r.seq.request.tokens, r.lookahead, self.spec.lookup) for r in rows], None
        return self.draft.propose(rows)


class DraftModel:
    """The draft's decode state: slot s holds (sequence + guesses)[offset:offset + held] of the
    sequence in target slot s (module docstring)."""

    def __init__(self, model: LanguageModel, runner: ModelRunner):
        check_speculative(model, "the draft")
        self.runner = runner
        self.model = packed_for_decoding(model.eval())
        self.context = model.context_length
        self.state = model.new_decode_state(runner.slots, self.context, dtype=runner.dtype, device=runner.device)
        self.held = [(0, 0)] * runner.slots

    def forget(self, slot: int) -> None:
        self.held[slot] = (0, 0)

    def keep(self, seq: Seq, length: int) -> None:
        """After a round: the slot keeps what the sequence's first `length` tokens still have."""
        offset, held = self.held[seq.slot]
        held = min(held, length - offset)
        self.held[seq.slot] = (offset, held) if held > 0 else (0, 0)

    def propose(self, rows: Sequence[Decode]) -> tuple[list[list[int]], list[torch.Tensor] | None]:
        """Up to each row's lookahead guesses, one draft forward per guess for every row still guessing."""
        runner = self.runner
        guesses: list[list[int]] = [[] for _ in rows]
        dists: list[list[torch.Tensor]] = [[] for _ in rows]
        ended = [False] * len(rows)  # a constrained row whose guesses reached its format's end
        for step in range(max(r.lookahead for r in rows)):
            active = [i for i, r in enumerate(rows) if r.lookahead > step and not ended[i]]
            if not active:
                break
            logits = runner.masked(self._forward([rows[i].seq for i in active], [guesses[i] for i in active]))
            for row_logits, i in zip(logits, active, strict=True):
                r = rows[i].seq.request
                if r.constraint is not None:  # the draft guesses only what the format allows
                    row_logits = row_logits.masked_fill(~r.constraint.allowed().to(row_logits.device), -math.inf)
                if r.params.greedy:
                    guesses[i].append(int(row_logits.argmax()))
                else:
                    dists[i].append(distributions(row_logits[None], r.params)[0])
                    guesses[i].append(draw(dists[i][-1], r.generator))
                if r.constraint is not None:
                    r.constraint.advance(guesses[i][-1])
                    ended[i] = guesses[i][-1] in r.stop_token_ids or r.constraint.done
        for i, row in enumerate(rows):  # the formats' matchers go back to where the sequences are
            if row.seq.request.constraint is not None:
                row.seq.request.constraint.rollback(len(guesses[i]))
        sampled = any(not r.seq.request.params.greedy for r in rows)
        return guesses, [torch.stack(d) if d else None for d in dists] if sampled else None

    def _forward(self, seqs: list[Seq], guesses: list[list[int]]) -> torch.Tensor:
        """The draft's next-token logits [n, V] after each sequence and its guesses so far: what its
        slot lacks is fed from where the slot stops; past its window, the slot restarts with the last half."""
        feeds, starts = [], []
        for seq, guess in zip(seqs, guesses, strict=True):
            tokens = seq.request.tokens
            total = len(tokens) + len(guess)
            offset, held = self.held[seq.slot]
            if self.context is not None and total - offset > self.context:
                offset, held = total - min(total, max(1, self.context // 2)), 0
            first = offset + held
            feed = tokens[first:] + guess if first < len(tokens) else guess[first - len(tokens):]
            feeds.append(feed)
            starts.append(held)
            self.held[seq.slot] = (offset, held + len(feed))
        out = []
        for group in batched(list(range(len(seqs))), lambda i: len(feeds[i]), 1 << 62, lambda i: starts[i],
                             self.context):
            idx = torch.zeros(len(group), max(len(feeds[i]) for i in group), dtype=torch.long)
            for row, i in enumerate(group):
                idx[row, :len(feeds[i])] = torch.tensor(feeds[i])
            rows = Rows([seqs[i].slot for i in group], [starts[i] for i in group], [len(feeds[i]) for i in group])
            logits = self.model(idx.to(self.runner.device), state=self.state, rows=rows)
            last = torch.tensor([len(feeds[i]) - 1 for i in group], device=logits.device)
            out.append(logits[torch.arange(len(group), device=logits.device), last])
        return torch.cat(out)
