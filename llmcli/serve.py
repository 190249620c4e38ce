"""`llmcli serve`: an OpenAI-compatible HTTP server with continuous batching and streaming.

Endpoints (OpenAI semantics, JSON in and out):

* `GET /v1/models` (and `/v1/models/{id}`): the one model served, named after the run directory
  unless `--model-name` says otherwise. `GET /health`: status and load (running and waiting
  sequences); it needs no API key and answers 503 while the server shuts down.
* `POST /v1/completions`: `prompt` (a string, a list of strings, or token ids), `max_tokens`
  (default 16), `temperature` (default 1), `top_p`, `n`, `stop`, `seed`, `stream`,
  `stream_options.include_usage`, `echo`, and beyond OpenAI's set `top_k`, `min_p`,
  `repetition_penalty` and `ignore_eos` (vLLM's names). With a seed, choice j of every prompt
  uses seed + j (as `llmcli generate --num-samples`).
* `POST /v1/chat/completions`: `messages` rendered into one prompt by a chat template (below),
  the same options (`max_tokens` or `max_completion_tokens`, default 256), streamed as
  `choices[].delta` chunks.

Streams are server-sent events: `data: {json}\\n\\n` chunks, then `data: [DONE]`. Errors are
OpenAI-shaped, `{"error": {"message", "type", "param", "code"}}`: 400 invalid parameters (naming
the field), 401 missing or wrong API key, 404 unknown model or route, 413 body over 1 MiB, 429
queue full, 503 shutting down. A prompt longer than the context window keeps its last block_size
tokens (`usage.prompt_tokens` counts what the model saw).

Chat templates. Our models are base models: they were never tuned to follow a conversation, so
the chat endpoint only lays the messages out as text the model continues. The default layout is
`{role}: {content}\\n` per message, then `assistant:`, with `\\nuser:` as a stop string. A
`--chat-template FILE` is a JSON object with any of these keys (Python str.format fields
`{role}` and `{content}`; write literal braces as `{{` and `}}`):

    {"prefix": "",                             text before the first message
     "message": "{role}: {content}\\n",         each message ...
     "roles": {"system": "{content}\\n\\n"},    ... or, for these roles, this instead
     "generation_prompt": "assistant:",        after the last message: the model continues here
     "stop": ["\\nuser:"]}                      stop strings added to every chat request

Design. One engine thread owns the model: it alone calls `Generator.step()`. Request handlers run
on the asyncio event loop; they validate and tokenize a request, then hand it to the engine thread
through a thread-safe queue (`EngineLoop.submit`). Between steps the engine thread takes every
queued command (new requests join the running batch at the next step, cancelled ones leave at
once), steps, and hands each step's text to the requests' asyncio queues with one
`loop.call_soon_threadsafe`. A handler that sees its client disconnect (it watches the ASGI
receive channel) cancels its sequences, which frees their slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import queue
import secrets
import socket
import string
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from llmcli.errors import UserError
from llmcli.generate import FINISH_EOT, FINISH_LENGTH, FINISH_STOP, Completion, Generator, SamplingParams

log = logging.getLogger("uvicorn.error")  # shows in uvicorn's log format

API_KEY_ENV = "LLMCLI_API_KEY"
MAX_BODY_BYTES = 1 << 20
MAX_TOKENS_LIMIT = 1 << 16  # max_tokens above this are refused
MAX_N = 128
MAX_PROMPTS = 128
MAX_STOP = 16
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 256
SHUTDOWN_GRACE_SECONDS = 10


# --------------------------------------------------------------------------------------------
# Errors


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {...}}` body with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
             503: "server_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or self.TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# --------------------------------------------------------------------------------------------
# Chat templates


TEMPLATE_KEYS = {"prefix", "message", "roles", "generation_prompt", "stop"}


@dataclass(frozen=True)
class ChatTemplate:
    """How chat messages become one prompt (see the module docstring)."""

    message: str = "{role}: {content}\n"
    roles: dict[str, str] = field(default_factory=dict)
    prefix: str = ""
    generation_prompt: str = "assistant:"
    stop: tuple[str, ...] = ("\nuser:",)

    def render(self, messages: Sequence[tuple[str, str]]) -> str:
        parts = [self.prefix]
        for role, content in messages:
            parts.append(self.roles.get(role, self.message).format(role=role, content=content))
        parts.append(self.generation_prompt)
        return "".join(parts)


def _check_format(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise UserError(f"{where} must be a string; got {text!r}")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        raise UserError(f"{where}: {exc} (write literal braces as {{{{ and }}}})") from None
    bad = [name for name in fields if name not in ("role", "content")]
    if bad:
        raise UserError(f"{where}: unknown field {{{bad[0]}}} (only {{role}} and {{content}}; write literal "
                        f"braces as {{{{ and }}}})")
    return text


def load_chat_template(path: str | Path | None) -> ChatTemplate:
    """The default template, or the one in a JSON file (refused with one line naming the problem)."""
    if path is None:
        return ChatTemplate()
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"chat template not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a JSON chat template ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a chat template is a JSON object with keys {sorted(TEMPLATE_KEYS)}")
    unknown = sorted(set(raw) - TEMPLATE_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key {unknown[0]!r} (expected {', '.join(sorted(TEMPLATE_KEYS))})")
    default = ChatTemplate()
    roles = raw.get("roles", {})
    if not isinstance(roles, dict):
        raise UserError(f"{path}: roles must be an object mapping a role to its format")
    stop = raw.get("stop", list(default.stop))
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise UserError(f"{path}: stop must be a list of non-empty strings")
    prefix = raw.get("prefix", default.prefix)
    generation_prompt = raw.get("generation_prompt", default.generation_prompt)
    for key, value in (("prefix", prefix), ("generation_prompt", generation_prompt)):
        if not isinstance(value, str):
            raise UserError(f"{path}: {key} must be a string; got {value!r}")
    return ChatTemplate(
        message=_check_format(raw.get("message", default.message), f"{path}: message"),
        roles={str(k): _check_format(v, f"{path}: roles.{k}") for k, v in roles.items()},
        prefix=prefix, generation_prompt=generation_prompt, stop=tuple(stop))


# --------------------------------------------------------------------------------------------
# Request bodies


class Body(BaseModel):
    """Fields both endpoints take. Unknown fields are ignored, as most OpenAI-compatible servers do;
    fields of OpenAI's API that would change the result and that we do not implement are refused
    (see `_unsupported`)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = Field(None, ge=1, le=MAX_N)
    stop: Optional[list[str]] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stream: Optional[bool] = False
    stream_options: Optional[dict[str, Any]] = None
    top_k: Optional[int] = Field(None, ge=-1)  # -1 or 0 = off
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    ignore_eos: Optional[bool] = False
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, Any]] = None
    user: Optional[str] = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise ValueError("must be a string or a list of strings")
        if len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(s == "" for s in value):
            raise ValueError("a stop string cannot be empty")
        return value

    @field_validator("stream_options", mode="before")
    @classmethod
    def _stream_options(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, dict):
            raise ValueError("must be an object")
        return value


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                           for t in value)


class CompletionBody(Body):
    prompt: Union[str, list[str], list[list[int]]]
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if _is_ids(value):
            return [value]  # one prompt as token ids
        if isinstance(value, list) and value and (all(isinstance(p, str) for p in value)
                                                  or all(_is_ids(p) for p in value)):
            if len(value) > MAX_PROMPTS:
                raise ValueError(f"at most {MAX_PROMPTS} prompts per request")
            return value
        raise ValueError("must be a string, a non-empty list of strings, a list of token ids or a list of "
                         "such lists")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: Optional[str] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str = Field(min_length=1)
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None


def _unsupported(body: Any) -> None:
    """Refuse OpenAI fields that would change the answer and that this server does not implement."""
    checks = [
        ("presence_penalty", body.presence_penalty not in (None, 0), "use repetition_penalty instead"),
        ("frequency_penalty", body.frequency_penalty not in (None, 0), "use repetition_penalty instead"),
        ("logit_bias", bool(body.logit_bias), None),
        ("logprobs", getattr(body, "logprobs", None) not in (None, False, 0), None),
        ("top_logprobs", getattr(body, "top_logprobs", None) not in (None, 0), None),
        ("suffix", bool(getattr(body, "suffix", None)), None),
        ("best_of", getattr(body, "best_of", None) not in (None, 1, body.n or 1), None),
        ("tools", bool(getattr(body, "tools", None)), None),
        ("functions", bool(getattr(body, "functions", None)), None),
        ("response_format", (getattr(body, "response_format", None) or {}).get("type", "text") != "text", None),
    ]
    for name, refused, hint in checks:
        if refused:
            raise _invalid(f"{name} is not supported by this server" + (f"; {hint}" if hint else ""), name,
                           "unsupported_parameter")


def _validation_error(exc: Any) -> APIError:
    """The first pydantic error as a 400 naming its field, e.g. `temperature: Input should be ...`."""
    errors = exc.errors(include_url=False)
    first = errors[0] if errors else {"loc": (), "msg": str(exc)}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return _invalid(f"{param}: {message}" if param else message, param)


# --------------------------------------------------------------------------------------------
# Jobs: one HTTP request (one or more sequences) on the asyncio side


class PromptText(str):
    """A prompt that carries its token ids (tokenized in a request handler, not the engine thread)."""

    ids: list[int]

    def __new__(cls, text: str, ids: list[int]) -> PromptText:
        obj = super().__new__(cls, text)
        obj.ids = ids
        return obj


class _Generator(Generator):
    """A Generator that takes the ids of a `PromptText` instead of tokenizing again."""

    def encode_prompt(self, prompt: str) -> list[int]:
        if isinstance(prompt, PromptText):
            return prompt.ids
        return super().encode_prompt(prompt)


@dataclass
class SequenceSpec:
    index: int  # the choice index
    prompt: PromptText
    params: SamplingParams


@dataclass
class Event:
    index: int
    text: str
    finished: bool
    finish_reason: str | None
    completion: Completion | None


_CANCELLED = object()


class Job:
    """The sequences of one HTTP request and the queue their events arrive on (event-loop side)."""

    def __init__(self, server: ServerState, sequences: list[SequenceSpec]):
        self.server = server
        self.sequences = sequences
        self.queue: asyncio.Queue = asyncio.Queue()
        self.remaining = len(sequences)
        self.completions: dict[int, Completion] = {}
        self.cancelled = False
        self.failed: APIError | None = None
        self._released = False
        self.rids: list[int] = []  # engine request ids: touched only by the engine thread

    @property
    def done(self) -> bool:
        return self.remaining == 0 or self.cancelled or self.failed is not None

    def deliver(self, events: list[Event]) -> None:
        if self.done:
            return
        for ev in events:
            if ev.finished:
                self.remaining -= 1
                if ev.completion is not None:
                    self.completions[ev.index] = ev.completion
        self.queue.put_nowait(events)
        if self.remaining == 0:
            self._release()

    def fail(self, error: APIError) -> None:
        if self.done:
            return
        self.failed = error
        self.queue.put_nowait(error)
        self._release()

    def cancel(self) -> None:
        """Stop this request's sequences (a no-op once it finished)."""
        if self.done:
            return
        self.cancelled = True
        self.queue.put_nowait(_CANCELLED)
        self.server.engine.cancel(self)
        self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self.server.in_flight -= len(self.sequences)

    async def events(self) -> AsyncIterator[list[Event]]:
        """Event batches until every sequence finished; raises the job's APIError if it failed."""
        while True:
            item = await self.queue.get()
            if item is _CANCELLED:
                return
            if isinstance(item, APIError):
                raise item
            yield item
            if self.remaining == 0 and self.queue.empty():
                return

    async def wait(self) -> list[Completion] | None:
        """Every sequence's Completion in order, or None if the job was cancelled."""
        async for _ in self.events():
            pass
        if self.cancelled:
            return None
        return [self.completions[s.index] for s in self.sequences]


# --------------------------------------------------------------------------------------------
# The engine thread


class EngineLoop:
    """The thread that owns the model: takes commands from a queue, steps, hands out events."""

    def __init__(self, make_generator: Callable[[], Generator]):
        self._make_generator = make_generator
        self.generator = make_generator()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._owners: dict[int, tuple[Job, int]] = {}  # engine request id -> (job, choice index)
        self._resumed = threading.Event()
        self._resumed.set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats: dict[str, Any] = {"running": 0, "waiting": 0, "steps": 0, "generated_tokens": 0}

    # -- called on the event loop -----------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="llmcli-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._inbox.put(("stop", None))
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, job: Job) -> None:
        self._inbox.put(("submit", job))

    def cancel(self, job: Job) -> None:
        self._inbox.put(("cancel", job))

    def pause(self) -> None:
        """Stop stepping (requests still queue up); for tests and maintenance."""
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()
        self._inbox.put(("wake", None))

    # -- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                stepping = self._resumed.is_set() and self.generator.has_work()
                if not self._take_commands(block=not stepping):
                    break
                if self._resumed.is_set() and self.generator.has_work():
                    self._step()
                self._publish()
        except BaseException:  # the loop itself broke: fail everything rather than hang clients
            log.exception("engine thread crashed")
            self._fail_all(APIError(500, "the generation engine stopped", type="server_error"))
            raise
        self._fail_all(APIError(503, "the server is shutting down"))

    def _take_commands(self, block: bool) -> bool:
        """Run every queued command (waiting for one first if `block`); False after `stop`."""
        while True:
            try:
                if block:
                    command, job = self._inbox.get(timeout=None if self._resumed.is_set() else 0.05)
                else:
                    command, job = self._inbox.get_nowait()
            except queue.Empty:
                return True
            block = False
            if command == "stop":
                return False
            if command == "submit":
                self._submit(job)
            elif command == "cancel":
                self._cancel(job)

    def _submit(self, job: Job) -> None:
        try:
            for seq in job.sequences:
                rid = self.generator.submit(seq.prompt, seq.params)
                job.rids.append(rid)
                self._owners[rid] = (job, seq.index)
        except UserError as exc:  # checked by the handler already; kept as a safety net
            self._cancel(job)
            self._send(job, APIError(400, str(exc)))

    def _cancel(self, job: Job) -> None:
        for rid in job.rids:
            if self._owners.pop(rid, None) is not None:
                self.generator.cancel(rid)

    def _step(self) -> None:
        try:
            text_events = self.generator.step()
        except Exception:
            log.exception("generation step failed; failing the running requests")
            self._fail_all(APIError(500, "generation failed (see the server log)", type="server_error"),
                           inbox=False)
            self.generator = self._make_generator()  # a fresh cache; the model is unchanged
            return
        self.stats["steps"] += 1
        self.stats["generated_tokens"] += len(text_events)
        by_job: dict[int, tuple[Job, list[Event]]] = {}
        for ev in text_events:
            owner = self._owners.get(ev.id)
            if owner is None:
                continue
            job, index = owner
            completion = None
            if ev.finished:
                completion = self.generator.completion(ev.id)
                del self._owners[ev.id]
            elif not ev.text:
                continue  # text held back (a partial character or a possible stop string)
            by_job.setdefault(id(job), (job, []))[1].append(
                Event(index, ev.text, ev.finished, ev.finish_reason, completion))
        if by_job:
            self._call(_deliver_all, list(by_job.values()))

    def _fail_all(self, error: APIError, *, inbox: bool = True) -> None:
        """Fail every job in the engine (and, with `inbox`, those submitted but not taken yet)."""
        jobs = {id(job): job for job, _ in self._owners.values()}
        for job in jobs.values():
            with contextlib.suppress(Exception):  # the engine may be broken: still answer everyone
                self._cancel(job)
        self._owners.clear()
        for job in jobs.values():
            self._send(job, error)
        while inbox:
            try:
                command, job = self._inbox.get_nowait()
            except queue.Empty:
                break
            if command == "submit":
                self._send(job, error)

    def _send(self, job: Job, error: APIError) -> None:
        self._call(job.fail, error)

    def _call(self, fn: Callable, *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _publish(self) -> None:
        engine = self.generator.engine
        self.stats = {**self.stats, "running": engine.num_running, "waiting": engine.num_waiting}


def _deliver_all(batches: list[tuple[Job, list[Event]]]) -> None:
    for job, events in batches:
        job.deliver(events)


# --------------------------------------------------------------------------------------------
# Server state and the ASGI app


@dataclass
class ServerState:
    engine: EngineLoop
    tokenizer: Any  # the request side's own copy (the engine thread decodes with the other)
    eot: int
    model_name: str
    block_size: int
    vocab_size: int
    max_batch_size: int
    max_queue: int
    template: ChatTemplate
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0  # sequences admitted and not finished (event-loop side)
    draining: bool = False
    requests: int = 0

    @property
    def capacity(self) -> int:
        return self.max_batch_size + self.max_queue

    def begin_shutdown(self) -> None:
        """From now on new requests get 503 (running ones go on)."""
        self.draining = True


class Guard:
    """Pure ASGI middleware: API key (401), shutting down (503), body size (413) before any route.

    The body is read here, bounded, and handed on in one piece; after that the app's `receive`
    is the server's own, so handlers can watch it for the client disconnecting.
    """

    def __init__(self, app: Any, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        error = None
        if path != "/health":
            if self.state.api_key is not None and not _authorized(headers.get("authorization"), self.state.api_key):
                error = APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
            elif self.state.draining:
                error = APIError(503, "the server is shutting down")
        length = headers.get("content-length")
        if error is None and length is not None:
            if not length.isdigit():
                error = _invalid("invalid Content-Length header")
            elif int(length) > self.state.max_body_bytes:
                error = _too_large(self.state.max_body_bytes)
        if error is not None:
            return await error.response()(scope, receive, send)

        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.state.max_body_bytes:
                return await _too_large(self.state.max_body_bytes).response()(scope, receive, send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit / 2**20:g} MiB", code="request_too_large")


def _authorized(header: str | None, key: str) -> bool:
    if not header or header[:7].lower() != "bearer ":  # the scheme is case-insensitive
        return False
    return hmac.compare_digest(header[7:].strip().encode(), key.encode())


def create_app(state: ServerState):
    """The FastAPI app serving `state`; its lifespan starts and stops the engine thread."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            state.draining = True
            await asyncio.to_thread(state.engine.stop)

    app = FastAPI(title="llmcli", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llm = state
    app.add_middleware(Guard, state=state)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path} (see GET /v1/models, POST /v1/completions, " \
                      f"POST /v1/chat/completions)"
            return APIError(404, message, code="not_found").response()
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return APIError(500, "internal server error (see the server log)", type="server_error").response()

    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "llmcli",
                "max_model_len": state.block_size}

    @app.get("/health")
    async def health():
        stats = state.engine.stats
        body = {"status": "shutting_down" if state.draining else "ok", "model": state.model_name,
                "running": stats["running"], "waiting": stats["waiting"], "in_flight": state.in_flight,
                "max_batch_size": state.max_batch_size, "max_queue": state.max_queue,
                "requests": state.requests, "generated_tokens": stats["generated_tokens"]}
        return JSONResponse(body, status_code=503 if state.draining else 200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(state, model_id)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _parse(request, CompletionBody)
        prompts = await _completion_prompts(state, body.prompt)
        return await _serve(state, request, body, prompts, chat=False,
                            max_tokens=body.max_tokens or DEFAULT_COMPLETION_TOKENS, extra_stop=())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _parse(request, ChatBody)
        text = state.template.render(_chat_messages(body.messages))
        prompt = await _encode(state, text, "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_CHAT_TOKENS
        return await _serve(state, request, body, [prompt], chat=True, max_tokens=max_tokens,
                            extra_stop=state.template.stop)

    return app


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"The model `{name}` does not exist; this server serves `{state.model_name}`",
                       param="model", code="model_not_found")


async def _parse(request: Request, model: type[Body]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _invalid("the request body must be a JSON object")
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    _check_model(request.app.state.llm, body.model)
    _unsupported(body)
    return body


def _chat_messages(messages: list[Any]) -> list[tuple[str, str]]:
    out = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise _invalid(f"messages.{i}.content.{j}: only text content is supported",
                                   f"messages.{i}.content.{j}")
                texts.append(part.text)
            content = "".join(texts)
        out.append((message.role, content or ""))
    return out


async def _encode(state: ServerState, text: str, param: str) -> PromptText:
    """Tokenize a text prompt (off the event loop when it is long); unknown characters are a 400."""
    from llmcli.tokenizer import encode, unknown_chars

    def work() -> PromptText | list[str]:
        unknown = unknown_chars(state.tokenizer, text)
        if unknown:
            return unknown
        return PromptText(text, encode(state.tokenizer, text) or [state.eot])

    result = await asyncio.to_thread(work) if len(text) > 4096 else work()
    if isinstance(result, list):
        shown = " ".join(repr(c) for c in result[:20]) + (" ..." if len(result) > 20 else "")
        raise _invalid(f"{param}: {len(result)} character(s) this model's tokenizer never saw: {shown}", param,
                       "unknown_characters")
    return result


async def _completion_prompts(state: ServerState, prompt: Any) -> list[PromptText]:
    from llmcli.tokenizer import decode

    if isinstance(prompt, str):
        return [await _encode(state, prompt, "prompt")]
    if all(isinstance(p, str) for p in prompt):
        return [await _encode(state, p, "prompt") for p in prompt]
    out = []
    for ids in prompt:
        bad = [t for t in ids if not 0 <= t < state.vocab_size]
        if bad:
            raise _invalid(f"prompt: token id {bad[0]} is outside the vocabulary (0..{state.vocab_size - 1})",
                           "prompt")
        out.append(PromptText(decode(state.tokenizer, ids), list(ids)))
    return out


def _sampling(body: Any, max_tokens: int, extra_stop: Sequence[str]) -> SamplingParams:
    stop = tuple(dict.fromkeys([*(body.stop or []), *extra_stop]))
    params = SamplingParams(
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_k=max(0, body.top_k or 0),
        top_p=1.0 if body.top_p is None else body.top_p,
        min_p=body.min_p or 0.0,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        seed=body.seed, stop=stop, ignore_eot=bool(body.ignore_eos))
    try:
        params.validate(cli=False)
    except UserError as exc:
        raise _invalid(str(exc).replace("max_new_tokens", "max_tokens")) from None
    return params


def _finish_reason(reason: str | None) -> str | None:
    if reason in (FINISH_EOT, FINISH_STOP):
        return "stop"
    if reason == FINISH_LENGTH:
        return "length"
    return reason


def _usage(prompts: list[PromptText], n: int, completions: list[Completion]) -> dict[str, int]:
    prompt_tokens = sum(completions[i * n].prompt_tokens for i in range(len(prompts)))
    completion_tokens = sum(c.tokens for c in completions)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _serve(state: ServerState, request: Any, body: Any, prompts: list[PromptText], *, chat: bool,
                 max_tokens: int, extra_stop: Sequence[str]) -> Response:
    params = _sampling(body, max_tokens, extra_stop)
    n = body.n or 1
    total = n * len(prompts)
    if total > state.capacity:
        raise _invalid(f"this request needs {total} sequences (prompts x n); this server holds at most "
                       f"{state.capacity} (--max-batch-size + --max-queue)", "n")
    if state.draining:
        raise APIError(503, "the server is shutting down")
    if not state.engine.alive:
        raise APIError(503, "the generation engine is not running (see the server log)")
    if state.in_flight + total > state.capacity:
        raise APIError(429, f"the server is busy: {state.in_flight} sequences running or queued (at most "
                            f"{state.capacity}); retry later", code="queue_full")
    for p in prompts:
        if len(p.ids) > state.block_size:
            log.info("a prompt of %d tokens keeps its last %d (the context window)", len(p.ids), state.block_size)
    sequences = [SequenceSpec(i * n + j, prompt, replace(params, seed=None if params.seed is None else params.seed + j))
                 for i, prompt in enumerate(prompts) for j in range(n)]
    job = Job(state, sequences)
    state.in_flight += total
    state.requests += 1
    state.engine.submit(job)

    ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
    created = int(time.time())
    echo = bool(getattr(body, "echo", False))
    if body.stream:
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        chunks = _stream_chunks(job, prompts, n, chat=chat, ident=ident, created=created, model=state.model_name,
                                echo=echo, include_usage=include_usage)
        return EventStream(chunks, job)

    watcher = asyncio.ensure_future(_cancel_on_disconnect(request.receive, job))
    try:
        completions = await job.wait()
    except asyncio.CancelledError:
        if not state.draining:
            raise
        return APIError(503, "the server shut down before this request finished").response()
    finally:
        watcher.cancel()
        job.cancel()
    if completions is None:
        return Response(status_code=499)  # the client disconnected: nobody reads this
    choices = []
    for seq, c in zip(sequences, completions, strict=True):
        reason = _finish_reason(c.finish_reason)
        if chat:
            choices.append({"index": seq.index, "message": {"role": "assistant", "content": c.completion},
                            "logprobs": None, "finish_reason": reason})
        else:
            text = (str(seq.prompt) + c.completion) if echo else c.completion
            choices.append({"index": seq.index, "text": text, "logprobs": None, "finish_reason": reason})
    return JSONResponse({"id": ident, "object": "chat.completion" if chat else "text_completion",
                         "created": created, "model": state.model_name, "choices": choices,
                         "usage": _usage(prompts, n, completions)})


async def _cancel_on_disconnect(receive: Callable, job: Job) -> None:
    """Wait for the client to go away (the body was read already), then cancel its job."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


async def _stream_chunks(job: Job, prompts: list[PromptText], n: int, *, chat: bool, ident: str, created: int,
                         model: str, echo: bool, include_usage: bool) -> AsyncIterator[bytes]:
    base = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model}
    if include_usage:
        base["usage"] = None

    def chunk(choices: list[dict[str, Any]]) -> str:
        return "data: " + json.dumps({**base, "choices": choices}, ensure_ascii=False) + "\n\n"

    def choice(index: int, text: str | None, reason: str | None, role: bool = False) -> dict[str, Any]:
        if not chat:
            return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}

    first = []
    for seq in job.sequences:
        if chat:
            first.append(chunk([choice(seq.index, "", None, role=True)]))
        elif echo:
            first.append(chunk([choice(seq.index, str(seq.prompt), None)]))
    if first:
        yield "".join(first).encode()
    try:
        async for events in job.events():
            out = []
            for ev in events:
                reason = _finish_reason(ev.finish_reason) if ev.finished else None
                if chat:
                    if ev.text:
                        out.append(chunk([choice(ev.index, ev.text, None)]))
                    if ev.finished:
                        out.append(chunk([choice(ev.index, None, reason)]))
                else:
                    out.append(chunk([choice(ev.index, ev.text, reason)]))
            yield "".join(out).encode()
    except APIError as error:
        yield ("data: " + json.dumps(error.body()) + "\n\n").encode()
        return
    if job.cancelled:
        return
    if include_usage:
        completions = [job.completions[s.index] for s in job.sequences]
        usage = {**base, "choices": [], "usage": _usage(prompts, n, completions)}
        yield ("data: " + json.dumps(usage) + "\n\n").encode()
    yield b"data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """A server-sent-event response that cancels its job when the client disconnects.

    Starlette's StreamingResponse may or may not watch for the disconnect depending on the ASGI
    version the server speaks (uvicorn's `send` silently drops data for a gone client), so this
    one watches `receive` itself and always cancels the job on the way out.
    """

    def __init__(self, chunks: AsyncIterator[bytes], job: Job):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        job = self.job
        watcher = asyncio.ensure_future(_cancel_on_disconnect(receive, job))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for data in self.body_iterator:
                if job.cancelled:
                    break
                await send({"type": "http.response.body", "body": data, "more_body": True})
            if not job.cancelled:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client went away while we wrote
            pass
        except asyncio.CancelledError:
            if not job.server.draining:
                raise
            # The shutdown grace period ran out: tell the client why the stream ends here.
            with contextlib.suppress(Exception):
                error = APIError(503, "the server shut down before this request finished")
                data = ("data: " + json.dumps(error.body()) + "\n\n").encode()
                await send({"type": "http.response.body", "body": data, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            job.cancel()
            await self.body_iterator.aclose()


# --------------------------------------------------------------------------------------------
# Building a server from a checkpoint, and the command


def default_model_name(run_dir: str | Path) -> str:
    """The run directory's name; `runs/char/best` gives `char/best`."""
    path = Path(run_dir).expanduser().resolve()
    if path.name in ("best", "last") and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


def build_state(model: Any, tokenizer: Any, *, model_name: str, api_key: str | None = None,
                max_batch_size: int = 16, max_queue: int = 64, template: ChatTemplate | None = None,
                max_body_bytes: int = MAX_BODY_BYTES) -> ServerState:
    """Everything a server needs for a loaded model (the engine thread starts with the app)."""
    from tokenizers import Tokenizer

    from llmcli.tokenizer import eot_id

    if max_batch_size < 1:
        raise UserError(f"--max-batch-size must be at least 1; got {max_batch_size}")
    if max_queue < 0:
        raise UserError(f"--max-queue must be 0 or more; got {max_queue}")
    if not model_name:
        raise UserError("--model-name cannot be empty")
    if api_key is not None and not api_key.strip():
        raise UserError(f"--api-key / {API_KEY_ENV} is empty")
    engine = EngineLoop(lambda: _Generator(model, tokenizer, max_batch_size=max_batch_size))
    return ServerState(engine=engine, tokenizer=Tokenizer.from_str(tokenizer.to_str()), eot=eot_id(tokenizer),
                       model_name=model_name, block_size=model.config.block_size,
                       vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), max_batch_size=max_batch_size,
                       max_queue=max_queue, template=template or ChatTemplate(), api_key=api_key,
                       max_body_bytes=max_body_bytes)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line UserError (address in use, unknown host...)."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535; got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    # proto must say TCP: asyncio turns Nagle's algorithm off (TCP_NODELAY) only for sockets that
    # do, and with it on, every streamed chunk after the first waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, kind, proto or socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = "the address is already in use" if exc.errno in (98, 48, 10048) else (exc.strerror or str(exc))
        raise UserError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def make_uvicorn_server(app: Any, *, log_level: str = "info", access_log: bool = True):
    """A uvicorn.Server whose first Ctrl-C (or SIGTERM) turns new requests away with 503."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.llm.begin_shutdown()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS, server_header=False)
    return Server(config)


def run_server(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               max_batch_size: int = 16, max_queue: int = 64, model_name: str | None = None,
               chat_template: str | Path | None = None, device: str = "auto", dtype: str = "auto",
               threads: int | None = None) -> None:
    """The `llmcli serve` command: load the checkpoint, bind, serve until Ctrl-C."""
    import torch

    from llmcli import ui
    from llmcli.checkpoint import resolve_checkpoint
    from llmcli.generate import load_for_inference, select_device, select_dtype

    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    template = load_chat_template(chat_template)
    resolve_checkpoint(run_dir)  # a bad RUN_DIR fails before anything else
    name = model_name if model_name is not None else default_model_name(run_dir)
    torch_device = select_device(device)
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1; got {threads}")
        torch.set_num_threads(threads)
    sock = bind_socket(host, port)
    try:
        _, model, tokenizer = load_for_inference(run_dir, torch_device, select_dtype(dtype, torch_device))
        params = sum(p.numel() for p in model.parameters())  # before the engine repacks any weights
        state = build_state(model, tokenizer, model_name=name, api_key=api_key, max_batch_size=max_batch_size,
                            max_queue=max_queue, template=template)
        app = create_app(state)
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        ui.log(f"serving {name} ({ui.format_count(params)} parameters, context {model.config.block_size}, "
               f"{torch_device.type}) at http://{shown}:{bound_port}/v1 - batch {max_batch_size}, queue "
               f"{max_queue}, API key {'required' if api_key else 'off'}; Ctrl-C stops")
        if api_key is None and not _is_loopback(bound_host):
            ui.log(f"warning: listening on {host} without an API key: anyone who can reach this port can use "
                   f"the model (set {API_KEY_ENV})")
        server = make_uvicorn_server(app)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled: we are done
            pass
    finally:
        sock.close()
