"""Continuous batching for servers: requests from any thread or asyncio loop join a running batch.

    scheduler = Scheduler(engine)
    handle = scheduler.submit("Once upon", SamplingParams(max_tokens=20))
    for delta in handle: ...             # or: async for delta in handle: ...
    handle.cancel()                      # frees the slot at the next step (client went away)

A background thread owns the engine's KV-cache slots and runs the step loop; between steps it admits new
requests and drops cancelled ones. Each request's events (its deltas, then its completion) go to a
thread-safe queue read by its handle.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import AsyncIterator, Iterator

from chatforge.errors import ChatforgeError
from chatforge.infer.outputs import Completion, Delta
from chatforge.infer.params import SamplingParams
from chatforge.infer.runner import Event, Prepared, Request

# Requests come in bursts (a client's batch, many users at once). When some arrive while slots are free, the
# loop waits for the rest of the burst (until no request came for GATHER_SECONDS, the slots are full, or
# GATHER_LIMIT passed), so a burst joins one prefill and decodes in full chunks instead of trickling in.
GATHER_SECONDS, GATHER_LIMIT = 0.002, 0.02


class RequestHandle:
    """The caller's side of a submitted request. Iterating it (sync or async) yields its deltas; leaving the
    iteration early cancels the request."""

    def __init__(self, scheduler: "Scheduler"):
        self._scheduler = scheduler
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._ended = threading.Event()  # the last event is queued: lets result() sleep through the deltas
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.request: Request | None = None  # set by the scheduler thread once admitted to its queue
        self.completion: Completion | None = None

    @property
    def done(self) -> bool:
        return self.completion is not None

    def cancel(self) -> None:
        """Stop generating; the slot is freed before the next decode step. Safe to call from any thread."""
        if not self.done:
            self._scheduler._cancel(self)

    def _push(self, event: Event | BaseException) -> None:
        """Called by the scheduler thread."""
        self._events.put(event)
        if isinstance(event, (Completion, BaseException)):
            self._ended.set()
        loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None:
            try:
                loop.call_soon_threadsafe(wakeup.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is waiting any more
                pass

    def _accept(self, event: Event | BaseException) -> Delta | None:
        if isinstance(event, BaseException):
            raise event
        if isinstance(event, Completion):
            self.completion = event
            return None
        return event

    def __iter__(self) -> Iterator[Delta]:
        try:
            while not self.done:
                delta = self._accept(self._events.get())
                if delta is not None:
                    yield delta
        finally:
            self.cancel()

    async def __aiter__(self) -> AsyncIterator[Delta]:
        self._wakeup = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        try:
            while not self.done:
                # clear before looking: an event pushed after the look sets the flag again, none is missed
                self._wakeup.clear()
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    await self._wakeup.wait()
                    continue
                delta = self._accept(event)
                if delta is not None:
                    yield delta
        finally:
            self.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request has ended (completed, cancelled or failed) or ``timeout`` passed; True if ended."""
        return self._ended.wait(timeout)

    def result(self, timeout: float | None = None) -> Completion:
        """Block until the request is finished and return its completion."""
        if not self._ended.wait(timeout):
            raise TimeoutError(f"request not finished after {timeout} s")
        while not self.done:
            self._accept(self._events.get())
        return self.completion


class Scheduler:
    """Runs ``engine``'s continuous-batching loop in a background thread for as long as it is open."""

    def __init__(self, engine, max_batch_size: int | None = None):
        self.engine = engine
        with engine.inference():
            self._runner = engine.new_runner(max_batch_size)
        self._cond = threading.Condition()
        self._inbox: list[tuple[Prepared, RequestHandle]] = []
        self._cancels: list[RequestHandle] = []
        self._handles: dict[int, RequestHandle] = {}  # request id -> handle, while the request runs
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="chatforge-scheduler", daemon=True)
        self._thread.start()

    def submit(self, prompt, params: SamplingParams | None = None) -> RequestHandle:
        """Queue a request; bad settings or a prompt that does not fit raise here, in the caller's thread."""
        prepared = self.engine.prepare(prompt, params)
        handle = RequestHandle(self)
        with self._cond:
            if self._closed:
                raise ChatforgeError("the scheduler is closed")
            self._inbox.append((prepared, handle))
            self._cond.notify()
        return handle

    def _cancel(self, handle: RequestHandle) -> None:
        with self._cond:
            self._cancels.append(handle)
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        """Sequences decoding now, sequences waiting for a slot (queued requests count all their samples), and
        the number of slots."""
        with self._cond:
            queued = sum(prepared.params.num_samples for prepared, _ in self._inbox)
        return {"active": len(self._runner.active), "waiting": len(self._runner.waiting) + queued,
                "slots": self._runner.capacity}

    def close(self) -> None:
        """Cancel whatever still runs and stop the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._inbox or self._cancels or self._closed or self._runner.busy):
                    self._cond.wait()
                limit = time.monotonic() + GATHER_LIMIT
                while self._inbox and not self._closed and self._free_slots() > 0:
                    left = min(GATHER_SECONDS, limit - time.monotonic())
                    if left <= 0 or not self._cond.wait(left):
                        break
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
                closed = self._closed
            try:
                with self.engine.inference():
                    for prepared, handle in inbox:
                        try:
                            handle.request = self._runner.add(prepared)
                        except Exception as exc:  # its settings cannot be sampled: it fails alone
                            handle._push(exc)
                            continue
                        self._handles[handle.request.id] = handle
                    if closed:
                        cancels = list(self._handles.values())
                    for handle in cancels:
                        if handle.request is not None and handle.request.id in self._handles:
                            self._dispatch([(handle.request, e) for e in self._runner.cancel(handle.request)])
                    if closed:
                        return
                    if self._runner.busy:  # the admitted requests' first tokens go out before the chunk
                        self._dispatch(self._runner.admit())
                        # a request arriving mid-chunk ends the chunk (reading the inbox unlocked is a hint:
                        # a request it misses is taken at the next chunk)
                        self._dispatch(self._runner.decode(arrivals=self._waiting_for_a_slot))
                    for request, exc in self._runner.take_failures():
                        self._handles.pop(request.id)._push(exc)
            except Exception as exc:  # a step failing for no single request fails those in flight, not the server
                for handle in self._handles.values():
                    handle._push(exc)
                self._handles.clear()
                with self.engine.inference():
                    self._runner = self.engine.new_runner(self._runner.capacity)

    def _waiting_for_a_slot(self) -> bool:
        return bool(self._inbox) and self._free_slots() > 0

    def _free_slots(self) -> int:
        """Slots no sequence holds or waits for, counting the samples of requests in the inbox."""
        queued = sum(prepared.params.num_samples for prepared, _ in self._inbox)
        return self._runner.capacity - len(self._runner.active) - len(self._runner.waiting) - queued

    def _dispatch(self, events: list[tuple[Request, Event]]) -> None:
        for request, event in events:
            handle = self._handles[request.id]
            handle._push(event)
            if isinstance(event, Completion):
                del self._handles[request.id]
