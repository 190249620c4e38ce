"""Text generation: a slot-based batching engine over the model's KV cache, sampling, and streaming.

Three layers, each usable on its own (a server puts continuous batching on top of the first two):

* `Engine` works in token ids. It owns a preallocated `KVCache` with `max_batch_size` slots.
  `add(prompt_ids, params)` queues a request and returns its id; every `step()` first admits
  queued requests into free slots and prefills each one's prompt (once), then advances every
  running sequence by exactly one token, and returns one `TokenEvent` per sequence that moved.
  Sequences join and leave the running batch at any step: a finished sequence frees its slot at
  once and the next queued request takes it in the following step. Each sequence has its own
  position, sampling settings and random generator, so a seeded request gives the same tokens
  whatever else is in the batch (greedy decoding gives the tokens of running it alone).
* `Generator` adds the tokenizer: text prompts in, text out. It decodes incrementally (an
  incomplete UTF-8 character at the end is held back until its last byte arrives), applies stop
  strings exactly (the text is cut right before the first occurrence, even when it spans several
  tokens; text that might be the start of a stop string is held back until it is known not to be)
  and reports `TextEvent`s and finished `Completion`s.
* `run_generate` is the `llmcli generate` command: prompts from arguments, files or stdin,
  printing or streaming the results, or JSON lines.

Context window. A prompt longer than the model's block_size keeps only its last block_size
tokens (the command warns). When a sequence has block_size tokens in its cache and needs one more,
its slot is refilled with its last block_size // 2 tokens (one prefill, positions restart at 0)
and decoding continues: the model always sees between block_size // 2 and block_size tokens of
context, like nanoGPT's cropping but without recomputing the window at every step.

Sampling, per sequence, in this order: repetition penalty (CTRL: over every token of the prompt
and the completion so far, a positive logit is divided by the penalty, a negative one multiplied),
then temperature (0 = greedy: the arg-max, nothing else applies), top-k (keep the k most likely),
top-p (keep the smallest set of most likely tokens whose probabilities sum to at least p), min-p
(drop tokens less likely than min_p times the most likely one); each filter works on the
distribution the previous ones left. The token is drawn on the model's device by inverse-CDF
sampling with one uniform number per step from the sequence's own `torch.Generator` (on the CPU,
so a seed means the same numbers on every device).
"""

from __future__ import annotations

import json
import math
import re
import secrets
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from llmcli.errors import UserError

FINISH_EOT = "eot"  # the model produced <|endoftext|> (or another stop token)
FINISH_STOP = "stop"  # a stop string appeared in the text
FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_CANCELLED = "cancelled"


# --------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. `validate()` raises UserError for values out of range."""

    max_new_tokens: int = 256
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    seed: int | None = None  # None = a fresh random seed
    stop: tuple[str, ...] = ()  # stop strings (handled by Generator; the engine works in ids)
    ignore_eot: bool = False  # keep going past <|endoftext|>

    def validate(self, cli: bool = True) -> None:
        def name(field_name: str) -> str:
            return "--" + field_name.replace("_", "-") if cli else field_name

        def check(ok: bool, field_name: str, rule: str) -> None:
            if not ok:
                raise UserError(f"{name(field_name)} must be {rule}; got {getattr(self, field_name)!r}")

        def finite(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens",
              "a positive integer")
        check(finite(self.temperature) and self.temperature >= 0, "temperature", ">= 0 (0 = greedy)")
        check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k", "an integer >= 0 (0 = off)")
        check(finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]")
        check(finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]")
        check(finite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty", "> 0")
        check(self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63), "seed",
              "an integer in [0, 2^63)")
        if any(not isinstance(s, str) for s in self.stop):
            raise UserError(f"{name('stop')} must be strings")
        if any(s == "" for s in self.stop):
            raise UserError(f"{name('stop')}: a stop string cannot be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """CTRL-style penalty on the tokens marked in `seen` [B, V] (bool), per-row `penalty` [B]."""
    p = penalty[:, None].to(logits.dtype)
    penalized = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(seen, penalized, logits)


def sorted_filtered_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                          top_p: torch.Tensor, min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities after temperature, top-k, top-p and min-p, sorted from most to least likely.

    logits [B, V] float; per-row settings [B] (temperature > 0; top_k 0 = off; top_p 1 = off).
    Returns (probs [B, V] in descending order, zeros for dropped tokens; order [B, V] token ids).
    Every filter keeps a prefix of the sorted tokens, and always the most likely one.
    """
    vocab = logits.shape[-1]
    scaled = logits.float() / temperature[:, None].float()
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)
    neg_inf = torch.tensor(-math.inf, device=logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    sorted_logits = torch.where(ranks < k[:, None], sorted_logits, neg_inf)
    probs = sorted_logits.softmax(-1)
    # top-p: keep a token while the mass of the more likely tokens before it is still below p.
    before = probs.cumsum(-1) - probs
    keep = (before < top_p[:, None]) | (top_p[:, None] >= 1)
    keep[:, 0] = True
    sorted_logits = torch.where(keep, sorted_logits, neg_inf)
    probs = sorted_logits.softmax(-1)
    # min-p: relative to the most likely token, which is always kept.
    keep = probs >= min_p[:, None] * probs[:, :1]
    keep[:, 0] = True
    sorted_logits = torch.where(keep, sorted_logits, neg_inf)
    return sorted_logits.softmax(-1), order


def sampling_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """The distribution a token is drawn from, [B, V] in vocabulary order (for tests, logprobs)."""
    probs, order = sorted_filtered_probs(logits, temperature, top_k, top_p, min_p)
    return torch.zeros_like(probs).scatter_(-1, order, probs)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           min_p: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row: arg-max where temperature == 0, else inverse-CDF with `uniforms` [B] in [0, 1)."""
    greedy_tokens = logits.argmax(-1)
    is_greedy = temperature <= 0
    if bool(is_greedy.all()):
        return greedy_tokens
    temperature = torch.where(is_greedy, torch.ones_like(temperature), temperature)
    probs, order = sorted_filtered_probs(logits, temperature, top_k, top_p, min_p)
    cdf = probs.cumsum(-1)
    target = uniforms[:, None].to(cdf.dtype) * cdf[:, -1:]
    rank = (cdf < target).sum(-1, keepdim=True).clamp(max=probs.shape[-1] - 1)
    sampled = order.gather(-1, rank).squeeze(-1)
    return torch.where(is_greedy, greedy_tokens, sampled)


# --------------------------------------------------------------------------------------------
# Engine: token ids in, token ids out


@dataclass
class Request:
    """One sequence in the engine. Read its fields; the engine alone changes them."""

    id: int
    params: SamplingParams
    prompt_ids: list[int]  # after left truncation to the context window
    dropped_prompt_tokens: int
    stop_token_ids: frozenset[int]
    seed: int
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)  # prompt + generated so far
    slot: int = -1
    position: int = 0  # tokens of this sequence currently in its cache slot
    generated: int = 0
    finished: bool = False
    finish_reason: str | None = None
    slides: int = 0  # times the context window was slid
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    added_at: float = 0.0
    first_token_at: float | None = None

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[len(self.prompt_ids):]


@dataclass
class TokenEvent:
    """What one `Engine.step()` did for one sequence."""

    id: int
    token: int
    finished: bool
    finish_reason: str | None = None
    logits: torch.Tensor | None = None  # the raw model logits [V] (only with record_logits=True)


class Engine:
    """Continuous-batching generation over a slot KV cache (see the module docstring).

    `max_batch_size` sequences run at once; more requests wait in a FIFO queue. The model should
    already be on its device and dtype; the cache takes both from the model's parameters. On the
    CPU its large float32 Linear layers are repacked for oneDNN in place (`pack_for_cpu_decoding`:
    faster few-row products; the model still runs and saves, but must not be trained). Tokens
    with ids >= `vocab_size` (a model vocabulary padded beyond the tokenizer's) are never sampled.
    `prefill_tokens` bounds the padded tokens of one batched prefill (its logits are
    [rows, length, vocab] floats).
    """

    def __init__(self, model: torch.nn.Module, *, max_batch_size: int = 8, vocab_size: int | None = None,
                 prefill_tokens: int = 4096, record_logits: bool = False):
        from llmcli.model import KVCache, pack_for_cpu_decoding

        if max_batch_size < 1:
            raise UserError(f"batch size must be at least 1; got {max_batch_size}")
        self.model = model.eval()
        pack_for_cpu_decoding(model)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.config = model.config
        self.max_len = self.config.block_size
        self.slide_keep = max(1, self.max_len // 2)
        self.model_vocab = self.config.vocab_size
        self.vocab_size = min(vocab_size or self.model_vocab, self.model_vocab)
        self.max_batch_size = max_batch_size
        self.prefill_tokens = prefill_tokens
        self.record_logits = record_logits
        self.cache = KVCache(self.config, max_batch_size, self.max_len, dtype=self.dtype, device=self.device)
        self._free_slots = list(range(max_batch_size - 1, -1, -1))  # pop() hands out slot 0 first
        self._waiting: deque[Request] = deque()
        self._running: dict[int, Request] = {}
        self._next_id = 0
        self._seen: torch.Tensor | None = None  # [slots, V] bool, for repetition penalties
        self.stats = {"prefill_tokens": 0, "prefill_seconds": 0.0, "decode_tokens": 0, "decode_seconds": 0.0}

    # -- requests ---------------------------------------------------------------------------

    def add(self, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams(), *,
            stop_token_ids: Iterable[int] = ()) -> int:
        """Queue a request; returns its id. The prompt keeps its last block_size tokens."""
        params.validate()
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise UserError("the prompt has no tokens")
        bad = [t for t in ids if not 0 <= t < self.model_vocab]
        if bad:
            raise UserError(f"prompt token id {bad[0]} is outside the model's vocabulary (0..{self.model_vocab - 1})")
        dropped = max(0, len(ids) - self.max_len)
        ids = ids[dropped:]
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        generator = torch.Generator()
        generator.manual_seed(seed)
        request = Request(id=self._next_id, params=params, prompt_ids=ids, dropped_prompt_tokens=dropped,
                          stop_token_ids=frozenset(int(t) for t in stop_token_ids), seed=seed,
                          generator=generator, tokens=list(ids), added_at=time.perf_counter())
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

    # -- stepping ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Admit queued requests into free slots, then produce one token for every running sequence."""
        while self._waiting and self._free_slots:
            request = self._waiting.popleft()
            request.slot = self._free_slots.pop()
            request.position = 0
            self._running[request.id] = request
            self._mark_seen_prompt(request)
        if not self._running:
            return []
        decode, prefill = [], []
        for request in self._running.values():
            if request.position == 0:
                prefill.append((request, len(request.tokens)))  # new: the whole (truncated) prompt
            elif request.position >= self.max_len:
                request.slides += 1
                prefill.append((request, self.slide_keep))  # window full: refill with the last half
            else:
                decode.append(request)

        decode.sort(key=lambda r: r.slot)  # ascending slots (often 0..n-1) keep cache reads regular
        rows: list[Request] = []
        logits_parts: list[torch.Tensor] = []
        if decode:
            started = time.perf_counter()
            idx = torch.tensor([[r.tokens[-1]] for r in decode], device=self.device)
            slots = torch.tensor([r.slot for r in decode], device=self.device)
            positions = torch.tensor([[r.position] for r in decode], device=self.device)
            logits_parts.append(self.model(idx, cache=self.cache, slots=slots, positions=positions)[:, -1])
            self._sync()
            elapsed = time.perf_counter() - started
            for r in decode:
                r.position += 1
                r.decode_seconds += elapsed
            rows += decode
            self.stats["decode_tokens"] += len(decode)
            self.stats["decode_seconds"] += elapsed
        for group in self._prefill_groups(prefill):
            started = time.perf_counter()
            width = max(n for _, n in group)
            idx = torch.zeros(len(group), width, dtype=torch.long)
            for i, (r, n) in enumerate(group):
                idx[i, :n] = torch.tensor(r.tokens[-n:])
            positions = torch.arange(width).expand(len(group), width)
            slots = torch.tensor([r.slot for r, _ in group])
            out = self.model(idx.to(self.device), cache=self.cache, slots=slots.to(self.device),
                             positions=positions.to(self.device))
            last = torch.tensor([n - 1 for _, n in group], device=self.device)
            logits_parts.append(out[torch.arange(len(group), device=self.device), last])
            del out
            self._sync()
            elapsed = time.perf_counter() - started
            for r, n in group:
                if r.slides:
                    r.decode_seconds += elapsed
                else:
                    r.prefill_seconds += elapsed
                r.position = n
            rows += [r for r, _ in group]
            tokens_in = sum(n for _, n in group)
            self.stats["prefill_tokens"] += tokens_in
            self.stats["prefill_seconds"] += elapsed

        started = time.perf_counter()
        logits = torch.cat(logits_parts) if len(logits_parts) > 1 else logits_parts[0]
        raw = logits if self.record_logits else None
        next_tokens = self._sample(rows, logits).tolist()
        elapsed = time.perf_counter() - started
        now = time.perf_counter()

        events = []
        for i, (request, token) in enumerate(zip(rows, next_tokens, strict=True)):
            request.decode_seconds += elapsed
            request.tokens.append(token)
            request.generated += 1
            if request.first_token_at is None:
                request.first_token_at = now
            reason = None
            if token in request.stop_token_ids:
                reason = FINISH_EOT
            elif request.generated >= request.params.max_new_tokens:
                reason = FINISH_LENGTH
            events.append(TokenEvent(request.id, token, reason is not None, reason,
                                     raw[i].clone() if raw is not None else None))
            if reason is not None:
                self._finish(request, reason)
        return events

    def _prefill_groups(self, prefill: list[tuple[Request, int]]) -> list[list[tuple[Request, int]]]:
        groups: list[list[tuple[Request, int]]] = []
        for item in prefill:
            if groups:
                group = groups[-1]
                width = max([n for _, n in group] + [item[1]])
                if width * (len(group) + 1) <= self.prefill_tokens:
                    group.append(item)
                    continue
            groups.append([item])
        return groups

    def _sample(self, rows: list[Request], logits: torch.Tensor) -> torch.Tensor:
        if self.vocab_size < logits.shape[-1]:
            logits = logits.clone()
            logits[:, self.vocab_size:] = -math.inf
        params = [r.params for r in rows]
        if any(p.repetition_penalty != 1.0 for p in params):
            seen = self._seen_rows(rows)
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

    def _seen_rows(self, rows: list[Request]) -> torch.Tensor:
        assert self._seen is not None
        return self._seen[torch.tensor([r.slot for r in rows], device=self._seen.device)]

    def _finish(self, request: Request, reason: str) -> None:
        request.finished, request.finish_reason = True, reason
        if request.slot >= 0:
            self._running.pop(request.id, None)
            self._free_slots.append(request.slot)
            request.slot = -1

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# --------------------------------------------------------------------------------------------
# Text: incremental decoding and stop strings


class IncrementalDecoder:
    """Token ids in, text out, never splitting a multi-byte character across two pieces.

    Decodes a short window of recent ids and emits what it adds to the previous window's text,
    unless that ends in U+FFFD (an incomplete UTF-8 sequence from byte-level BPE): then it waits.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already emitted
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]


class StopText:
    """Releases text as it grows, cut right before the first stop string.

    Holds back the longest tail that could still become a stop string, so released text is never
    taken back. `stopped` turns True when a stop string was found; nothing is released after it.
    """

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.text = ""
        self.stopped = False

    def push(self, delta: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        buffer = self.pending + delta
        hits = [i for i in (buffer.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.pending, self.stopped = buffer[:min(hits)], "", True
        else:
            hold = 0 if final else self._holdback(buffer)
            out, self.pending = buffer[:len(buffer) - hold], buffer[len(buffer) - hold:]
        self.text += out
        return out

    def _holdback(self, buffer: str) -> int:
        for size in range(min(len(buffer), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            tail = buffer[-size:]
            if any(s.startswith(tail) for s in self.stop):
                return size
        return 0


@dataclass
class TextEvent:
    """New text of one sequence after one step ("" while text is held back)."""

    id: int
    token: int
    text: str
    finished: bool
    finish_reason: str | None = None


@dataclass
class Completion:
    id: int
    prompt: str
    completion: str
    tokens: int  # tokens sampled, including a final <|endoftext|>
    prompt_tokens: int  # tokens of the prompt the model saw (after truncation)
    dropped_prompt_tokens: int
    finish_reason: str
    seed: int
    prefill_tokens_per_second: float
    decode_tokens_per_second: float

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "completion": self.completion, "tokens": self.tokens,
                "prefill_tokens_per_second": round(self.prefill_tokens_per_second, 2),
                "decode_tokens_per_second": round(self.decode_tokens_per_second, 2)}


@dataclass
class _TextState:
    prompt: str
    decoder: IncrementalDecoder
    stop: StopText
    request: Request


class Generator:
    """Text prompts in, streamed text out, on top of an `Engine` (see the module docstring).

    An empty prompt starts generation from <|endoftext|> alone, i.e. at the start of a document.
    Prompts with characters a char-level tokenizer never saw are refused (UserError naming them).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_batch_size: int = 8, **engine_kwargs: Any):
        from llmcli.tokenizer import eot_id

        self.tokenizer = tokenizer
        self.eot = eot_id(tokenizer)
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab > model.config.vocab_size:
            raise UserError(f"the tokenizer has {vocab} tokens but the model only {model.config.vocab_size}")
        self.engine = Engine(model, max_batch_size=max_batch_size, vocab_size=vocab, **engine_kwargs)
        self._states: dict[int, _TextState] = {}
        self._done: dict[int, Completion] = {}

    def encode_prompt(self, prompt: str) -> list[int]:
        from llmcli.tokenizer import encode, unknown_chars

        unknown = unknown_chars(self.tokenizer, prompt)
        if unknown:
            shown = " ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
            raise UserError(f"the prompt contains {len(unknown)} character(s) this model's tokenizer "
                            f"never saw: {shown}")
        return encode(self.tokenizer, prompt) or [self.eot]

    def submit(self, prompt: str, params: SamplingParams = SamplingParams()) -> int:
        params.validate()
        ids = self.encode_prompt(prompt)
        stop_ids = () if params.ignore_eot else (self.eot,)
        request_id = self.engine.add(ids, params, stop_token_ids=stop_ids)
        request = self.engine.get(request_id)
        assert request is not None
        self._states[request_id] = _TextState(prompt, IncrementalDecoder(self.tokenizer),
                                              StopText(params.stop), request)
        return request_id

    def request(self, request_id: int) -> Request:
        return self._states[request_id].request

    def cancel(self, request_id: int) -> None:
        self.engine.cancel(request_id)
        self._states.pop(request_id, None)

    def has_work(self) -> bool:
        return self.engine.has_work()

    def step(self) -> list[TextEvent]:
        events = []
        for ev in self.engine.step():
            state = self._states[ev.id]
            finished, reason = ev.finished, ev.finish_reason
            text = ""
            if reason != FINISH_EOT:  # the stop token itself is not part of the text
                text = state.stop.push(state.decoder.push(ev.token))
            if state.stop.stopped and not finished:
                self.engine.cancel(ev.id)
                finished, reason = True, FINISH_STOP
            elif state.stop.stopped:
                reason = FINISH_STOP
            if finished:
                text += state.stop.push(state.decoder.flush(), final=True)
                self._done[ev.id] = self._completion(state, reason or FINISH_LENGTH)
                del self._states[ev.id]
            events.append(TextEvent(ev.id, ev.token, text, finished, reason))
        return events

    def completion(self, request_id: int) -> Completion:
        """The finished request's result (each can be taken once)."""
        return self._done.pop(request_id)

    def _completion(self, state: _TextState, reason: str) -> Completion:
        r = state.request
        prefill_tps = len(r.prompt_ids) / r.prefill_seconds if r.prefill_seconds > 0 else 0.0
        decode_tps = (r.generated - 1) / r.decode_seconds if r.decode_seconds > 0 and r.generated > 1 else 0.0
        return Completion(id=r.id, prompt=state.prompt, completion=state.stop.text, tokens=r.generated,
                          prompt_tokens=len(r.prompt_ids), dropped_prompt_tokens=r.dropped_prompt_tokens,
                          finish_reason=reason, seed=r.seed, prefill_tokens_per_second=prefill_tps,
                          decode_tokens_per_second=decode_tps)

    def generate(self, prompts: Sequence[str], params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 on_event: Callable[[TextEvent], None] | None = None) -> list[Completion]:
        """Run prompts to completion (batched); results in the order of `prompts`."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        ids = [self.submit(p, sp) for p, sp in zip(prompts, params, strict=True)]
        while self.has_work():
            for ev in self.step():
                if on_event is not None:
                    on_event(ev)
        return [self.completion(i) for i in ids]


# --------------------------------------------------------------------------------------------
# Loading checkpoints for inference (shared with evaluate)


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: MPS is not available")
    return device


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def select_dtype(name: str, device: torch.device, auto: torch.dtype | None = None) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that supports it (unless `auto` says otherwise), else float32."""
    if name == "auto":
        if auto is not None:
            return auto
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype: unknown dtype {name!r} (use auto, float32, bfloat16 or float16)")
    return DTYPES[name]


def load_for_inference(path: str | Path, device: torch.device, dtype: torch.dtype):
    """(checkpoint dir, model in eval mode on `device`, tokenizer) for a run or checkpoint dir."""
    from llmcli.checkpoint import TOKENIZER, resolve_checkpoint
    from llmcli.model import load_model
    from llmcli.tokenizer import load_tokenizer

    directory = resolve_checkpoint(path)
    tokenizer = load_tokenizer(directory / TOKENIZER)
    model = load_model(directory, device=device, dtype=dtype).eval()
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if vocab > model.config.vocab_size:
        raise UserError(f"{directory}: the tokenizer has {vocab} tokens but the model only "
                        f"{model.config.vocab_size}")
    return directory, model, tokenizer


# --------------------------------------------------------------------------------------------
# The `llmcli generate` command


def read_prompts(prompt: str | None, prompt_file: Path | None, lines: bool,
                 stdin: IO[str] | None = None) -> list[str]:
    """Prompts from the argument, a file or stdin; one per non-blank line with `lines`."""
    from llmcli import ui

    if prompt is not None and prompt_file is not None:
        raise UserError("give a PROMPT or --prompt-file, not both")
    if prompt is not None:
        texts, source = [prompt], None
    elif prompt_file is not None:
        path = Path(prompt_file).expanduser()
        if not path.is_file():
            raise UserError(f"prompt file not found: {path}")
        try:
            texts, source = [path.read_text(encoding="utf-8")], str(path)
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text") from None
    else:
        stdin = stdin or sys.stdin
        if stdin.isatty():
            ui.log("reading the prompt from stdin; end it with Ctrl-D (or pass \"\" to start from "
                   "<|endoftext|>)")
        texts, source = [stdin.read()], "stdin"
    if lines:
        texts = [line for line in texts[0].splitlines() if line.strip()]
    if source is not None and not any(texts):
        raise UserError(f"no prompt: {source} is empty" + (" (or has only blank lines)" if lines else ""))
    return texts


def unescape(text: str) -> str:
    """`\\n`, `\\t`, `\\r` and `\\\\` typed on a command line (e.g. in --stop) as the characters."""
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    return re.sub(r"\\([ntr\\])", lambda m: table[m.group(1)], text)


def run_generate(checkpoint: str | Path, prompts: list[str], params: SamplingParams, *,
                 num_samples: int = 1, batch_size: int = 8, json_lines: bool = False, stream: bool = True,
                 device: str = "auto", dtype: str = "auto", out: IO[str] | None = None) -> list[Completion]:
    """Generate `num_samples` completions per prompt and print them in order.

    Text mode prints each prompt followed by its completion, streaming the sample in front as it
    is produced (unless `stream` is False), with a `---` line between samples. JSON mode prints
    one object per sample. With a seed, sample j of every prompt uses seed + j.
    """
    from llmcli import ui

    params.validate()
    if num_samples < 1:
        raise UserError(f"--num-samples must be at least 1; got {num_samples}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1; got {batch_size}")
    out = out or sys.stdout
    torch_device = select_device(device)
    _, model, tokenizer = load_for_inference(checkpoint, torch_device, select_dtype(dtype, torch_device))
    jobs = [(p, j) for p in prompts for j in range(num_samples)]
    generator = Generator(model, tokenizer, max_batch_size=min(batch_size, len(jobs)))
    ids = []
    for index, (prompt, j) in enumerate(jobs):
        seed = params.seed + j if params.seed is not None else None
        request_id = generator.submit(prompt, _replace(params, seed=seed))
        dropped = generator.request(request_id).dropped_prompt_tokens
        if dropped and j == 0:
            label = f"prompt {index // num_samples + 1}" if len(prompts) > 1 else "the prompt"
            ui.log(f"warning: {label} is longer than the context window ({model.config.block_size} "
                   f"tokens); its first {dropped} tokens were dropped")
        ids.append(request_id)

    styled = ui.interactive(ui.stdout) and not json_lines
    texts: dict[int, list[str]] = {i: [] for i in ids}
    finished: set[int] = set()
    head, head_started = 0, False
    results: list[Completion] = []

    def write(text: str) -> None:
        if text:
            out.write(text)
            out.flush()

    def begin(request_id: int) -> None:
        prompt = jobs[ids.index(request_id)][0]
        if head > 0:
            write("---\n")
        write(f"\x1b[1m{prompt}\x1b[0m" if styled and prompt else prompt)

    def flush_head() -> None:
        nonlocal head, head_started
        while head < len(ids):
            request_id = ids[head]
            done = request_id in finished
            if not json_lines and (stream or done):
                if not head_started:
                    begin(request_id)
                    head_started = True
                write("".join(texts[request_id]))
                texts[request_id].clear()
            if not done:
                return
            completion = generator.completion(request_id)
            results.append(completion)
            if json_lines:
                write(json.dumps(completion.to_json(), ensure_ascii=False) + "\n")
            elif not (completion.prompt + completion.completion).endswith("\n"):
                write("\n")
            head, head_started = head + 1, False

    started = time.perf_counter()
    while generator.has_work():
        for ev in generator.step():
            texts[ev.id].append(ev.text)
            if ev.finished:
                finished.add(ev.id)
        flush_head()
    flush_head()
    elapsed = time.perf_counter() - started
    s = generator.engine.stats
    total = sum(c.tokens for c in results)
    prefill = s["prefill_tokens"] / s["prefill_seconds"] if s["prefill_seconds"] else 0.0
    decode = s["decode_tokens"] / s["decode_seconds"] if s["decode_seconds"] else 0.0
    ui.log(f"{len(results)} sample{'s' if len(results) != 1 else ''}, {total} tokens in {elapsed:.2f}s "
           f"(prefill {ui.format_count(prefill)} tok/s, decode {ui.format_count(decode)} tok/s, "
           f"batch {generator.engine.max_batch_size}, {torch_device.type})")
    return results


def _replace(params: SamplingParams, **changes: Any) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, **changes)
