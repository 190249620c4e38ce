"""Continuous batching in token ids: sequences join and leave a running batch at any step.

`Engine.add(prompt_ids, params)` queues a request. Every `step()` admits queued requests into free
slots of the model's decode state (a KV cache for a transformer) and prefills each one's prompt
once, then advances every running sequence by exactly one token and returns one `TokenEvent` per
sequence that moved. A finished sequence frees its slot at once; the next queued request takes it
in the following step. Each sequence has its own position, sampling settings and random generator,
so a seeded request gives the same tokens whatever else is in the batch (greedy decoding gives the
tokens of running it alone).

Context window. A prompt longer than the model's context keeps only its last `context_length`
tokens. When a sequence has filled its slot and needs one more token, the slot is refilled with
its last half (one prefill, positions restart at 0) and decoding continues: the model always sees
between half and all of its context, like nanoGPT's cropping without recomputing the window at
every step. A family without a context limit never slides.

Paged KV cache (`kv_blocks`: families with `pages_decode_state`): memory follows actual lengths,
prompts that start alike share cached blocks, and a sequence that cannot grow is preempted and
recomputed later with the same output (generate/paged.py).

Sequence-to-sequence models. A request also carries its source's ids; when it takes a slot, the
source is encoded once (`model.encode`, batched with the other sources admitted in the same step)
and its memory stays in the slot beside the decoder's cache, so each step attends to it at no
further encoder cost. Its prompt is the decoder's start token; a source longer than the encoder
takes is refused. It ends when its decoder's context is full (finish reason "length", as
`transformers`' max_length = block_size): a target longer than block_size - 1 was never trained,
so its window does not slide.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llmcli.constrain.mask import mask_logits
from llmcli.device import pack_for_cpu_decoding
from llmcli.errors import UserError
from llmcli.generate.paged import PagedCache
from llmcli.generate.sampling import apply_repetition_penalty, sample
from llmcli.models.base import LanguageModel, Rows
from llmcli.options.sampling import SamplingParams

FINISH_EOT = "eot"  # the model produced <|endoftext|> (or another stop token)
FINISH_STOP = "stop"  # a stop string appeared in the text
FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_CANCELLED = "cancelled"
FINISH_FORMAT = "format"  # a constrained output is complete: its format allows nothing more


@dataclass
class Request:
    """One sequence in the engine. Read its fields; the engine alone changes them."""

    id: int
    params: SamplingParams
    prompt_ids: list[int]  # after left truncation to the context window
    source_ids: list[int] | None  # seq2seq: the source the decoder attends to
    dropped_prompt_tokens: int
    stop_token_ids: frozenset[int]
    seed: int
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)  # prompt + generated so far
    slot: int = -1
    position: int = 0  # tokens of this sequence currently in its slot
    offset: int = 0  # tokens[offset:] is the window its slot holds (and its last token, once sampled)
    blocks: list[int] = field(default_factory=list)  # paged: the blocks holding the slot's positions
    block_keys: list[int] = field(default_factory=list)  # paged: the prefix-cache keys of its full blocks
    admitted: int = 0  # when it last took a slot (the newest is preempted first)
    preemptions: int = 0
    generated: int = 0
    finished: bool = False
    finish_reason: str | None = None
    slides: int = 0  # times the context window was slid
    proposed: int = 0  # speculative decoding: tokens guessed for this sequence, and how many were kept
    accepted: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    added_at: float = 0.0
    first_token_at: float | None = None
    constraint: Any = None  # constrain.mask.RowConstraint: the format its tokens must spell (None: free)
    adapter: int = 0  # which LoRA adapter its rows use when several share the base (llmcli/adapters.py)


@dataclass
class TokenEvent:
    """What one `Engine.step()` did for one sequence."""

    id: int
    token: int
    finished: bool
    finish_reason: str | None = None


# --------------------------------------------------------------------------------------------
# The hot path: one forward for the decoding rows, one per group of prompts to prefill


def decode(model: LanguageModel, state, requests: list[Request], device: torch.device) -> torch.Tensor:
    """Next-token logits [n, V] of running sequences, each fed its last token at its position."""
    idx = torch.tensor([[r.tokens[-1]] for r in requests], device=device)
    rows = Rows([r.slot for r in requests], [r.position for r in requests], [1] * len(requests),
                [r.adapter for r in requests])
    return model(idx, state=state, rows=rows)[:, -1]


def prefill(model: LanguageModel, state, group: list[tuple[Request, int]], device: torch.device,
            starts: Sequence[int] | None = None) -> torch.Tensor:
    """Next-token logits [n, V] after writing each request's last `count` tokens from its start
    position (default 0)."""
    width = max(count for _, count in group)
    idx = torch.zeros(len(group), width, dtype=torch.long)
    for i, (r, count) in enumerate(group):
        idx[i, :count] = torch.tensor(r.tokens[-count:])
    rows = Rows([r.slot for r, _ in group], starts or [0] * len(group), [count for _, count in group],
                [r.adapter for r, _ in group])
    out = model(idx.to(device), state=state, rows=rows)
    last = torch.tensor([count - 1 for _, count in group], device=device)
    return out[torch.arange(len(group), device=device), last]


def encode_sources(model: LanguageModel, state, requests: list[Request], device: torch.device) -> None:
    """seq2seq: run the encoder over each request's source into its slot (right-padded batch)."""
    idx = torch.zeros(len(requests), max(len(r.source_ids) for r in requests), dtype=torch.long)
    for i, r in enumerate(requests):
        idx[i, :len(r.source_ids)] = torch.tensor(r.source_ids)
    rows = Rows([r.slot for r in requests], [0] * len(requests), [len(r.source_ids) for r in requests],
                [r.adapter for r in requests])
    model.encode(idx.to(device), state=state, rows=rows)


def prefill_groups(items: list[tuple[Request, int]], max_tokens: int) -> list[list[tuple[Request, int]]]:
    """Consecutive prompts batched while the padded batch stays within `max_tokens` tokens."""
    groups: list[list[tuple[Request, int]]] = []
    for item in items:
        if groups and max(n for _, n in groups[-1] + [item]) * (len(groups[-1]) + 1) <= max_tokens:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def check_source(model: LanguageModel, source_ids: Sequence[int] | None) -> list[int] | None:
    """The source ids a request to `model` needs (None for a language model), checked."""
    if model.task != "seq2seq":
        if source_ids is not None:
            raise UserError(f"model.arch={model.config.arch} is a language model: it takes a prompt, not a source")
        return None
    if not source_ids:
        raise UserError(f"model.arch={model.config.arch} maps a source to a target: the source has no tokens")
    ids = [int(t) for t in source_ids]
    if len(ids) > model.source_length:
        raise UserError(f"the source has {len(ids)} tokens (with its end token); this model's encoder takes at "
                        f"most {model.source_length} (model.source_block_size)")
    bad = [t for t in ids if not 0 <= t < model.source_vocab_size]
    if bad:
        raise UserError(f"source token id {bad[0]} is outside the model's source vocabulary "
                        f"(0..{model.source_vocab_size - 1})")
    return ids


class Engine:
    """Continuous-batching generation over a model's decode state (see the module docstring).

    `max_batch_size` sequences run at once; more requests wait in a FIFO queue. The model should
    already be on its device and dtype; the decode state takes both from the model's parameters.
    On the CPU its large float32 Linear layers are repacked for oneDNN in place
    (`pack_for_cpu_decoding`: faster few-row products; the model still runs and saves, but must
    not be trained). Tokens with ids >= `vocab_size` (a model vocabulary padded beyond the
    tokenizer's) are never sampled. `prefill_tokens` bounds the padded tokens of one batched
    prefill (its logits are [rows, length, vocab] floats). `kv_blocks` blocks of `block_len`
    tokens make the KV cache paged (module docstring; None: a full-context slot per sequence).
    """

    def __init__(self, model: LanguageModel, *, max_batch_size: int = 8, vocab_size: int | None = None,
                 prefill_tokens: int = 4096, kv_blocks: int | None = None, block_len: int = 16,
                 prefix_cache: bool = True):
        if max_batch_size < 1:
            raise UserError(f"batch size must be at least 1; got {max_batch_size}")
        if kv_blocks is not None and (kv_blocks < 1 or block_len < 1):
            raise UserError(f"a paged KV cache needs at least one block of one token; got {kv_blocks} blocks of "
                            f"{block_len}")
        self.model = model.eval()
        pack_for_cpu_decoding(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_len = model.context_length
        self.paged: PagedCache | None = None
        if kv_blocks is None:
            self.state = model.new_decode_state(max_batch_size, self.max_len, dtype=self.dtype, device=self.device)
        else:
            self.state = model.new_paged_decode_state(max_batch_size, kv_blocks, block_len, dtype=self.dtype,
                                                      device=self.device)
            self.paged = PagedCache(self.state, kv_blocks, block_len, prefix_cache=prefix_cache)
        # The most tokens a slot holds before its window slides (a small pool narrows it).
        self.window = min(self.max_len, self.max_prompt_tokens or self.max_len) if self.max_len else None
        self.slide_keep = max(1, self.window // 2) if self.window else None
        self.model_vocab = model.config.vocab_size
        self.vocab_size = min(vocab_size or self.model_vocab, self.model_vocab)
        self.max_batch_size = max_batch_size
        self.prefill_tokens = prefill_tokens
        self._free_slots = list(range(max_batch_size - 1, -1, -1))  # pop() hands out slot 0 first
        self._waiting: deque[Request] = deque()
        self._running: dict[int, Request] = {}
        self._next_id = 0
        self._seen: torch.Tensor | None = None  # [slots, V] bool, for repetition penalties
        self._admissions = 0
        self.stats = {"prefill_tokens": 0, "prefill_seconds": 0.0, "decode_tokens": 0, "decode_seconds": 0.0,
                      "preemptions": 0}

    @property
    def max_prompt_tokens(self) -> int | None:
        """The most tokens a (truncated) prompt may have: what the paged pool holds; None: no limit."""
        return self.paged.capacity if self.paged is not None else None

    # -- requests ---------------------------------------------------------------------------

    def add(self, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams(), *,
            stop_token_ids: Iterable[int] = (), source_ids: Sequence[int] | None = None,
            constraint: Any = None, adapter: int = 0) -> int:
        """Queue a request; returns its id. The prompt keeps its last context_length tokens; a
        seq2seq model needs `source_ids` (its end token included); a `constraint`
        (constrain.mask.RowConstraint) masks every token its format does not allow; `adapter` picks
        the LoRA adapter of its rows (Rows.adapters)."""
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise UserError("the prompt has no tokens")
        bad = [t for t in ids if not 0 <= t < self.model_vocab]
        if bad:
            raise UserError(f"prompt token id {bad[0]} is outside the model's vocabulary (0..{self.model_vocab - 1})")
        source = check_source(self.model, source_ids)
        dropped = max(0, len(ids) - self.max_len) if self.max_len else 0
        ids = ids[dropped:]
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise UserError(f"the prompt has {len(ids)} tokens; the paged KV cache holds at most "
                            f"{self.max_prompt_tokens} ({self.paged.pool.num_blocks} blocks of "
                            f"{self.paged.pool.block_len})")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = torch.Generator()
        generator.manual_seed(seed)
        request = Request(id=self._next_id, params=params, prompt_ids=ids, source_ids=source,
                          dropped_prompt_tokens=dropped,
                          stop_token_ids=frozenset(int(t) for t in stop_token_ids), seed=seed,
                          generator=generator, tokens=list(ids), added_at=time.perf_counter(),
                          constraint=constraint, adapter=adapter)
        self._next_id += 1
        self._waiting.append(request)
        return request.id

    def cancel(self, request_id: int) -> None:
        """Drop a queued or running request (no further events for it); its slot is free at once."""
        for request in self._waiting:
            if request.id == request_id:
                self._waiting.remove(request)
                self._finish(request, FINISH_CANCELLED)
                return
        request = self._running.get(request_id)
        if request is not None:
            self._finish(request, FINISH_CANCELLED)

    def get(self, request_id: int) -> Request | None:
        """A queued or running request (finished ones are forgotten after their last event)."""
        if request_id in self._running:
            return self._running[request_id]
        return next((r for r in self._waiting if r.id == request_id), None)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def cache_use(self) -> dict[str, float]:
        """Slots held and in all, the token positions running sequences hold and, for a paged cache,
        blocks held and in all and the prefix cache's hit rate over prompt tokens (serve's /metrics)."""
        tokens = sum(r.position for r in self._running.values())
        out = {"kv_slots_used": len(self._running), "kv_slots_total": self.max_batch_size, "kv_tokens": tokens}
        if self.paged is None:
            capacity = self.max_batch_size * self.max_len if self.max_len else 0
            return {**out, "kv_usage": tokens / capacity if capacity else 0.0}
        return {**out, **self.paged.use(), "preemptions": self.stats["preemptions"]}

    # -- stepping ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Admit queued requests into free slots, then produce one token for every running sequence."""
        self._admit()
        if not self._running:
            return []
        decoding, prefilling = self._schedule()
        rows: list[Request] = []
        logits: list[torch.Tensor] = []
        if decoding:
            started = time.perf_counter()
            logits.append(decode(self.model, self.state, decoding, self.device))
            self._record(decoding, self._since(started), decoded=True)
            rows += decoding
        # Prompts of like lengths batched together: little padding when many join at once.
        for group in prefill_groups(sorted(prefilling, key=lambda item: item[1]), self.prefill_tokens):
            started = time.perf_counter()
            logits.append(prefill(self.model, self.state, group, self.device, [r.position for r, _ in group]))
            for request, count in group:
                request.position += count
            self._record([r for r, _ in group], self._since(started), decoded=False,
                         tokens=sum(n for _, n in group))
            rows += [r for r, _ in group]
        if self.paged is not None:
            for request in rows:
                self.paged.register(request)
        started = time.perf_counter()
        tokens = self._sample(rows, torch.cat(logits) if len(logits) > 1 else logits[0]).tolist()
        elapsed = time.perf_counter() - started
        return [self._emit(request, token, elapsed) for request, token in zip(rows, tokens, strict=True)]

    def _admit(self) -> None:
        admitted = []
        while self._waiting and self._free_slots:
            request = self._waiting[0]
            if self.paged is not None and not self.paged.place(request):
                break  # first come, first served: the head waits for blocks
            self._waiting.popleft()
            request.slot = self._free_slots.pop()
            if self.paged is None:
                request.position = 0
            else:
                self.paged.bind(request)
            self._admissions += 1
            request.admitted = self._admissions
            self._running[request.id] = request
            self._mark_seen_prompt(request)
            admitted.append(request)
        sources = [r for r in admitted if r.source_ids is not None]
        for group in prefill_groups([(r, len(r.source_ids)) for r in sources], self.prefill_tokens):
            started = time.perf_counter()
            encode_sources(self.model, self.state, [r for r, _ in group], self.device)
            self._record([r for r, _ in group], self._since(started), decoded=False, tokens=sum(n for _, n in group))

    def _schedule(self) -> tuple[list[Request], list[tuple[Request, int]]]:
        """(sequences to decode, in slot order; (sequence, tokens) to prefill from its position)."""
        for request in list(self._running.values()):
            if self.window is not None and request.position >= self.window:
                self._slide(request)  # window full: refill with the last half
        decoding, prefilling = [], []
        for request in self._running.values():
            count = len(request.tokens) - request.offset - request.position  # not in the cache yet
            if request.position == 0 or count > 1:
                prefilling.append((request, count))  # new, slid or resumed
            else:
                decoding.append(request)
        if self.paged is not None:
            self._grow(decoding)
            decoding = [r for r in decoding if r.slot >= 0]
            prefilling = [(r, count) for r, count in prefilling if r.slot >= 0]
        decoding.sort(key=lambda r: r.slot)  # ascending slots (often 0..n-1) keep state reads regular
        return decoding, prefilling

    def _slide(self, request: Request) -> None:
        request.slides += 1
        request.offset, request.position = len(request.tokens) - self.slide_keep, 0
        if self.paged is not None:
            self.paged.release(request)
            if self.paged.place(request):
                self.paged.bind(request)
            else:  # its blocks are shared with others: wait for free ones
                self._preempt(request)

    # -- the paged cache -------------------------------------------------------------------------

    def _grow(self, decoding: list[Request]) -> None:
        """A block for each decoding sequence whose blocks are full, oldest first; while none is free,
        the most recently admitted running sequence is preempted (perhaps the one asking)."""
        for request in sorted(decoding, key=lambda r: r.admitted):
            while request.slot >= 0 and self.paged.full(request):
                if not self.paged.extend(request):
                    self._preempt(max(self._running.values(), key=lambda r: r.admitted))

    def _preempt(self, request: Request) -> None:
        """Free a running sequence's slot and blocks; it waits first in line to be recomputed."""
        self._release(request)
        request.preemptions += 1
        self.stats["preemptions"] += 1
        self._waiting.appendleft(request)

    def _since(self, started: float) -> float:
        """Seconds since `started`, once the device has finished the work queued so far."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def _record(self, requests: list[Request], seconds: float, *, decoded: bool, tokens: int = 0) -> None:
        for r in requests:
            if decoded:
                r.position += 1
            if decoded or r.slides:
                r.decode_seconds += seconds
            else:
                r.prefill_seconds += seconds
        if decoded:
            self.stats["decode_tokens"] += len(requests)
            self.stats["decode_seconds"] += seconds
        else:
            self.stats["prefill_tokens"] += tokens
            self.stats["prefill_seconds"] += seconds

    def _emit(self, request: Request, token: int, seconds: float) -> TokenEvent:
        request.decode_seconds += seconds
        request.tokens.append(token)
        request.generated += 1
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        reason = None
        if request.constraint is not None:
            request.constraint.advance(token)
        if token in request.stop_token_ids:
            reason = FINISH_EOT
        elif request.constraint is not None and request.constraint.done:
            reason = FINISH_FORMAT
        elif request.generated >= request.params.max_new_tokens:
            reason = FINISH_LENGTH
        elif request.source_ids is not None and self.max_len is not None and len(request.tokens) >= self.max_len:
            reason = FINISH_LENGTH  # a seq2seq decoder's context is full: it never learnt longer targets
        if reason is not None:
            self._finish(request, reason)
        return TokenEvent(request.id, token, reason is not None, reason)

    def _sample(self, rows: list[Request], logits: torch.Tensor) -> torch.Tensor:
        if self.vocab_size < logits.shape[-1]:
            logits = logits.clone()
            logits[:, self.vocab_size:] = -math.inf
        logits = mask_logits(logits, [r.constraint for r in rows])
        params = [r.params for r in rows]
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = self._seen[torch.tensor([r.slot for r in rows], device=self._seen.device)]
            penalty = torch.tensor([p.repetition_penalty for p in params], device=logits.device)
            logits = apply_repetition_penalty(logits, seen, penalty)
        if all(p.greedy for p in params):
            tokens = logits.argmax(-1)
        else:
            def per_row(values: list, dtype: torch.dtype) -> torch.Tensor:
                return torch.tensor(values, dtype=dtype).to(logits.device, non_blocking=True)

            # One uniform per sampled token from each sequence's own generator: a seeded request
            # draws the same numbers whatever else is in the batch.
            uniforms = [0.0 if p.greedy else float(torch.rand((), generator=r.generator))
                        for r, p in zip(rows, params, strict=True)]
            tokens = sample(logits, per_row([p.temperature for p in params], torch.float32),
                            per_row([p.top_k for p in params], torch.long),
                            per_row([p.top_p for p in params], torch.float32),
                            per_row([p.min_p for p in params], torch.float32),
                            per_row(uniforms, torch.float32))
        if self._seen is not None:
            slots = torch.tensor([r.slot for r in rows], device=logits.device)
            self._seen[slots, tokens] = True
        return tokens

    def _mark_seen_prompt(self, request: Request) -> None:
        if request.params.repetition_penalty == 1.0 and self._seen is None:
            return
        if self._seen is None:
            self._seen = torch.zeros(self.max_batch_size, self.model_vocab, dtype=torch.bool, device=self.device)
        self._seen[request.slot] = False
        self._seen[request.slot, torch.tensor(request.tokens, device=self.device)] = True

    def _finish(self, request: Request, reason: str) -> None:
        request.finished, request.finish_reason = True, reason
        if request.slot >= 0:
            self._release(request)

    def _release(self, request: Request) -> None:
        """The running request gives its slot (and blocks) back."""
        if self.paged is not None:
            self.paged.release(request)
        self._running.pop(request.id, None)
        self._free_slots.append(request.slot)
        request.slot = -1
