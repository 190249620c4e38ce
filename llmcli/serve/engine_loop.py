"""The engine thread: the one thread that owns the model, and the jobs it serves.

Request handlers run on the asyncio event loop; they tokenize a request, then hand it to the engine
thread as a `Job` through a thread-safe queue (`EngineLoop.submit`). Between steps the engine thread
takes every queued command (new requests join the running batch at the next step, cancelled ones
leave at once), calls `Generator.step()`, and hands each step's text to the jobs' asyncio queues
with one `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from llmcli.constrain.grammar import Format
from llmcli.errors import UserError
from llmcli.generate.outputs import CacheUse
from llmcli.generate.text import Completion, Generator
from llmcli.options.sampling import SamplingParams
from llmcli.serve.metrics import ServerMetrics, TokenClock
from llmcli.serve.protocol import APIError

if TYPE_CHECKING:
    from llmcli.generate.compiled import Warmup

log = logging.getLogger("uvicorn.error")  # shows in uvicorn's log format


@dataclass(frozen=True)
class Prompt:
    """A prompt's token ids (what the engine runs) and its text (what `echo` returns)."""

    text: str
    ids: list[int]


@dataclass
class SequenceSpec:
    index: int  # the choice index
    prompt: Prompt
    params: SamplingParams
    format: Format | None = None  # the output's format (constrained decoding), None: free text
    adapter: int = 0  # the LoRA adapter its rows use (0: the base)


@dataclass
class Event:
    """New text of one sequence after one step; `completion` once it finished."""

    index: int
    text: str
    finished: bool
    finish_reason: str | None
    completion: Completion | None


@dataclass(frozen=True)
class LoopStats:
    """The engine's load as the engine thread last published it (/health, /metrics)."""

    running: int
    waiting: int
    steps: int
    generated_tokens: int
    cache: CacheUse


_CANCELLED = object()


class Job:
    """The sequences of one HTTP request and the queue their events arrive on (event-loop side).

    `on_release(job)` runs once when the job stops holding sequences (finished, failed or cancelled).
    """

    def __init__(self, engine: EngineLoop, sequences: list[SequenceSpec],
                 on_release: Callable[[Job], None] = lambda job: None):
        self.engine = engine
        self.sequences = sequences
        self.queue: asyncio.Queue = asyncio.Queue()
        self.remaining = len(sequences)
        self.completions: dict[int, Completion] = {}
        self.cancelled = False
        self.failed: APIError | None = None
        self._on_release = on_release
        self._released = False
        self.rids: list[int] = []  # engine request ids: touched only by the engine thread
        self.arrived = time.perf_counter()  # for the time to first token

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
        self.engine.cancel(self)
        self._release()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self._on_release(self)

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


class EngineLoop:
    """The thread that owns the model: takes commands from a queue, steps, hands out events."""

    def __init__(self, make_generator: Callable[[], Generator], metrics: ServerMetrics | None = None):
        self._make_generator = make_generator
        self._warm = False  # whether a generator made after a failed step is warmed up too
        self.metrics = metrics
        self._clock = TokenClock(metrics)
        self.generator = make_generator()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._owners: dict[int, tuple[Job, int]] = {}  # engine request id -> (job, choice index)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = LoopStats(0, 0, 0, 0, self.generator.engine.cache_use())

    @property
    def compiled_buckets(self) -> tuple[int, ...]:
        """The batch shapes the engine's decode step is compiled for (none: not compiled)."""
        return self.generator.engine.compiled_buckets

    def warm_up(self) -> Warmup | None:
        """Compile the engine's decode step for every batch shape before the thread starts (see
        Engine.warm_up); None where it is not compiled."""
        self._warm = True
        return self.generator.engine.warm_up()

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

    # -- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._take_commands(block=not self.generator.has_work()):
                if self.generator.has_work():
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
                command, job = self._inbox.get() if block else self._inbox.get_nowait()
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
                rid = self.generator.submit(seq.prompt.ids, seq.params, seq.format, seq.adapter)
                job.rids.append(rid)
                self._owners[rid] = (job, seq.index)
                if self.metrics is not None:
                    self.metrics.prompt_tokens.inc(len(self.generator.request(rid).prompt_ids))
        except UserError as exc:  # checked by the handler already; kept as a safety net
            self._cancel(job)
            self._send(job, APIError(400, str(exc)))

    def _cancel(self, job: Job) -> None:
        for rid in job.rids:
            if self._owners.pop(rid, None) is not None:
                self.generator.cancel(rid)
                self._clock.forget(rid)

    def _step(self) -> None:
        engine = self.generator.engine
        guesses = engine.stats.proposed_tokens, engine.stats.accepted_tokens
        try:
            text_events = self.generator.step()
        except Exception:
            log.exception("generation step failed; failing the running requests")
            self._fail_all(APIError(500, "generation failed (see the server log)", type="server_error"),
                           inbox=False)
            self.generator = self._make_generator()  # a fresh cache; the model is unchanged
            if self._warm:
                self.generator.engine.warm_up()
            return
        self.stats = replace(self.stats, steps=self.stats.steps + 1,
                             generated_tokens=self.stats.generated_tokens + len(text_events))
        if self.metrics is not None and engine.speculative:
            self.metrics.speculated(engine.stats.proposed_tokens - guesses[0], engine.stats.accepted_tokens - guesses[1])
        by_job: dict[int, tuple[Job, list[Event]]] = {}
        for ev in text_events:
            owner = self._owners.get(ev.id)
            if owner is None:
                continue
            job, index = owner
            self._clock.token(ev.id, job.arrived, ev.finished)
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
        self.stats = replace(self.stats, running=engine.num_running, waiting=engine.num_waiting,
                             cache=engine.cache_use())


def _deliver_all(batches: list[tuple[Job, list[Event]]]) -> None:
    for job, events in batches:
        job.deliver(events)
