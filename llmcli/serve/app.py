"""The ASGI app: its routes and error handlers, over guard.py (before any route), prompts.py
(bodies and prompts) and replies.py (serving a request: JSON or streamed).

Endpoints (OpenAI semantics, JSON in and out; the wire format is in protocol.py):

* `GET /v1/models` (and `/v1/models/{id}`): the one model served. `GET /health`: status and load
  (running and waiting sequences); it needs no API key and answers 503 while the server shuts down.
* `POST /v1/completions`: `prompt` (a string, a list of strings, or token ids), `max_tokens`
  (default 16), `temperature` (default 1), `top_p`, `n`, `stop`, `seed`, `stream`,
  `stream_options.include_usage`, `echo`, `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`.
  With a seed, choice j of every prompt uses seed + j (as `llmcli generate --num-samples`).
* `POST /v1/chat/completions`: `messages` rendered into one prompt by the chat template (chat.py),
  the same options (`max_tokens` or `max_completion_tokens`, default 256), streamed as
  `choices[].delta` chunks; `tools` and `tool_choice` (tools.py) answered with `tool_calls`.
* Both take `response_format` (json_object, json_schema, and llmcli's regex and grammar): the reply
  is constrained to it token by token (llmcli/constrain/).
* `POST /v1/embeddings`: `input` (a string, strings, token ids or lists of them), `encoding_format`
  float or base64; one unit vector per input, pooled as the family says (llmcli/embed.py).
* With `--adapter NAME=RUN`, `model` picks the base or one of its LoRA adapters, per request.

A prompt longer than the context window keeps its last block_size tokens (`usage.prompt_tokens`
counts what the model saw).

A sequence-to-sequence model (`task` seq2seq) translates instead of continuing: /v1/completions
takes each prompt as a source (token-id prompts are source ids), /v1/chat/completions the content
of the last user message (the chat template does not apply); the completion is the target. A
source longer than the encoder takes, or an empty one, is a 400. Handlers tokenize on the event
loop (off it when long) and hand token ids to the engine thread (engine_loop.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from llmcli.errors import UserError
from llmcli.generate.outputs import CacheUse
from llmcli.serve.guard import Guard
from llmcli.serve.metrics import CONTENT_TYPE
from llmcli.serve.prompts import (
    check_model,
    checked_format,
    completion_prompts,
    embedding_inputs,
    encode_prompt,
    parse_body,
    request_tools,
)
from llmcli.serve.protocol import (
    DEFAULT_CHAT_TOKENS,
    DEFAULT_COMPLETION_TOKENS,
    APIError,
    ChatBody,
    CompletionBody,
    EmbeddingBody,
    chat_messages,
    embedding_body,
    invalid,
    output_format,
)
from llmcli.serve.replies import serve_request
from llmcli.serve.state import ServerState
from llmcli.serve.tools import call_format

log = logging.getLogger("uvicorn.error")  # shows in uvicorn's log format


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
        for path, model in (("/v1/completions", CompletionBody), ("/v1/chat/completions", ChatBody),
                            ("/v1/embeddings", EmbeddingBody)):
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


def _embed(state: ServerState, inputs: list[list[int]], adapter: int):
    """The inputs' vectors, one request at a time (a worker thread, beside the engine's)."""
    with state.embed_lock:
        if state.adapters is None:
            return state.embedder.vectors(inputs)
        with state.adapters.selected([adapter] * len(inputs)):
            return state.embedder.vectors(inputs)


def _add_routes(app: FastAPI, state: ServerState) -> None:
    def model_card(name: str) -> dict[str, Any]:
        card = {"id": name, "object": "model", "created": state.created, "owned_by": "llmcli",
                "max_model_len": state.block_size}
        return card if name == state.model_name else {**card, "parent": state.model_name}

    @app.get("/health")
    async def health():
        stats = state.engine.stats
        body = {"status": "shutting_down" if state.draining else "ok", "model": state.model_name,
                "running": stats.running, "waiting": stats.waiting, "in_flight": state.in_flight,
                "max_batch_size": state.max_batch_size, "max_queue": state.max_queue,
                "requests": state.requests, "generated_tokens": stats.generated_tokens,
                "kv_cache": _cache_health(stats.cache)}
        return JSONResponse(body, status_code=503 if state.draining else 200)

    def _cache_health(cache: CacheUse) -> dict[str, Any]:
        out = {"slots_used": cache.slots_used, "slots": cache.slots_total, "tokens": cache.tokens}
        if cache.paged:
            out.update(blocks_used=cache.blocks_used, blocks=cache.blocks_total,
                       prefix_hit_rate=round(cache.prefix_hit_rate, 4), preemptions=cache.preemptions)
        return out

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.exposition(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(name) for name in state.model_names]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(state, model_id)
        return model_card(model_id)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body = await parse_body(request, EmbeddingBody)
        inputs = embedding_inputs(state, body)
        if state.draining:
            raise APIError(503, "the server is shutting down")
        adapter = state.adapter_index(body.model)
        vectors = await asyncio.to_thread(_embed, state, inputs, adapter)
        if body.dimensions is not None and body.dimensions != vectors.shape[1]:
            raise invalid(f"dimensions: this model's embeddings have {vectors.shape[1]} dimensions and cannot be "
                          "shortened (it was not trained to keep meaning in a prefix of them)", "dimensions")
        return embedding_body(body, vectors, sum(len(ids) for ids in inputs), body.model or state.model_name)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse_body(request, CompletionBody)
        fmt = await checked_format(state, output_format(body), "response_format")
        prompts = await completion_prompts(state, body.prompt)
        return await serve_request(state, request, body, prompts, chat=False,
                                   max_tokens=body.max_tokens or DEFAULT_COMPLETION_TOKENS, extra_stop=(), fmt=fmt)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatBody)
        messages = chat_messages(body.messages)
        fmt = output_format(body)
        mode, tools = request_tools(state, body)
        if mode == "required":
            if fmt is not None:
                raise invalid("response_format: tool_choice already constrains the reply to a tool call; give one "
                              "of them", "response_format")
            fmt = await checked_format(state, call_format(tools), "tools")
        else:
            fmt = await checked_format(state, fmt, "response_format")
        if state.task == "seq2seq":  # the last user message is the source
            users = [m["content"] for m in messages if m["role"] == "user"]
            if not users:
                raise invalid("messages: a sequence-to-sequence model needs a user message (its source)", "messages")
            prompt, stop = await encode_prompt(state, users[-1], "messages"), ()
        else:
            try:
                text = state.template.render(messages, tools=[t.spec() for t in tools] if mode != "none" else None)
            except UserError as exc:  # the chat template refused the conversation
                raise invalid(str(exc), "messages", "chat_template_error") from None
            prompt, stop = await encode_prompt(state, text, "messages"), state.template.stop
        max_tokens = body.max_completion_tokens or body.max_tokens or DEFAULT_CHAT_TOKENS
        return await serve_request(state, request, body, [prompt], chat=True, max_tokens=max_tokens, extra_stop=stop,
                                   fmt=fmt, tools=tools if mode != "none" else [])
