"""Text in, text out, on top of the token engine: prompts, incremental decoding and stop strings.

`Generator` takes a prompt as text or token ids, decodes incrementally (an incomplete UTF-8
character at the end is held back until its last byte arrives) and applies stop strings exactly:
the text is cut right before the first occurrence, even when it spans several tokens, and text
that might be the start of a stop string is held back until it is known not to be.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmcli.constrain.grammar import Format, Grammars
from llmcli.constrain.mask import RowConstraint
from llmcli.errors import UserError
from llmcli.generate.engine import Engine
from llmcli.generate.request import FINISH_EOT, FINISH_LENGTH, FINISH_STOP, Request
from llmcli.models.base import LanguageModel
from llmcli.options.sampling import SamplingParams
from llmcli.tokenizer import encode, eot_id, unknown_chars, unknown_noun

if TYPE_CHECKING:
    from llmcli.load import Loaded


class IncrementalDecoder:
    """Token ids in, text out, never splitting a multi-byte character across two pieces.

    Decodes a short window of recent ids and emits what it adds to the previous window's text,
    unless that ends in U+FFFD (an incomplete UTF-8 sequence from byte-level BPE): then it waits.
    `context` (the prompt's last token) starts the window, so that a tokenizer which puts spaces
    between tokens when decoding (word-level) also puts one between the prompt and the first word.
    """

    def __init__(self, tokenizer: Any, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = [int(i) for i in context]
        if self.ids and self._decode(self.ids).endswith("\ufffd"):
            self.ids = []  # the prompt ends inside a character: start clean
        self.prefix = 0  # ids[prefix:read] decode to text already emitted
        self.read = len(self.ids)

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


class SpelledDecoder:
    """Token ids in, text out, for constrained output: each token's spelling (constrain/vocabulary.py)
    joined as it is, so the text is exactly what the format's matcher accepted, whatever spacing
    rules the tokenizer's own decoder has (a word tokenizer's). UTF-8 split across tokens waits
    for its last byte."""

    def __init__(self, spellings: Sequence[bytes]):
        self.spellings = spellings
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self.spellings[token] if 0 <= token < len(self.spellings) else b"")

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


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
    completion: str
    tokens: int  # tokens sampled, including a final <|endoftext|>
    prompt_tokens: int  # tokens of the prompt the model saw (after truncation)
    dropped_prompt_tokens: int
    finish_reason: str
    seed: int
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    acceptance_rate: float | None = None  # speculative decoding: guesses kept / guesses made


@dataclass
class _TextState:
    decoder: IncrementalDecoder | SpelledDecoder
    stop: StopText
    request: Request


def encode_source(tokenizer: Any, source: str) -> list[int]:
    """A seq2seq source's ids, its end token (<|endoftext|>) appended; an empty source, and
    characters the tokenizer never saw, are refused."""
    if not source.strip():
        raise UserError("the source is empty: a sequence-to-sequence model needs something to map")
    unknown = unknown_chars(tokenizer, source)
    if unknown:
        shown = " ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
        raise UserError(f"the source contains {unknown_noun(unknown)} this model's source tokenizer never saw: {shown}")
    return encode(tokenizer, source) + [eot_id(tokenizer)]


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """A text prompt's ids; "" is <|endoftext|> alone (the start of a document). Characters a
    char-level tokenizer never saw are refused, naming them."""
    unknown = unknown_chars(tokenizer, prompt)
    if unknown:
        shown = " ".join(repr(c) for c in unknown[:20]) + (" ..." if len(unknown) > 20 else "")
        raise UserError(f"the prompt contains {unknown_noun(unknown)} this model's tokenizer never saw: {shown}")
    return encode(tokenizer, prompt) or [eot_id(tokenizer)]


def encode_text(text: str, tokenizer: Any, source_tokenizer: Any = None) -> list[int]:
    """A prompt's ids, or with a `source_tokenizer` (seq2seq) a source's, its end token appended."""
    return encode_source(source_tokenizer, text) if source_tokenizer is not None else encode_prompt(tokenizer, text)


class Generator:
    """Prompts in, streamed text out, on top of an `Engine` (see the module docstring).

    For a seq2seq model a prompt is the source (encoded with `source_tokenizer`, default
    `tokenizer`), and the text out is the target, decoded from the start token.
    """

    @classmethod
    def of(cls, loaded: Loaded, **options: Any) -> Generator:
        """A Generator for a loaded checkpoint (load.Loaded): its tokenizers and end ids; `options`
        are the Engine's."""
        return cls(loaded.model, loaded.tokenizer, source_tokenizer=loaded.source_tokenizer,
                   stop_token_ids=loaded.end_ids, **options)

    def __init__(self, model: LanguageModel, tokenizer: Any, *, max_batch_size: int = 8,
                 source_tokenizer: Any = None, stop_token_ids: Sequence[int] | None = None,
                 grammars: Grammars | None = None, **engine_kwargs: Any):
        """`stop_token_ids`: the ids that end a sequence (checkpoint.end_token_ids; none: only the length
        limit); default <|endoftext|>. `grammars` compiles output formats (made on first use; serve
        shares one with its handlers). `engine_kwargs` are the Engine's (speculation, a paged cache, ...)."""
        self.tokenizer = tokenizer
        self.seq2seq = model.task == "seq2seq"
        self.source_tokenizer = source_tokenizer or tokenizer
        self.eot = eot_id(tokenizer) if self.seq2seq else None  # the decoder's start token
        self.stop_ids = tuple(stop_token_ids) if stop_token_ids is not None else (eot_id(tokenizer),)
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab > model.config.vocab_size:
            raise UserError(f"the tokenizer has {vocab} tokens but the model only {model.config.vocab_size}")
        self.engine = Engine(model, max_batch_size=max_batch_size, vocab_size=vocab, **engine_kwargs)
        self._grammars = grammars
        self._states: dict[int, _TextState] = {}
        self._done: dict[int, Completion] = {}

    @property
    def grammars(self) -> Grammars:
        """Output formats compiled for this tokenizer (the target side's, for seq2seq)."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.stop_ids[0] if self.stop_ids else eot_id(self.tokenizer))
        return self._grammars

    def submit(self, prompt: str | Sequence[int], params: SamplingParams = SamplingParams(),
               fmt: Format | None = None, adapter: int = 0) -> int:
        """Queue a prompt (text, or token ids already encoded; for seq2seq the source, whose end
        token is appended when missing); returns its request id. With `fmt` the text is constrained
        to that format (a format that cannot be compiled or spelled raises GrammarError); `adapter`
        picks the LoRA adapter (llmcli/adapters.py) when several share the model."""
        stop_ids = () if params.ignore_eot else self.stop_ids
        constraint = None
        if fmt is not None:
            constraint = RowConstraint(self.grammars, fmt, stop_ids, self.engine.runner.model_vocab)
        if self.seq2seq:
            source = self.source_ids(prompt)
            ids, context = [self.eot], []  # the decoder starts from <|endoftext|>
            request_id = self.engine.add(ids, params, stop_token_ids=stop_ids, source_ids=source,
                                         constraint=constraint, adapter=adapter)
        else:
            ids = encode_prompt(self.tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
            request_id = self.engine.add(ids, params, stop_token_ids=stop_ids, constraint=constraint,
                                         adapter=adapter)
            context = ids[-1:] if ids[-1] not in self.stop_ids else []  # after an end token, text starts afresh
        request = self.engine.get(request_id)
        assert request is not None
        decoder = SpelledDecoder(self.grammars.vocabulary.spellings) if fmt is not None else \
            IncrementalDecoder(self.tokenizer, context)
        self._states[request_id] = _TextState(decoder, StopText(params.stop), request)
        return request_id

    def source_ids(self, source: str | Sequence[int]) -> list[int]:
        """A seq2seq source as the encoder's ids (text encoded, ids given an end token if they lack one)."""
        if isinstance(source, str):
            return encode_source(self.source_tokenizer, source)
        end = eot_id(self.source_tokenizer)
        ids = list(source)
        return ids if ids and ids[-1] == end else ids + [end]

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
            state = self._states.get(ev.id)
            if state is None:  # stopped by a stop string earlier in this step (speculative rounds emit several)
                continue
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
        r, m = state.request, state.request.metrics
        prefill_tps = len(r.prompt_ids) / m.prefill_seconds if m.prefill_seconds > 0 else 0.0
        decode_tps = (r.generated - 1) / m.decode_seconds if m.decode_seconds > 0 and r.generated > 1 else 0.0
        return Completion(id=r.id, completion=state.stop.text, tokens=r.generated,
                          prompt_tokens=len(r.source_ids if r.source_ids is not None else r.prompt_ids),
                          dropped_prompt_tokens=r.dropped_prompt_tokens,
                          finish_reason=reason, seed=r.seed, prefill_tokens_per_second=prefill_tps,
                          decode_tokens_per_second=decode_tps,
                          acceptance_rate=m.accepted / m.proposed if m.proposed else None)

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
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
