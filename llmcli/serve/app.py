"""The ASGI app: its routes, request handling, streaming and disconnect watching.

Endpoints (OpenAI semantics, JSON in and out; the wire format is in protocol.py):

* `GET /v1/models` (and `/v1/models/{id}`): the one model served. `GET /health`: status and load
  (running and waiting sequences); it needs no API key and answers 503 while the server shuts down.
* `POST /v1/completions`: `prompt` (a string, a list of strings, or token ids), `max_tokens`
  (default 16), `temperature` (default 1), `top_p`, `n`, `stop`, `seed`, `stream`,
  `stream_options.include_usage`, `echo`, `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`.
  With a seed, choice j of every prompt uses seed + j (as `llmcli generate --num-samples`).
* `POST /v1/chat/completions`: `messages` rendered into one prompt by the chat template (chat.py),
  the same options (`max_tokens` or `max_completion_tokens`, default 256), streamed as
  `choices[].delta` chunks.

A prompt longer than the context window keeps its last block_size tokens (`usage.prompt_tokens`
counts what the model saw).

A sequence-to-sequence model (`task` seq2seq) translates instead of continuing: /v1/completions
takes each prompt as a source (token-id prompts are source ids), /v1/chat/completions the content
of the last user message (the chat template does not apply); the completion is the target. A
source longer than the encoder takes, or an empty one, is a 400. Handlers tokenize on the event loop (off it when long) and hand token
ids to the engine thread (engine_loop.py). A handler that sees its client disconnect (it watches
the ASGI receive channel) cancels its sequences, which frees their slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from llmcli.chat_template import ChatTemplate, JinjaTemplate
from llmcli.errors import UserError
from llmcli.options.sampling import SamplingParams
from llmcli.serve.engine_loop import EngineLoop, Job, Prompt, SequenceSpec
from llmcli.serve.metrics import CONTENT_TYPE, ServerMetrics
from llmcli.serve.protocol import (
    DEFAULT_CHAT_TOKENS,
    DEFAULT_COMPLETION_TOKENS,
    DONE,
    MAX_BODY_BYTES,
    APIError,
    Body,
    ChatBody,
    CompletionBody,
    Reply,
    chat_messages,
    invalid,
    sampling_params,
    too_large,
    unsupported,
    validation_error,
)
from llmcli.tokenizer import decode, encode, unknown_chars

log = logging.getLogger("uvicorn.error")  # shows in uvicorn's log format

LONG_PROMPT_CHARS = 4096  # longer text prompts are tokenized off the event loop


@dataclass
class ServerState:
    """What the app serves, and its load (changed on the event loop only)."""

    engine: EngineLoop
    tokenizer: Any  # the request side's own copy (the engine thread decodes with the other)
    eot: int
    model_name: str
    block_size: int | None
    vocab_size: int
    max_batch_size: int
    max_queue: int
    template: ChatTemplate | JinjaTemplate
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    task: str = "lm"  # seq2seq: prompts are sources (`tokenizer` is the source side's)
    source_length: int | None = None  # seq2seq: the most source tokens the encoder takes
    max_prompt_tokens: int | None = None  # what a paged KV cache holds (None: no limit of its own)
    metrics: ServerMetrics = field(default_factory=ServerMetrics)  # the engine loop's own, when it has one
    speculative: bool = False  # the engine decodes speculatively (it refuses a repetition penalty)
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0  # sequences admitted and not finished
    draining: bool = False
    requests: int = 0

    @property
    def capacity(self) -> int:
        return self.max_batch_size + self.max_queue

    def begin_shutdown(self) -> None:
        """From now on new requests get 503 (running ones go on)."""
        self.draining = True

    def release(self, job: Job) -> None:
        self.in_flight -= len(job.sequences)


# --------------------------------------------------------------------------------------------
# Before any route: API key, shutdown, body size


class Guard:
    """Pure ASGI middleware: API key (401), shutting down (503), body size (413) before any route.

    The body is read here, bounded, and handed on in one piece; after that the app's `receive`
    is the server's own, so handlers can watch it for the client disconnecting. Every response's
    status is counted for /metrics here, refusals included.
    """

    def __init__(self, app: Any, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        outer, path = send, scope.get("path", "")

        async def send(message):
            if message["type"] == "http.response.start":
                self.state.metrics.response(path, message["status"])
            await outer(message)

        error = self._refusal(scope)
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
                return await too_large(self.state.max_body_bytes).response()(scope, receive, send)
            chunks.append(body)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    def _refusal(self, scope) -> APIError | None:
        """The error that answers this request before its body is read, if any."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.state.api_key
        if scope.get("path", "") not in PUBLIC_PATHS:
            if key is not None and not _authorized(headers.get("authorization"), key):
                return APIError(401, "Incorrect or missing API key: send the header "
                                     "'Authorization: Bearer KEY'", code="invalid_api_key")
            if self.state.draining:
                return APIError(503, "the server is shutting down")
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            return invalid("invalid Content-Length header")
        if length is not None and int(length) > self.state.max_body_bytes:
            return too_large(self.state.max_body_bytes)
        return None


PUBLIC_PATHS = ("/health", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")  # no API key needed


def _authorized(header: str | None, key: str) -> bool:
    if not header or header[:7].lower() != "bearer ":  # the scheme is case-insensitive
        return False
    return hmac.compare_digest(header[7:].strip().encode(), key.encode())


# --------------------------------------------------------------------------------------------
# The app


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving `state`; its lifespan starts and stops the engine thread."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.engine.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            state.draining = True
            await asyncio.to_thread(state.engine.stop)

    app = FastAPI(title="llmcli", lifespan=lifespan, description="An OpenAI-compatible API (llmcli serve).")
    app.state.llm = state
    state.metrics.watch(lambda: state.engine.stats)
    app.add_middleware(Guard, state=state)
    _add_error_handlers(app)
    _add_routes(app, state)
    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema of the routes, with the request bodies the handlers validate themselves."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for path, model in (("/v1/completions", CompletionBody), ("/v1/chat/completions", ChatBody)):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
            ref = {"$ref": f"#/components/schemas/{model.__name__}"}
            schema["paths"][path]["post"]["requestBody"] = {"required": True,
                                                             "content": {"application/json": {"schema": ref}}}
        app.openapi_schema = schema
    return app.openapi_schema


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path} (see GET /v1/models, POST /v1/completions, " \
                      f"POST /v1/chat/completions)"
            return APIError(404, message, code="not_found").response()
        return APIError(exc.status_code, str(exc.detail)).response(exc.headers)  # 405 keeps its Allow

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return APIError(500, "internal server error (see the server log)", type="server_error").response()


def _add_routes(app: FastAPI, state: ServerState) -> None:
    def model_card() -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "llmcli",
                "max_model_len": state.block_size}

    @app.get("/health")
    async def health():
        stats = state.engine.stats
        body = {"status": "shutting_down" if state.draining else "ok", "model": state.model_name,
                "running": stats["running"], "waiting": stats["waiting"], "in_flight": state.in_flight,
                "max_batch_size": state.max_batch_size, "max_queue": state.max_queue,
                "requests": state.requests, "generated_tokens": stats["generated_tokens"],
                "kv_cache": _cache_health(stats)}
        return JSONResponse(body, status_code=503 if state.draining else 200)

    def _cache_health(stats: dict[str, Any]) -> dict[str, Any]:
        out = {"slots_used": stats["kv_slots_used"], "slots": stats["kv_slots_total"], "tokens": stats["kv_tokens"]}
        if "kv_blocks_total" in stats:
            out.update(blocks_used=stats["kv_blocks_used"], blocks=stats["kv_blocks_total"],
                       prefix_hit_rate=round(stats["prefix_hit_rate"], 4), preemptions=stats["preemptions"])
        return out

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

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
        messages = chat_messages(body.messages)
        if state.task == "seq2seq":  # the last user message is the source
            users = [content for role, content in messages if role == "user"]
            if not users:
                raise invalid("messages: a sequence-to-sequence model needs a user message (its source)", "messages")
            prompt, stop = await _encode(state, users[-1], "messages"), ()
        else:
            try:
                text = state.template.render(messages)
            except UserError as exc:  # the chat template refused the conversation
                raise invalid(str(exc), "messages", "chat_template_error") from None
            prompt, stop = await _encode(state, text, "messages"), state.template.stop
        max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_CHAT_TOKENS
        return await _serve(state, request, body, [prompt], chat=True, max_tokens=max_tokens, extra_stop=stop)


# --------------------------------------------------------------------------------------------
# Request parsing


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"The model `{name}` does not exist; this server serves `{state.model_name}`",
                       param="model", code="model_not_found")


async def _parse(request: Request, model: type[Body]) -> Any:
    """The request's body as `model`; a 400 for bad JSON, bad fields or unsupported ones."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except RecursionError:
        raise invalid("the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise invalid("the request body must be a JSON object")
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    except RecursionError:
        raise invalid("the request body is nested too deeply") from None
    _check_model(request.app.state.llm, body.model)
    unsupported(body)
    return body


async def _encode(state: ServerState, text: str, param: str) -> Prompt:
    """Tokenize a text prompt (off the event loop when it is long); unknown characters are a 400."""

    if state.task == "seq2seq" and not text.strip():
        raise invalid(f"{param}: the source is empty", param)

    def work() -> Prompt | list[str]:
        unknown = unknown_chars(state.tokenizer, text)
        if unknown:
            return unknown
        if state.task == "seq2seq":
            return Prompt(text, encode(state.tokenizer, text) + [state.eot])  # the source, with its end token
        return Prompt(text, encode(state.tokenizer, text) or [state.eot])  # "": a new document

    result = await asyncio.to_thread(work) if len(text) > LONG_PROMPT_CHARS else work()
    if isinstance(result, list):
        shown = " ".join(repr(c) for c in result[:20]) + (" ..." if len(result) > 20 else "")
        raise invalid(f"{param}: {len(result)} character(s) this model's tokenizer never saw: {shown}", param,
                      "unknown_characters")
    _check_source_length(state, result.ids, param)
    return result


def _check_source_length(state: ServerState, ids: list[int], param: str) -> None:
    if state.source_length is not None and len(ids) > state.source_length:
        raise invalid(f"{param}: the source has {len(ids)} tokens (with its end token); this model's encoder takes "
                      f"at most {state.source_length}", param, "source_too_long")


async def _completion_prompts(state: ServerState, prompt: Any) -> list[Prompt]:
    """The body's `prompt` (a string, strings, or lists of token ids) as Prompts."""
    if isinstance(prompt, str):
        return [await _encode(state, prompt, "prompt")]
    if all(isinstance(p, str) for p in prompt):
        return [await _encode(state, p, "prompt") for p in prompt]
    out = []
    for ids in prompt:
        bad = [t for t in ids if not 0 <= t < state.vocab_size]
        if bad:
            raise invalid(f"prompt: token id {bad[0]} is outside the vocabulary (0..{state.vocab_size - 1})",
                          "prompt")
        if state.task == "seq2seq":  # source ids: the end token is added when missing
            ids = list(ids) if ids[-1] == state.eot else [*ids, state.eot]
            _check_source_length(state, ids, "prompt")
        out.append(Prompt(decode(state.tokenizer, ids, skip_special_tokens=state.task == "seq2seq"), list(ids)))
    return out


# --------------------------------------------------------------------------------------------
# Serving a request


def _admit(state: ServerState, total: int) -> None:
    """Refuse a request of `total` sequences the server cannot take now (400, 503 or 429)."""
    if total > state.capacity:
        raise invalid(f"this request needs {total} sequences (prompts x n); this server holds at most "
                      f"{state.capacity} (--max-batch-size + --max-queue)", "n")
    if state.draining:
        raise APIError(503, "the server is shutting down")
    if not state.engine.alive:
        raise APIError(503, "the generation engine is not running (see the server log)")
    if state.in_flight + total > state.capacity:
        raise APIError(429, f"the server is busy: {state.in_flight} sequences running or queued (at most "
                            f"{state.capacity}); retry later", code="queue_full")


def _check_prompt_fits(state: ServerState, ids: list[int]) -> None:
    kept = min(len(ids), state.block_size or len(ids))
    if state.task == "lm" and state.max_prompt_tokens is not None and kept > state.max_prompt_tokens:
        raise invalid(f"prompt: {kept} tokens; this server's paged KV cache holds at most {state.max_prompt_tokens} "
                      "(--num-blocks / --kv-cache-memory)", "prompt", "prompt_too_long")


def _sequences(prompts: list[Prompt], n: int, params: SamplingParams) -> list[SequenceSpec]:
    """n choices per prompt; with a seed, choice j uses seed + j."""
    return [SequenceSpec(i * n + j, prompt, replace(params, seed=None if params.seed is None else params.seed + j))
            for i, prompt in enumerate(prompts) for j in range(n)]


async def _serve(state: ServerState, request: Request, body: Any, prompts: list[Prompt], *, chat: bool,
                 max_tokens: int, extra_stop: Sequence[str]) -> Response:
    params = sampling_params(body, max_tokens, extra_stop)
    if state.speculative and params.repetition_penalty != 1.0:
        raise invalid("repetition_penalty: this server decodes speculatively (--draft or --prompt-lookup), which "
                      "takes no repetition penalty (it would change between guesses)", "repetition_penalty")
    n = body.n or 1
    _admit(state, n * len(prompts))
    for p in prompts:
        if state.task == "lm" and state.block_size is not None and len(p.ids) > state.block_size:
            log.info("a prompt of %d tokens keeps its last %d (the context window)", len(p.ids), state.block_size)
        _check_prompt_fits(state, p.ids)
    job = Job(state.engine, _sequences(prompts, n, params), on_release=state.release)
    state.in_flight += len(job.sequences)
    state.requests += 1
    state.engine.submit(job)

    echo = bool(getattr(body, "echo", False))
    reply = Reply.new(chat, state.model_name, include_usage=bool((body.stream_options or {}).get("include_usage")))
    if body.stream:
        return EventStream(_stream(job, reply, n, echo), job, state)
    return await _answer(state, request, job, reply, n, echo)


async def _answer(state: ServerState, request: Request, job: Job, reply: Reply, n: int, echo: bool) -> Response:
    """The whole response once every sequence finished (499 if the client went away)."""
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
    texts = [(seq.prompt.text if echo else "") + c.completion
             for seq, c in zip(job.sequences, completions, strict=True)]
    return JSONResponse(reply.body([seq.index for seq in job.sequences], texts, completions, n))


async def _cancel_on_disconnect(receive: Callable, job: Job) -> None:
    """Wait for the client to go away (the body was read already), then cancel its job."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


async def _stream(job: Job, reply: Reply, n: int, echo: bool) -> AsyncIterator[bytes]:
    """The job's server-sent events: opening chunks, one batch per step, usage, [DONE]."""
    opening = reply.opening([(seq.index, seq.prompt.text) for seq in job.sequences], echo)
    if opening:
        yield opening.encode()
    try:
        async for events in job.events():
            yield reply.events(events).encode()
    except APIError as error:
        yield error.event().encode()
        return
    if job.cancelled:
        return
    if reply.include_usage:
        yield reply.usage_chunk([job.completions[s.index] for s in job.sequences], n).encode()
    yield DONE.encode()


class EventStream(StreamingResponse):
    """A server-sent-event response that cancels its job when the client disconnects.

    Starlette's StreamingResponse may or may not watch for the disconnect depending on the ASGI
    version the server speaks (uvicorn's `send` silently drops data for a gone client), so this
    one watches `receive` itself and always cancels the job on the way out.
    """

    def __init__(self, chunks: AsyncIterator[bytes], job: Job, state: ServerState):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job, self.state = job, state

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
            if not self.state.draining:
                raise
            await self._shut_down(send)
        finally:
            watcher.cancel()
            job.cancel()
            await self.body_iterator.aclose()

    async def _shut_down(self, send) -> None:
        """The shutdown grace period ran out: tell the client why the stream ends here."""
        with contextlib.suppress(Exception):
            data = APIError(503, "the server shut down before this request finished").event().encode()
            await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
