"""The engine for asyncio callers: ``AsyncLLMEngine`` drives an ``LLMEngine`` on a thread of its own
(generation never blocks the event loop), streams each request's tokens to its caller, bounds the queue
and reports a dead thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

from runners.engine.errors import EngineError, QueueFull, RequestError
from runners.engine.llm_engine import LLMEngine
from runners.engine.sequence import SamplingParams, Sequence, TokenEvent

logger = logging.getLogger("bentochat.engine")


def retry_after(finished_at: deque[float]) -> int:
    """Seconds until a queue place is likely free: one over the recent rate of finishing requests (the
    times ``finished_at`` holds)."""
    done = list(finished_at)
    if len(done) < 2 or done[-1] <= done[0]:
        return 1
    return max(1, min(60, math.ceil((done[-1] - done[0]) / (len(done) - 1))))


class AsyncLLMEngine:
    """Drives an ``LLMEngine`` on its own thread so generation never blocks the event loop.

    Each request gets an asyncio queue fed from the engine thread; a request whose consumer stops
    reading (client gone, stop string found) is aborted and leaves the engine at the next step.
    Whatever a step raises fails the sequences it ran, never the thread; should the thread still
    end (a ``BaseException``), ``alive`` turns false, every waiting caller gets an ``EngineError``
    and so does every later one, so the runner reports itself unhealthy instead of hanging.
    """

    def __init__(self, engine: LLMEngine, max_queue: int | None = None):
        self.engine = engine
        self.max_queue = max_queue  # None: unbounded
        self.death: BaseException | None = None
        self._finished_at: deque[float] = deque(maxlen=32)  # recent finishes, for Retry-After
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: list[Sequence] = []
        self._aborts: set[str] = set()
        self._calls: list[tuple[concurrent.futures.Future, Callable, tuple]] = []
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="bentochat-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self.death is None and self._thread.is_alive()

    def stats(self) -> dict[str, int]:
        """The engine's counts (``LLMEngine.stats``), requests not yet handed to its thread counted as
        waiting, for health polls and metrics; raises ``EngineError`` once the engine thread is dead."""
        if not self.alive:
            raise EngineError(f"the engine thread has stopped: {self.death!r}")
        stats = self.engine.stats()
        stats["waiting"] += len(self._incoming)
        return stats

    def retry_after(self) -> int:
        return retry_after(self._finished_at)

    async def call(self, fn: Callable, *args):
        """``fn(*args)`` on the engine thread, between two steps (what changes the engine's state, such
        as loading an adapter); its result, or what it raised."""
        if not self.alive:
            raise EngineError(f"the engine thread has stopped: {self.death!r}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._calls.append((future, fn, args))
            self._wake.notify()
        return await asyncio.wrap_future(future)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       adapter: str | None = None, tenant: str | None = None, weight: float = 1.0
                       ) -> AsyncIterator[TokenEvent]:
        """The request's tokens as they are generated, served for ``tenant`` (None: the default tenant)
        with its ``weight`` (``scheduler.py``). Raises before the first: ``RequestError`` for
        a request the engine cannot run, ``QueueFull`` when the engine already holds
        ``max_num_seqs + max_queue`` requests, ``EngineError`` when its thread is dead."""
        if not self.alive:
            raise EngineError(f"the engine thread has stopped: {self.death!r}")
        self.engine.check(prompt_ids, params, adapter, weight)
        scheduler = self.engine.scheduler
        if self.max_queue is not None and (len(scheduler.running) + len(scheduler.waiting) + len(self._incoming)
                                           >= scheduler.max_num_seqs + self.max_queue):
            raise QueueFull(self.retry_after())
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()

        def on_token(item: TokenEvent | BaseException):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the reader's event loop is closed: nobody is left to tell
                pass

        seq = Sequence(request_id, prompt_ids, params, on_token, adapter, tenant, weight)
        if params.grammar is not None:  # compiling may take a while: on a worker thread, not the step loop
            await asyncio.to_thread(self.engine.compile, seq)
        with self._wake:
            self._incoming.append(seq)
            self._wake.notify()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    if isinstance(item, (RequestError, EngineError)):
                        raise item
                    raise EngineError(f"generation failed: {item!r}") from item
                finished = item.finish_reason is not None
                if item.token_id is None:  # aborted (by abort() from another caller): end quietly
                    return
                yield item
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._aborts.add(request_id)
            self._wake.notify()

    def close(self) -> None:
        """Stop the engine's thread; what it was running or holding fails with ``EngineError``."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self._closing:
                self._iterate()
            self.death = EngineError("the engine was closed")
        except BaseException as e:  # noqa: BLE001 - whatever ends the thread must be reported
            logger.critical("the engine thread stopped: %r; this runner must be restarted", e, exc_info=True)
            self.death = e
        with self._wake:
            stranded, self._incoming = self._incoming, []
            calls, self._calls = self._calls, []
        for future, _, _ in calls:
            future.set_exception(EngineError(f"the engine thread has stopped: {self.death!r}"))
        self._fail(self.engine.fail_all() + stranded, EngineError(f"the engine thread has stopped: {self.death!r}"))

    def _iterate(self) -> None:
        with self._wake:
            while not (self._incoming or self._aborts or self._calls or self.engine.has_work or self._closing):
                self._wake.wait()
            incoming, self._incoming = self._incoming, []
            aborts, self._aborts = self._aborts, set()
            calls, self._calls = self._calls, []
        for future, fn, args in calls:
            try:
                future.set_result(fn(*args))
            except Exception as e:
                future.set_exception(e)
        for seq in incoming:
            try:
                self.engine.admit(seq)  # generate() checked it already
            except RequestError as e:
                seq.finish("error")
                seq.on_token(e)
        for request_id in aborts:
            seq = self.engine.abort(request_id)
            if seq is not None:
                seq.on_token(TokenEvent(None, "abort"))  # ends the request's stream, wherever its reader is
        if not self.engine.has_work:
            return
        try:
            self.engine.step(emit=self._emit)
        except Exception as e:  # a fault no single request could be blamed for: fail what was in the step
            logger.exception("engine step failed")
            self._fail(self.engine.fail_all(), EngineError(f"generation failed: {e!r}"))

    @staticmethod
    def _fail(seqs: list[Sequence], error: Exception) -> None:
        for seq in seqs:
            seq.on_token(error)

    def _emit(self, results: list[tuple[Sequence, TokenEvent | Exception]]) -> None:
        for seq, event in results:
            seq.on_token(event)
            if seq.finish_reason is not None:
                self._finished_at.append(time.monotonic())
