"""The engine on its own thread, for the HTTP server.

The server's event loop hands requests to `EngineLoop.submit` and reads each one's events from its
`RequestStream`; the engine thread steps the engine whenever it has requests or a finetune job, and delivers the
events of each step to the streams through the event loop (`call_soon_threadsafe`). After each step it hands a
`Snapshot` of the engine's state to `on_snapshot` (the metrics), so no other thread reads the engine's own
structures. Between steps it runs what `call` queued and lets the fine-tuning jobs (`jobs`) follow their work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from harli_jax.errors import HarliError
from harli_jax.runtime.engine import Engine
from harli_jax.runtime.metrics import StepRecord
from harli_jax.runtime.processing import RequestError
from harli_jax.runtime.request import Event, FinishedEvent, GenerationOutput, Request, TokenEvent

log = logging.getLogger("harli_jax")
ENGINE_THREAD = "harli-engine"  # the engine thread's name


class QueueFull(HarliError):
    """The engine already holds as many requests as it may (running and waiting)."""


class EngineStopped(HarliError):
    """The engine thread is not running (stopped, or failed: the server's log says why)."""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The engine's state after its latest step, as the engine thread saw it."""

    running: int = 0
    waiting: int = 0
    kv_pages: int = 0
    lease_pages: int = 0
    free_pages: int = 0
    capacity_pages: int = 1
    trained_tokens: int = 0
    step: StepRecord | None = None  # the record of a step no earlier snapshot carried
    resident_adapters: tuple[str, ...] = ()  # the LoRA adapters in resident slots (loaded, ready to serve), sorted
    waiting_adapters: tuple[str, ...] = ()  # the LoRA adapters of the waiting requests, sorted
    page_tokens: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_pages / self.capacity_pages


class RequestStream:
    """One request's events, in order, ending with its FinishedEvent (read on the server's event loop)."""

    def __init__(self, request_id: str, queue: asyncio.Queue):
        self.request_id = request_id
        self._queue = queue

    async def events(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, FinishedEvent):
                return


class Jobs(Protocol):
    """What the engine thread drives besides requests (server.finetuning.FineTuning)."""

    def tick(self, engine: Engine) -> None: ...

    def shutdown(self, engine: Engine) -> None: ...


class EngineLoop:
    """Runs `engine` on a thread of its own; `max_waiting` (None: no limit) bounds the requests admitted beyond
    the engine's batch. On the engine thread, `on_finished` sees every finished request's output (whether or not
    its client still reads), `on_snapshot` the engine's state after every step, and `jobs` ticks between steps
    and shuts down after the last one."""

    def __init__(self, engine: Engine, max_waiting: int | None = None, *,
                 on_finished: Callable[[GenerationOutput], None] | None = None,
                 on_snapshot: Callable[[Snapshot], None] | None = None, jobs: Jobs | None = None):
        self.engine, self.jobs = engine, jobs
        self.on_finished, self.on_snapshot = on_finished, on_snapshot
        batch = engine.config.scheduler.max_batch
        self.max_requests = None if max_waiting is None else batch + max_waiting
        self.failure: BaseException | None = None
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._published = -1  # the index of the last step record a snapshot carried
        self._calls: deque[tuple[Callable[[], Any], concurrent.futures.Future]] = deque()
        self._lock = threading.Lock()  # guards _streams and _calls
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=ENGINE_THREAD, daemon=True)

    # The server's side ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._streams)

    def submit(self, request: Request) -> RequestStream:
        """Queues `request` (its `request_id` set) from the server's event loop: RequestError when the engine
        refuses it, QueueFull when `max_waiting` requests already wait, EngineStopped when the thread is down."""
        if not self.alive or self._stopping.is_set():
            raise EngineStopped("the engine is not running")
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        with self._lock:
            if self.max_requests is not None and len(self._streams) >= self.max_requests:
                raise QueueFull(f"the server holds {len(self._streams)} requests, its most "
                                f"(max batch + max waiting); retry later")
            request_id = self.engine.submit(request)  # events for it are delivered under this lock: none is missed
            self._streams[request_id] = (loop, queue)
        self._wake.set()
        return RequestStream(request_id, queue)

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Runs `fn` on the engine thread between two steps; its result (or exception) comes in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if not self.alive or self._stopping.is_set():
                raise EngineStopped("the engine is not running")
            self._calls.append((fn, future))
        self._wake.set()
        return future

    def abort(self, request_id: str) -> None:
        """Stops a request that has not finished (nothing if it has)."""
        with contextlib.suppress(RequestError):
            self.engine.abort(request_id)
        self._wake.set()

    def stop(self, drain_s: float = 0.0) -> None:
        """Lets the requests in flight finish for up to `drain_s` seconds, aborts the rest, stops the thread."""
        deadline = time.monotonic() + drain_s
        while self.in_flight() and time.monotonic() < deadline and self.alive:
            time.sleep(0.05)
        with self._lock:
            left = list(self._streams)
        for request_id in left:
            self.abort(request_id)
        deadline = time.monotonic() + 10.0
        while self.in_flight() and time.monotonic() < deadline and self.alive:
            time.sleep(0.05)
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout=30.0)

    # The engine thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping.is_set():
                self._run_calls()
                if self.jobs is not None:
                    try:
                        self.jobs.tick(engine)
                    except (HarliError, OSError) as e:  # a job's fault (its data, its files, a full disk): the
                        # requests are served on
                        log.error("fine-tuning: %s", e)
                if engine.has_unfinished() or engine.training:
                    self._deliver(engine.step())
                    self._publish()
                else:
                    self._wake.wait(0.1)
                    self._wake.clear()
            self._run_calls()
            if self.jobs is not None:
                self.jobs.shutdown(engine)
        except BaseException as e:  # noqa: BLE001  (every waiting stream gets it; the server reports it)
            log.exception("the engine thread failed")
            self.failure = e
            with self._lock:
                streams, self._streams = list(self._streams.values()), {}
                calls, self._calls = list(self._calls), deque()
            for loop, queue in streams:
                with contextlib.suppress(RuntimeError):  # its event loop is closed
                    loop.call_soon_threadsafe(queue.put_nowait, EngineStopped(f"the engine failed: {e!r}"))
            for _, future in calls:
                future.set_exception(EngineStopped(f"the engine failed: {e!r}"))

    def _run_calls(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as e:  # noqa: BLE001  (the caller gets it)
                    future.set_exception(e)

    def _deliver(self, events: list[Event]) -> None:
        with self._lock:
            for event in events:
                finished = isinstance(event, FinishedEvent)
                if finished and self.on_finished is not None:
                    self.on_finished(event.output)
                request_id = event.output.request_id if finished else event.request_id
                target = self._streams.pop(request_id, None) if finished else self._streams.get(request_id)
                if target is not None and isinstance(event, TokenEvent | FinishedEvent):
                    loop, queue = target
                    with contextlib.suppress(RuntimeError):  # its event loop is closed (server shutting down)
                        loop.call_soon_threadsafe(queue.put_nowait, event)

    def _publish(self) -> None:
        if self.on_snapshot is None:
            return
        engine = self.engine
        usage = engine.arena.table.usage()
        job, slots = engine.colocation.job, engine.scheduler.adapter_slots
        self.on_snapshot(Snapshot(
            running=len(engine.scheduler.running), waiting=len(engine.scheduler.waiting), kv_pages=usage["kv"],
            lease_pages=usage["lease"], free_pages=usage["free"], capacity_pages=engine.arena.table.capacity,
            trained_tokens=0 if job is None else job.tokens, step=self._new_step(),
            resident_adapters=tuple(sorted(slots.resident())) if slots is not None else (),
            waiting_adapters=tuple(sorted({r.adapter for r in engine.scheduler.waiting if r.adapter is not None})),
            page_tokens=engine.arena.layout.page_tokens))

    def _new_step(self) -> StepRecord | None:
        """The latest step's record if no snapshot had it yet (a step of training alone adds none)."""
        records = self.engine.step_records
        if not records or records[-1].index == self._published:
            return None
        self._published = records[-1].index
        return records[-1]

