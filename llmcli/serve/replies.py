"""Serving one request: admission (400, 429, 503), its sequences handed to the engine thread, and
the answer — one JSON body once every sequence finished, or server-sent events per step. A client
that disconnects (the ASGI receive channel says so) cancels its sequences, which frees their slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from llmcli.constrain.grammar import Format
from llmcli.options.sampling import SamplingParams
from llmcli.serve.engine_loop import Job, Prompt, SequenceSpec
from llmcli.serve.protocol import DONE, APIError, Reply, invalid, sampling_params
from llmcli.serve.state import ServerState
from llmcli.serve.tools import Tool

log = logging.getLogger("uvicorn.error")  # shows in uvicorn's log format


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


def _sequences(prompts: list[Prompt], n: int, params: SamplingParams, fmt: Format | None,
               adapter: int) -> list[SequenceSpec]:
    """n choices per prompt; with a seed, choice j uses seed + j."""
    return [SequenceSpec(i * n + j, prompt, replace(params, seed=None if params.seed is None else params.seed + j),
                         fmt, adapter)
            for i, prompt in enumerate(prompts) for j in range(n)]


async def serve_request(state: ServerState, request: Request, body: Any, prompts: list[Prompt], *, chat: bool,
                        max_tokens: int, extra_stop: Sequence[str], fmt: Format | None = None,
                        tools: Sequence[Tool] = ()) -> Response:
    """Admit the request's sequences (constrained to `fmt` when given), then answer; with `tools`,
    chat replies are parsed into tool calls."""
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
    sequences = _sequences(prompts, n, params, fmt, state.adapter_index(body.model))
    job = Job(state.engine, sequences, on_release=state.release)
    state.in_flight += len(job.sequences)
    state.requests += 1
    state.engine.submit(job)

    echo = bool(getattr(body, "echo", False))
    reply = Reply.new(chat, body.model or state.model_name, include_usage=bool((body.stream_options or {}).get("include_usage")),
                      tools=tools)
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
