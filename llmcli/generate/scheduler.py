"""The scheduler: which sequences run in a step and how many of their tokens (vLLM v1's split).

`schedule()` returns a `StepPlan` and `update(plan, output)` takes back what the runner computed
for it. Between them the scheduler owns everything about *where* sequences run:

* admission: queued requests take free slots first come, first served (on a paged cache, when the
  blocks for their window are free too);
* the token budget: with `max_tokens` (vLLM's --max-num-batched-tokens), a step computes at most
  that many tokens. Running sequences decode first (one token each, plus their speculative
  guesses), then prompts are prefilled in admission order, each in chunks of what the budget
  leaves, so one long prompt never stalls the streams already running (chunked prefill). Without
  a budget every prompt is prefilled whole in the step it is admitted;
* the context window: a sequence that fills its slot has it refilled with its last half (one
  prefill, positions restart at 0), so the model always sees between half and all of its context
  (`window`, `slide_keep`); a family without a context limit never slides;
* paging (generate/paged.py): a sequence whose blocks are full gets one more before its step, and
  when none is free the most recently admitted sequence is preempted: its slot and blocks are
  freed and it waits at the front of the queue to be recomputed, with the same output.

Speculative decoding asks for `lookahead` more positions per decoding sequence (the guesses are
verified in the same forward); a sequence near its limits, or short of blocks, guesses fewer.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property

from llmcli.generate.outputs import CacheUse, EngineStats, TokenEvent
from llmcli.generate.paged import PagedCache
from llmcli.generate.request import FINISH_CANCELLED, FINISH_EOT, FINISH_FORMAT, FINISH_LENGTH, Request


@dataclass(eq=False)
class Sequence:
    """A request as the scheduler places it: its slot, the window of its tokens the slot holds
    (request.tokens[offset:]), how many of those the decode state holds (`cached`), and on a paged
    cache the blocks holding them (and the prefix-cache keys of its full ones)."""

    request: Request
    slot: int = -1
    offset: int = 0
    cached: int = 0
    blocks: list[int] = field(default_factory=list)
    block_keys: list[int] = field(default_factory=list)
    admitted: int = 0  # admission order: the latest admitted is preempted first
    argmax: bool = False  # its tokens are the logits' arg-max: greedy, no repetition penalty, no format

    @property
    def uncached(self) -> int:
        """Tokens of its window the decode state does not hold yet (its last token, once sampled)."""
        return len(self.request.tokens) - self.offset - self.cached


@dataclass(frozen=True)
class Decode:
    """One sequence fed its last token at position `seq.cached`, with room for `lookahead`
    speculative guesses after it."""

    seq: Sequence
    lookahead: int = 0


@dataclass(frozen=True)
class Chunk:
    """`count` tokens of a sequence's window from position `start`; `samples`: they reach its last
    token, so a token is sampled after them."""

    seq: Sequence
    start: int
    count: int
    samples: bool


@dataclass(frozen=True)
class StepPlan:
    """One step's work: the sequences admitted into their slots (a seq2seq one's source is encoded
    there first), then the decodes (in ascending slots) and the prefill chunks."""

    admitted: tuple[Sequence, ...] = ()
    decode: tuple[Decode, ...] = ()
    prefill: tuple[Chunk, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.admitted or self.decode or self.prefill)

    @cached_property
    def decode_only(self) -> bool:
        """Only decodes, none speculative: the steady state of a batch, which a plan is reused for."""
        return bool(self.decode) and not (self.admitted or self.prefill) and not any(d.lookahead for d in self.decode)

    @cached_property
    def sequences(self) -> tuple[Sequence, ...]:
        """The decoding sequences, in the plan's (ascending slot) order."""
        return tuple(d.seq for d in self.decode)

    @cached_property
    def slots(self) -> tuple[int, ...]:
        return tuple(seq.slot for seq in self.sequences)

    @cached_property
    def adapters(self) -> tuple[int, ...]:
        return tuple(seq.request.adapter for seq in self.sequences)

    @cached_property
    def argmax(self) -> bool:
        """Every decoding sequence takes the arg-max (Sequence.argmax)."""
        return all(seq.argmax for seq in self.sequences)


@dataclass(frozen=True)
class StepOutput:
    """What the runner computed for a plan: the tokens each decode row emits (its kept guesses,
    then one sampled token), then one token per sampling chunk; and the seconds of each part."""

    decoded: list[list[int]]
    prefilled: list[int]
    decode_seconds: float
    prefill_seconds: float
    chunk_seconds: list[float]  # per prefill chunk: the seconds of the forward that ran it
    encode_seconds: float = 0.0
    sample_seconds: float = 0.0
    proposed: list[int] = field(default_factory=list)  # per decode row: guesses made (speculative)


class Scheduler:
    """Admission, the token budget, paging, preemption and sliding (see the module docstring).

    `slots` sequences run at once; `window` is the most tokens a slot holds before it slides (None:
    never). `paged` (a PagedCache) makes the cache paged; `max_tokens` bounds a step's tokens
    (None: no bound); `lookahead` is how many speculative guesses a decoding sequence may make.
    """

    def __init__(self, slots: int, window: int | None, *, paged: PagedCache | None = None,
                 max_tokens: int | None = None, lookahead: int = 0, target_limit: int | None = None):
        self.slots, self.window, self.paged = slots, window, paged
        self.slide_keep = max(1, window // 2) if window else None
        self.max_tokens, self.lookahead = max_tokens, lookahead
        self.target_limit = target_limit  # seq2seq: the decoder's context, where its targets end
        self.stats = EngineStats()
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._waiting: deque[Sequence] = deque()
        self._running: dict[int, Sequence] = {}
        self._admissions = 0
        self._steady: StepPlan | None = None  # the last plan, while every running sequence decodes it again

    # -- requests ---------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        p = request.params
        argmax = p.greedy and p.repetition_penalty == 1.0 and request.constraint is None
        self._waiting.append(Sequence(request, argmax=argmax))

    def get(self, request_id: int) -> Request | None:
        seq = self._running.get(request_id) or next((s for s in self._waiting if s.request.id == request_id), None)
        return seq.request if seq is not None else None

    def sequence(self, request_id: int) -> Sequence | None:
        """Where a running request sits (None when it is not running)."""
        return self._running.get(request_id)

    def cancel(self, request_id: int) -> None:
        for seq in self._waiting:
            if seq.request.id == request_id:
                self._waiting.remove(seq)
                self._finish(seq, FINISH_CANCELLED)
                return
        seq = self._running.get(request_id)
        if seq is not None:
            self._finish(seq, FINISH_CANCELLED)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def cache_use(self, context: int | None) -> CacheUse:
        tokens = sum(seq.cached for seq in self._running.values())
        used = len(self._running)
        if self.paged is None:
            capacity = self.slots * context if context else 0
            return CacheUse(used, self.slots, tokens, tokens / capacity if capacity else 0.0)
        pool = self.paged.pool
        return CacheUse(used, self.slots, tokens, pool.used / pool.num_blocks, blocks_used=pool.used,
                        blocks_total=pool.num_blocks, block_tokens=pool.block_len, prefix_caching=pool.prefix_cache,
                        prefix_hit_rate=pool.hit_rate, prefix_hit_tokens=pool.hit_tokens,
                        prefix_queried_tokens=pool.queried_tokens, preemptions=self.stats.preemptions)

    # -- planning ---------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """This step's plan (see the module docstring). While nothing joins, leaves or slides and
        every running sequence decodes one token, the previous plan is this step's too."""
        steady = self._steady
        if steady is not None and not (self._waiting and self._free) and (
                self.window is None or all(seq.cached < self.window for seq in steady.sequences)):
            return steady
        self._steady = None
        budget = self.max_tokens if self.max_tokens is not None else 1 << 62
        # 1) full windows slide: their last half is prefilled again
        if self.window is not None:
            for seq in list(self._running.values()):
                if seq.cached >= self.window:
                    self._slide(seq)
        # 2) running sequences decode, growing their blocks (and preempting) on a paged cache
        decoding = sorted((s for s in self._running.values() if s.cached > 0 and s.uncached == 1),
                          key=lambda s: s.slot)
        decode = self._decodes(decoding, budget)
        budget -= sum(1 + d.lookahead for d in decode)
        # 3) then prompts: running ones (partly prefilled, slid, resumed) and newly admitted ones
        admitted = self._admit(budget)
        chunks = []
        for seq in sorted((s for s in self._running.values() if s.cached == 0 or s.uncached > 1),
                          key=lambda s: s.admitted):
            if budget <= 0:
                break
            count = min(seq.uncached, budget)
            chunks.append(Chunk(seq, seq.cached, count, samples=count == seq.uncached))
            budget -= count
        plan = StepPlan(tuple(admitted), tuple(decode), tuple(chunks))
        if self.paged is None and not self.lookahead and plan.decode_only and len(decode) == len(self._running):
            self._steady = plan  # paging grows blocks on the way, so a paged plan is made every step
        return plan

    def _decodes(self, decoding: list[Sequence], budget: int) -> list[Decode]:
        """The decode rows, each with the speculative room its limits, the budget and the blocks allow."""
        if self.paged is not None:
            for seq in sorted(decoding, key=lambda s: s.admitted):  # oldest first
                while seq.slot >= 0 and self.paged.full(seq, seq.cached):
                    if not self.paged.extend(seq):
                        self._preempt(max(self._running.values(), key=lambda s: s.admitted))
            decoding = [seq for seq in decoding if seq.slot >= 0]
        if not self.lookahead:
            return [Decode(seq) for seq in decoding]
        out, spare = [], max(0, budget - len(decoding))
        for seq in decoding:
            r = seq.request
            k = min(self.lookahead, r.params.max_new_tokens - r.generated - 1, spare)
            if self.window is not None:
                k = min(k, self.window - seq.cached - 1)
            if self.paged is not None:
                while k > 0 and self.paged.full(seq, seq.cached + k) and not self.paged.extend(seq):
                    k -= 1
            k = max(0, k)
            spare -= k
            out.append(Decode(seq, k))
        return out

    def _admit(self, budget: int) -> list[Sequence]:
        """Queued sequences into free slots while the budget lasts."""
        admitted = []
        while self._waiting and self._free and budget > 0:
            seq = self._waiting[0]
            if self.paged is not None and not self.paged.place(seq):
                break  # first come, first served: the head waits for blocks
            self._waiting.popleft()
            seq.slot = self._free.pop()
            if self.paged is None:
                seq.cached = 0
            else:
                self.paged.bind(seq)
            self._admissions += 1
            seq.admitted = self._admissions
            self._running[seq.request.id] = seq
            admitted.append(seq)
            budget -= seq.uncached
        return admitted

    def _slide(self, seq: Sequence) -> None:
        self._steady = None
        seq.request.metrics.slides += 1
        seq.offset, seq.cached = len(seq.request.tokens) - self.slide_keep, 0
        if self.paged is not None:
            self.paged.release(seq)
            if self.paged.place(seq):
                self.paged.bind(seq)
            else:  # its blocks are shared with others: wait for free ones
                self._preempt(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's slot and blocks; it waits first in line to be recomputed."""
        self._release(seq)
        seq.request.metrics.preemptions += 1
        self.stats.preemptions += 1
        self._waiting.appendleft(seq)

    # -- results ----------------------------------------------------------------------------

    def update(self, plan: StepPlan, out: StepOutput) -> list[TokenEvent]:
        """Advance every sequence the plan computed, append the tokens the runner sampled, and finish
        the sequences that ended; one event per token."""
        stats, now = self.stats, time.perf_counter()
        stats.steps += 1
        encoded = [seq for seq in plan.admitted if seq.request.source_ids is not None]
        if encoded:
            stats.prefill_tokens += sum(len(seq.request.source_ids) for seq in encoded)
            stats.prefill_seconds += out.encode_seconds
            for seq in encoded:
                seq.request.metrics.prefill_seconds += out.encode_seconds
        events: list[TokenEvent] = []
        took = out.decode_seconds + out.sample_seconds
        for seq, tokens in zip(plan.sequences, out.decoded, strict=True):
            seq.cached += len(tokens)  # its last token, then the guesses kept
            self._register(seq)
            seq.request.metrics.decode_seconds += took
            self._emit(seq, tokens, events, now)
        if plan.decode:
            stats.decode_tokens += sum(map(len, out.decoded))
            stats.decode_seconds += out.decode_seconds
        if out.proposed:
            made, kept = sum(out.proposed), sum(len(t) - 1 for t in out.decoded)
            stats.proposed_tokens += made
            stats.accepted_tokens += kept
            for row, tokens, guessed in zip(plan.decode, out.decoded, out.proposed, strict=True):
                row.seq.request.metrics.proposed += guessed
                row.seq.request.metrics.accepted += len(tokens) - 1
        sampled = iter(out.prefilled)
        for chunk, seconds in zip(plan.prefill, out.chunk_seconds, strict=True):
            seq, metrics = chunk.seq, chunk.seq.request.metrics
            seq.cached += chunk.count
            self._register(seq)
            stats.prefill_tokens += chunk.count
            if metrics.slides:
                metrics.decode_seconds += seconds
            else:
                metrics.prefill_seconds += seconds
            if chunk.samples:
                metrics.decode_seconds += out.sample_seconds
                self._emit(seq, [next(sampled)], events, now)
        stats.prefill_seconds += out.prefill_seconds
        return events

    def _register(self, seq: Sequence) -> None:
        if self.paged is not None:
            self.paged.register(seq)  # the blocks this step filled, for prefix caching

    def _emit(self, seq: Sequence, tokens: list[int], events: list[TokenEvent], now: float) -> None:
        """Append `tokens` to the sequence until it ends; one event each."""
        r = seq.request
        if r.metrics.first_token_at is None:
            r.metrics.first_token_at = now
        for token in tokens:
            r.tokens.append(token)
            reason = None
            if r.constraint is not None:
                r.constraint.advance(token)
            if token in r.stop_token_ids:
                reason = FINISH_EOT
            elif r.constraint is not None and r.constraint.done:
                reason = FINISH_FORMAT
            elif r.generated >= r.params.max_new_tokens:
                reason = FINISH_LENGTH
            elif self.target_limit is not None and len(r.tokens) >= self.target_limit:
                reason = FINISH_LENGTH  # a seq2seq decoder's context is full: it never learnt longer targets
            if reason is not None:
                self._finish(seq, reason)
            events.append(TokenEvent(r.id, token, reason is not None, reason))
            if reason is not None:
                return

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.request.finish_reason = reason
        if seq.slot >= 0:
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """The running sequence gives its slot (and blocks) back."""
        self._steady = None
        if self.paged is not None:
            self.paged.release(seq)
        self._running.pop(seq.request.id, None)
        self._free.append(seq.slot)
        seq.slot = -1
