"""The engine with speculative decoding (`generate` or `serve` with `--draft RUN` or `--prompt-lookup N`).

Each step advances every running sequence by one speculative round (speculative.py): a proposal
of up to k tokens, one target forward over the sequence's last token and the proposal, and the
accepted tokens plus one more emitted as consecutive `TokenEvent`s of that sequence. Rejected
positions are rolled back in the target's KV cache (and in the draft's), so the cache always holds
exactly the sequence's tokens. Sequences run one at a time within a step: this is the batch-1
latency tool; a batch of different acceptance lengths is left to the plain engine.

The proposal never reaches past the context window: near its end the round shrinks, and at it the
slot is refilled with the last half as the plain engine does, so greedy output is token for token
the plain engine's. Requests with a repetition penalty are refused (it would change between
guesses), as are models whose decode state cannot be rolled back, and a paged KV cache (rejected
tokens are rolled back per slot).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from llmcli.checkpoint import load_for_inference
from llmcli.device import pack_for_cpu_decoding
from llmcli.errors import UserError
from llmcli.generate.engine import Engine, Request, TokenEvent, prefill
from llmcli.generate.sampling import sampling_probs
from llmcli.generate.speculative import draw, greedy_accept, lookup_proposal, rejection_accept
from llmcli.models.base import LanguageModel, Rows
from llmcli.options.sampling import SamplingParams, SpeculationOptions


@dataclass(frozen=True)
class Speculation:
    """What proposes: a `draft` model, else prompt lookup over n-grams up to `lookup`; `tokens` = k."""

    tokens: int = 4
    draft: LanguageModel | None = None
    lookup: int = 0


def load_speculation(spec: SpeculationOptions, target_dir, tokenizer, device: torch.device,
                     dtype: torch.dtype) -> Speculation:
    """--draft / --prompt-lookup as a Speculation (generate and serve); a draft with another
    tokenizer than the target's is refused."""
    if spec.draft is None:
        return Speculation(tokens=spec.draft_tokens, lookup=spec.prompt_lookup)
    _, draft, draft_tokenizer = load_for_inference(spec.draft, device, dtype)
    if draft_tokenizer.to_str() != tokenizer.to_str():
        raise UserError(f"--draft {spec.draft}: its tokenizer differs from {target_dir}'s; speculative decoding "
                        "needs the same token ids in both models")
    return Speculation(tokens=spec.draft_tokens, draft=draft)


def check_speculative(model: LanguageModel, what: str) -> None:
    """Refuse a model speculative decoding cannot drive, naming why."""
    if model.task != "lm" or not model.rewinds_decode_state:
        raise UserError(f"{what} (model.arch={model.config.arch}) cannot decode speculatively: its decode state "
                        "cannot be rolled back to a position (a transformer decoder's KV cache can)")


class SpeculativeEngine(Engine):
    """An `Engine` whose every step is one speculative round per sequence (module docstring)."""

    def __init__(self, model: LanguageModel, speculation: Speculation, **kwargs):
        check_speculative(model, "the model")
        if kwargs.get("kv_blocks") is not None:
            raise UserError("speculative decoding rolls each sequence's keys back in place: it runs on the slot KV "
                            "cache, not a paged one")
        super().__init__(model, **kwargs)
        self.spec = speculation
        self.draft = speculation.draft
        self.draft_state = None
        if self.draft is not None:
            check_speculative(self.draft, "the draft")
            self.draft.eval()
            pack_for_cpu_decoding(self.draft)
            self.draft_len = self.draft.context_length
            self.draft_state = self.draft.new_decode_state(self.max_batch_size, self.draft_len, dtype=self.dtype,
                                                           device=self.device)
        self._draft_pos: dict[int, tuple[int, int]] = {}  # request id -> (offset, held) of its draft slot
        self.stats.update(proposed_tokens=0, accepted_tokens=0)

    def add(self, prompt_ids, params: SamplingParams = SamplingParams(), **kwargs) -> int:
        if params.repetition_penalty != 1.0:
            raise UserError("speculative decoding takes no repetition penalty (it would change between guesses)")
        return super().add(prompt_ids, params, **kwargs)

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        self._admit()
        events: list[TokenEvent] = []
        for request in sorted(self._running.values(), key=lambda r: r.slot):
            events += self._advance(request)
        return events

    def _advance(self, r: Request) -> list[TokenEvent]:
        if r.position == 0 or (self.max_len is not None and r.position >= self.max_len):
            return self._refill(r)
        started = time.perf_counter()
        k = min(self.spec.tokens, r.params.max_new_tokens - r.generated - 1)
        if self.max_len is not None:
            k = min(k, self.max_len - r.position - 1)
        proposal, q = self._propose(r, k) if k > 0 else ([], None)
        allowed = None
        if r.constraint is not None:  # the target scores only the prefix its format allows
            proposal, allowed = r.constraint.masks_along(proposal)
            q = q[:len(proposal)] if q is not None else None
        idx = torch.tensor([[r.tokens[-1], *proposal]], device=self.device)
        rows = Rows([r.slot], [r.position], [idx.shape[1]], [r.adapter])
        logits = self._masked(self.model(idx, state=self.state, rows=rows)[0])
        if allowed is not None:
            logits = logits.masked_fill(~allowed.to(logits.device), -math.inf)
        if r.params.greedy:
            tokens = greedy_accept(proposal, logits.argmax(-1).tolist())
        else:
            tokens = rejection_accept(proposal, self._probs(logits, r.params), q, r.generator)
        accepted = len(tokens) - 1
        r.proposed, r.accepted = r.proposed + len(proposal), r.accepted + accepted
        self.stats["proposed_tokens"] += len(proposal)
        self.stats["accepted_tokens"] += accepted
        r.position += 1 + accepted
        self.state.truncate(r.slot, r.position)
        events = self._emit_all(r, tokens, self._since(started), decoded=len(tokens))
        if self.draft is not None and not r.finished:
            self._rewind_draft(r)
        return events

    def _refill(self, r: Request) -> list[TokenEvent]:
        """A new sequence's prompt, or a full window's last half, prefilled; one token sampled."""
        count = len(r.tokens) if r.position == 0 else self.slide_keep
        r.slides += r.position != 0
        started = time.perf_counter()
        logits = prefill(self.model, self.state, [(r, count)], self.device)
        self.state.truncate(r.slot, count)
        r.position = count
        if self.draft is not None and r.generated == 0:
            self._draft_pos[r.id] = (0, 0)
            self.draft_state.truncate(r.slot, 0)
        token = int(self._sample([r], logits)[0])
        self._record([r], self._since(started), decoded=False, tokens=count)
        return self._emit_all(r, [token], 0.0, decoded=0)

    def _emit_all(self, r: Request, tokens: list[int], seconds: float, decoded: int) -> list[TokenEvent]:
        """Emit `tokens` in order until the sequence finishes."""
        self.stats["decode_tokens"] += decoded
        self.stats["decode_seconds"] += seconds if decoded else 0.0
        r.decode_seconds += seconds
        events = []
        for token in tokens:
            events.append(self._emit(r, token, 0.0))
            if r.finished:
                break
        return events

    def _propose(self, r: Request, k: int) -> tuple[list[int], torch.Tensor | None]:
        """k guesses and their distributions q [k, V] (None for prompt lookup: deterministic)."""
        if self.draft is None:
            return lookup_proposal(r.tokens, k, self.spec.lookup), None
        proposal, dists = [], []
        constraint = r.constraint
        for _ in range(k):
            logits = self._draft_forward(r, proposal)
            if constraint is not None:  # the draft proposes only what the format allows
                logits = logits.masked_fill(~constraint.allowed().to(logits.device), -math.inf)
            if r.params.greedy:
                proposal.append(int(logits.argmax()))
            else:
                dists.append(self._probs(logits[None], r.params)[0])
                proposal.append(draw(dists[-1], r.generator))
            if constraint is not None:
                constraint.advance(proposal[-1])
                if proposal[-1] in r.stop_token_ids or constraint.done:
                    break
        if constraint is not None:
            constraint.rollback(len(proposal))
        return proposal, torch.stack(dists) if dists else None

    def _draft_forward(self, r: Request, proposal: list[int]) -> torch.Tensor:
        """The draft's next-token logits after the sequence and the guesses so far: what its slot
        lacks is fed from where the slot stops; past its window, the slot restarts with the last half."""
        seq = r.tokens + proposal
        offset, held = self._draft_pos[r.id]  # the slot holds seq[offset:offset + held]
        if self.draft_len is not None and len(seq) - offset > self.draft_len:
            offset, held = len(seq) - min(len(seq), max(1, self.draft_len // 2)), 0
        feed = seq[offset + held:]
        rows = Rows([r.slot], [held], [len(feed)])
        logits = self.draft(torch.tensor([feed], device=self.device), state=self.draft_state, rows=rows)[0, -1]
        self._draft_pos[r.id] = (offset, held + len(feed))
        return self._masked(logits)

    def _rewind_draft(self, r: Request) -> None:
        """Keep the draft slot's entries the sequence still has (rejected guesses go)."""
        offset, held = self._draft_pos[r.id]
        held = min(held, len(r.tokens) - 1 - offset)
        if held <= 0:
            offset, held = 0, 0
        self._draft_pos[r.id] = (offset, held)
        self.draft_state.truncate(r.slot, held)

    def _probs(self, logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """The request's sampling distribution [n, V] at each row of `logits` [n, V]."""
        n = logits.shape[0]

        def rows(value, dtype):
            return torch.full((n,), value, dtype=dtype, device=logits.device)

        return sampling_probs(logits, rows(params.temperature, torch.float32), rows(params.top_k, torch.long),
                              rows(params.top_p, torch.float32), rows(params.min_p, torch.float32))

    def _masked(self, logits: torch.Tensor) -> torch.Tensor:
        """Ids the tokenizer lacks (a padded model vocabulary) are never proposed or emitted."""
        if self.vocab_size < logits.shape[-1]:
            logits = logits.clone()
            logits[..., self.vocab_size:] = -math.inf
        return logits

    def _finish(self, request: Request, reason: str) -> None:
        self._draft_pos.pop(request.id, None)
        super()._finish(request, reason)
