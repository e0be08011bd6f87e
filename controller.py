"""FastChat's controller, inside the gateway: model id -> the replicas of its runner, their health,
and shortest-queue dispatch among them.

A replica is a runner in this ``bentoml serve`` (a BentoML dependency) or a runner served elsewhere
(an HTTP client on its URL). The gateway polls every replica's ``stats`` each ``health.interval_s``
(FastChat's heartbeats, turned around). A replica that fails ``health.failures`` polls in a row is
down: its model leaves ``/v1/models`` and routing when no replica is left, and requests for it get
503. A replica that answers again is back at that poll. A runner elsewhere also sends, at its first
answer, its model's files but the weights (tokenizer, configs), so the gateway needs no copy of them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from models.config import HealthConfig, ServedModel
from models.served import ServedModelInfo
from openai_api.errors import OpenAIError, model_down, model_not_found, queue_full
from runners.base import NEVER_RECYCLE, REQUEST_TIMEOUT_S

logger = logging.getLogger("bentochat.controller")
ENCODE_CHUNK = 32  # texts per call to an embedding runner; its batches hold up to EMBEDDING_MAX_BATCH


class RunnerSilent(ConnectionError):
    """The replica stopped answering health polls while a call on it was still waiting."""

    def __init__(self):
        super().__init__("the runner stopped answering the gateway's health polls")


async def _unless_silent(awaitable, silent: asyncio.Event):
    """``awaitable``'s result, or RunnerSilent once ``silent`` is set: a call on a runner that hangs
    (no answer, no closed connection) ends when the health polls give up on it."""
    call, given_up = asyncio.ensure_future(awaitable), asyncio.ensure_future(silent.wait())
    try:
        await asyncio.wait({call, given_up}, return_when=asyncio.FIRST_COMPLETED)
        if call.done():
            return call.result()
        raise RunnerSilent()
    finally:
        given_up.cancel()
        if not call.done():
            call.cancel()
            await asyncio.wait({call})  # a stream's generator must be idle again before it is closed


async def _until_silent(stream: AsyncIterator, silent: asyncio.Event) -> AsyncIterator:
    it = aiter(stream)
    while True:
        try:
            item = await _unless_silent(anext(it), silent)
        except StopAsyncIteration:
            return
        yield item


def unbounded(client):
    """A BentoML client whose connection pool has no size limit and is never recycled.

    Every stream holds a connection for as long as it runs. The clients' default pools of 100 made
    the 101st concurrent call wait for a free connection, health polls among them, so a runner under
    load looked silent and was marked down, cutting every stream on it. The engine bounds the work
    itself (its queue answers 429), so the transport must not. (A dependency's client would also
    recycle its pool after 100 calls or 300 s, closing the streams still running on the old one.)
    """
    inner = vars(client).get("_async", client)  # a dependency's RemoteProxy wraps an AsyncClient
    if "_session_manager" in vars(inner):  # a dependency in this bentoml serve: aiohttp underneath
        manager = inner._session_manager
        manager.max_requests, manager.max_age = NEVER_RECYCLE["max_requests"], NEVER_RECYCLE["max_age"]
        make = manager._make_client

        def make_unbounded():
            session = make()
            session.connector._limit = session.connector._limit_per_host = 0  # 0 is no limit in aiohttp
            return session

        manager._make_client = make_unbounded
    else:  # bentoml.AsyncHTTPClient on a runner's http(s) URL: httpx underneath
        import httpx

        def make_unbounded(client_cls, url, headers, timeout, app=None):
            return client_cls(base_url=url, headers=headers, timeout=timeout, follow_redirects=True,
                              limits=httpx.Limits(max_connections=None, max_keepalive_connections=32))

        client._make_client = make_unbounded
    return client


@dataclass
class Replica:
    name: str  # "local" (a dependency in this bentoml serve) or the runner's URL
    client: object | None = None  # None until a runner elsewhere first answers
    ready: bool = False
    failures: int = 0
    queue: int = 0  # running + waiting at the last poll, plus the requests dispatched since
    avoid_until: float = 0.0  # after a failed call, others are preferred until the next poll
    down: asyncio.Event = field(default_factory=asyncio.Event)  # set when polls find it silent: calls on it end

    async def connect(self) -> object:
        if self.client is None:
            import bentoml

            client = unbounded(bentoml.AsyncHTTPClient(self.name, server_ready_timeout=0, timeout=REQUEST_TIMEOUT_S))
            try:
                await client.__aenter__()  # reads the runner's API schema
            except BaseException:
                await client.close()
                raise
            self.client = client
        return self.client


@dataclass
class Model:
    """One served model: what the gateway knows of it, and the runner API of its replicas."""

    served: ServedModel
    replicas: list[Replica]
    info: ServedModelInfo | None = None  # a remote model's is known once a replica has answered
    _requests: dict[str, Replica] = field(default_factory=dict)  # request id -> replica, for abort

    @property
    def id(self) -> str:
        return self.served.id

    @property
    def ready(self) -> bool:
        return self.info is not None and any(r.ready for r in self.replicas)

    def pick(self) -> Replica:
        """The ready replica with the shortest queue (FastChat's shortest_queue), ties at random."""
        ready = [r for r in self.replicas if r.ready]
        if not ready:
            raise model_down(self.id)
        now = time.monotonic()
        preferred = [r for r in ready if r.avoid_until <= now] or ready
        shortest = min(r.queue for r in preferred)
        return random.choice([r for r in preferred if r.queue == shortest])

    def _failed(self, replica: Replica, exc: BaseException) -> None:
        logger.info("call to runner %s of %s failed: %r", replica.name, self.id, exc)
        replica.avoid_until = time.monotonic() + 60  # until the next poll says otherwise

    async def generate(self, request_id: str, prompt_ids: list[int], params: dict) -> AsyncIterator:
        replica = self.pick()
        replica.queue += 1
        self._requests[request_id] = replica
        stream = replica.client.generate(request_id=request_id, prompt_ids=prompt_ids, params=params)
        finished = False
        try:
            async for chunk in _until_silent(stream, replica.down):
                yield chunk
            finished = True
        except Exception as e:
            self._failed(replica, e)
            raise
        finally:
            replica.queue = max(0, replica.queue - 1)
            if finished:  # otherwise the caller aborts it, and abort needs to know where it ran
                self._requests.pop(request_id, None)
            await stream.aclose()

    async def abort(self, request_id: str) -> bool:
        replica = self._requests.pop(request_id, None)
        return bool(replica and replica.client and await replica.client.abort(request_id=request_id))

    async def encode(self, texts: list[str]) -> list:
        """Embeddings of ``texts``, in calls of at most ``ENCODE_CHUNK`` texts, which the runner's
        adaptive batching merges with other callers' (a call larger than its batch would be refused)."""
        chunks = [texts[i:i + ENCODE_CHUNK] for i in range(0, len(texts), ENCODE_CHUNK)]
        return [v for part in await asyncio.gather(*(self._encode(c) for c in chunks)) for v in part]

    async def _encode(self, texts: list[str]):
        for attempt in range(2):  # a replica that fails is avoided: the second try goes to another, if any
            replica = self.pick()
            replica.queue += 1
            try:
                return await _unless_silent(replica.client.encode(texts=texts), replica.down)
            except Exception as e:
                if getattr(e, "error_code", None) in (429, 503):  # it answered: too busy (BentoML's batcher)
                    raise queue_full(self.id, 1) from e
                self._failed(replica, e)
                if attempt:
                    raise
            finally:
                replica.queue = max(0, replica.queue - 1)

    async def stats(self) -> dict:
        """Each ready replica's own counts (a chat engine's running and waiting sequences and tokens
        generated), summed, and per replica."""
        replicas = [r for r in self.replicas if r.ready]
        answers = await asyncio.gather(*(asyncio.wait_for(r.client.stats(), 5) for r in replicas),
                                       return_exceptions=True)
        total: dict = {}
        per_replica = []
        for replica, answer in zip(replicas, answers):
            if isinstance(answer, BaseException):
                per_replica.append({"runner": replica.name, "error": repr(answer)})
                continue
            per_replica.append({"runner": replica.name, **answer})
            for key, value in answer.items():
                total[key] = total.get(key, 0) + value
        return {**total, "replicas": per_replica}

    async def poll(self, replica: Replica, health: HealthConfig) -> None:
        try:
            client = await asyncio.wait_for(replica.connect(), health.timeout_s)
            stats = await asyncio.wait_for(client.stats(), health.timeout_s)
            if self.info is None:
                await self._describe(client)
        except Exception as e:
            replica.failures += 1
            if replica.failures == health.failures:  # once an outage, also for one never seen up
                logger.warning("runner %s of %s %s (%s polls failed: %r)", replica.name, self.id,
                               "is down" if replica.ready else "does not answer", replica.failures, e)
            if replica.ready and replica.failures >= health.failures:
                replica.ready = False
                replica.down.set()  # what is still running on it fails now, with a 503
            return
        if not replica.ready:
            logger.info("runner %s of %s is up", replica.name, self.id)
            if replica.down.is_set():
                replica.down = asyncio.Event()
        replica.ready, replica.failures, replica.avoid_until = True, 0, 0.0
        replica.queue = int(stats.get("running", 0)) + int(stats.get("waiting", 0))

    async def _describe(self, client) -> None:
        description = await client.describe()
        into = Path(tempfile.mkdtemp(prefix=f"bentochat-{self.served.store_name or 'remote'}-"))
        self.info = await asyncio.to_thread(ServedModelInfo.from_description, self.served, description, into)
        logger.info("model %s: %s from runner (context %s, template %s)", self.id, self.info.kind,
                    self.info.context_length, self.info.chat_format.name if self.info.chat_format else "-")


class Registry:
    """Model id -> :class:`Model`; what the routes and the UI ask about models."""

    def __init__(self, models: list[Model], health: HealthConfig):
        self.entries = {m.id: m for m in models}
        self.health = health
        self._task: asyncio.Task | None = None

    def models(self) -> list[ServedModelInfo]:
        """The models with at least one ready replica."""
        return [m.info for m in self.entries.values() if m.ready]

    def ready(self) -> bool:
        return any(m.ready for m in self.entries.values())

    def model(self, model_id: str) -> Model:
        if model_id not in self.entries:
            raise model_not_found(model_id)
        model = self.entries[model_id]
        if not model.ready:
            raise model_down(model_id)
        return model

    def info(self, model_id: str) -> ServedModelInfo:
        return self.model(model_id).info

    def get(self, model_id: str, kind: str) -> tuple[ServedModelInfo, Model]:
        model = self.model(model_id)
        if model.info.kind != kind:
            raise OpenAIError(400, f"The model `{model_id}` is an {model.info.kind} model and does not support this "
                                   f"endpoint.", param="model", code="model_not_supported")
        return model.info, model

    async def poll(self) -> None:
        await asyncio.gather(*(m.poll(r, self.health) for m in self.entries.values() for r in m.replicas))

    def start(self) -> None:
        """Poll every replica now and then every ``health.interval_s``, in the gateway's event loop."""
        async def loop():
            while True:
                started = time.monotonic()
                try:
                    await self.poll()
                except Exception:  # the poller must outlive any one bad answer
                    logger.exception("health poll failed")
                await asyncio.sleep(max(0.0, self.health.interval_s - (time.monotonic() - started)))

        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(loop())
