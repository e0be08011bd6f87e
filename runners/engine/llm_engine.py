"""The step loop (schedule, run, postprocess) and the thread that drives it for asyncio callers."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from runners.engine.model_runner import ModelRunner
from runners.engine.sampling import Sampler, SamplingParams
from runners.engine.scheduler import Scheduler
from runners.engine.sequence import Sequence

logger = logging.getLogger("bentochat.engine")


class LLMEngine:
    def __init__(self, model_runner: ModelRunner, *, max_num_seqs: int = 64, max_model_len: int = 2048):
        self.runner = model_runner
        self.scheduler = Scheduler(max_num_seqs, max_model_len)
        self.tokens_generated = 0

    def add(self, seq: Sequence) -> None:
        seq.sampler = Sampler(seq.params)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> Sequence | None:
        return self.scheduler.abort(request_id)

    def step(self) -> list[tuple[Sequence, int | Exception]]:
        """One token for every running sequence; a sequence that fails leaves alone, with its error."""
        seqs, tokens, failed = [], [], []
        for seq in self.scheduler.schedule():
            try:
                tokens.append(seq.sampler(self.runner.forward(seq), seq.prompt_ids, seq.output_ids))
                seqs.append(seq)
            except Exception as e:
                logger.exception("request %s failed", seq.request_id)
                self.scheduler.abort(seq.request_id)
                failed.append((seq, e))
        self.scheduler.postprocess(seqs, tokens)
        self.tokens_generated += len(tokens)
        return list(zip(seqs, tokens)) + failed

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> list[int]:
        """Run one request to completion in the calling thread (tests, benchmarks)."""
        seq = Sequence("generate", prompt_ids, params)
        self.add(seq)
        while seq.finish_reason is None:
            self.step()
        return seq.output_ids


@dataclass
class TokenEvent:
    token_id: int | None  # None: the request was aborted
    finish_reason: str | None


class EngineError(RuntimeError):
    pass


class AsyncLLMEngine:
    """Drives an ``LLMEngine`` on its own thread so generation never blocks the event loop.

    Each request gets an asyncio queue fed from the engine thread; a request whose consumer stops
    reading (client gone, stop string found) is aborted and leaves the engine at the next step.
    """

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._incoming: list[Sequence] = []
        self._aborts: set[str] = set()
        self._thread = threading.Thread(target=self._run, name="bentochat-engine", daemon=True)
        self._thread.start()

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + len(self._incoming)

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()

        def on_token(token: int | Exception | None, finish_reason: str | None):
            item = token if isinstance(token, Exception) else TokenEvent(token, finish_reason)
            loop.call_soon_threadsafe(queue.put_nowait, item)

        seq = Sequence(request_id, prompt_ids, params, on_token)
        with self._wake:
            self._incoming.append(seq)
            self._wake.notify()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise EngineError(str(item)) from item
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

    def _run(self) -> None:
        scheduler = self.engine.scheduler
        while True:
            with self._wake:
                while not (self._incoming or self._aborts or scheduler.has_work):
                    self._wake.wait()
                incoming, self._incoming = self._incoming, []
                aborts, self._aborts = self._aborts, set()
            for seq in incoming:
                self.engine.add(seq)
            for request_id in aborts:
                seq = self.engine.abort(request_id)
                if seq is not None:
                    seq.on_token(None, "abort")  # ends the request's stream, wherever its reader is
            if not scheduler.has_work:
                continue
            for seq, token in self.engine.step():
                seq.on_token(token, seq.finish_reason)
