"""FastChat's controller, inside the gateway: model id -> :class:`Model`, which holds what the gateway
knows of the model (:class:`ModelInfo`: tokenizer, template, stops, defaults) and the replicas of its
runner, their health, and shortest-queue dispatch among them.

A replica is a runner in this ``bentoml serve`` (a BentoML dependency) or a runner served elsewhere
(an HTTP client on its URL). The gateway polls every replica's ``stats`` each ``health.interval_s``
(FastChat's heartbeats, turned around). A replica that fails ``health.failures`` polls in a row is
down (one whose polls time out, silent, ``health.hold_s`` later): its model leaves ``/v1/models`` and
routing when no replica is left, and requests for it get 503. A replica that answers again is back at
that poll. A runner elsewhere also sends, at its first answer, its model's files but the weights
(tokenizer, configs), so the gateway needs no copy of them.

``Model.generate`` and ``Model.encode`` are the gateway's side of the runner API: they pick the
replica, name the request, retry on another replica what failed before its first token, abort what
nobody reads any more, and raise OpenAI's errors.

A chat model's LoRA adapters are served by its runners: each poll tells the gateway which adapters a
replica serves, and :class:`AdapterModel` is an adapter as the routes see a model, whose requests go
to the replicas serving it.
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

import runner_client
from models.config import HealthConfig, ServedModel
from models.info import ModelInfo
from openai_api.errors import adapter_load_failed, generation_failed, invalid_value, model_not_found, \
    model_not_supported, model_unavailable, queue_full
from openai_api.ids import TENANT, allowed, sequence_id
from openai_api.streams import race
from runner_client import RunnerSilent, RunnerStream
from runners.engine.sequence import SamplingParams, TokenEvent
from runners.wire import ENGINE_DEAD, INVALID_REQUEST, QUEUE_FULL, RunnerRefused, generate_args

logger = logging.getLogger("bentochat.controller")
ENCODE_CHUNK = 32  # texts per call to an embedding runner; its batches hold up to EMBEDDING_MAX_BATCH
ATTEMPTS = 3  # tries of a call that fails before its answer starts, each on the best replica left
_background: set[asyncio.Task] = set()


@dataclass
class Replica:
    name: str  # "local" (a dependency in this bentoml serve) or the runner's URL
    client: object | None = None  # None until a runner elsewhere first answers
    ready: bool = False  # answers the polls
    silent_since: float | None = None  # when its polls were found to time out, while it is waited for
    failures: int = 0
    load: int = 0  # running + waiting at the last poll, plus the requests dispatched since
    avoid_until: float = 0.0  # after a failed call, others are preferred until the next poll
    adapters: dict[str, dict] = field(default_factory=dict)  # LoRA adapters it serves (its last poll), by name
    adapters_at: float = 0.0  # when the gateway last loaded or unloaded one: older polls do not say
    _down: asyncio.Future | None = None

    @property
    def down(self) -> asyncio.Future:
        """Done once the health polls give up on the replica: the calls still waiting on it end."""
        if self._down is None:
            self._down = asyncio.get_running_loop().create_future()
        return self._down

    up = property(lambda self: self.ready or self.silent_since is not None)  # ready, or silent but waited for

    def answered(self) -> None:
        """A poll got an answer: the replica is ready, and a later silence is a new one."""
        if self._down is not None and self._down.done():
            self._down = None
        self.ready, self.silent_since, self.failures, self.avoid_until = True, None, 0, 0.0

    def gone(self) -> None:
        """The polls give up on it: out of routing and listing, and what still waits on it fails (a 503)."""
        self.ready, self.silent_since = False, None
        if not self.down.done():
            self.down.set_result(None)

    async def connect(self) -> object:
        if self.client is None:
            self.client = await runner_client.connect(self.name)
        return self.client


@dataclass
class Model:
    """One served model: what the gateway knows of it (``info``), and its runner's replicas."""

    served: ServedModel
    replicas: list[Replica]
    info: ModelInfo | None = None  # a remote model's is known once a replica has answered

    @property
    def id(self) -> str:
        return self.served.id

    @property
    def ready(self) -> bool:
        return self.info is not None and any(r.up for r in self.replicas)

    @property
    def adapters(self) -> dict[str, dict]:
        """The LoRA adapters its replicas that are up serve, by name."""
        return {name: a for r in self.replicas if r.up for name, a in r.adapters.items()}

    def pick(self, adapter: str | None = None) -> Replica:
        """The ready replica (serving ``adapter``, if given) with the shortest queue (FastChat's
        shortest_queue), ties at random; a silent one still waited for when none is ready."""
        up = [r for r in self.replicas if r.up and (adapter is None or adapter in r.adapters)]
        ready = [r for r in up if r.ready] or up
        if not ready:
            raise model_unavailable(adapter or self.id)
        now = time.monotonic()
        preferred = [r for r in ready if r.avoid_until <= now] or ready
        shortest = min(r.load for r in preferred)
        return random.choice([r for r in preferred if r.load == shortest])

    def _failed(self, replica: Replica, exc: BaseException, last: bool) -> None:
        """A call on ``replica`` failed before it answered: prefer the others until the next poll says
        otherwise; raise the 503 if this was the ``last`` attempt."""
        logger.info("call to runner %s of %s failed: %r%s", replica.name, self.id, exc, "" if last else "; retrying")
        replica.avoid_until = time.monotonic() + 60
        if last:
            logger.warning("runner for %s failed: %s: %s", self.id, type(exc).__name__, exc)
            raise model_unavailable(self.id) from exc

    async def generate(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None
                       ) -> AsyncIterator[TokenEvent]:
        """The tokens of one sequence (on LoRA ``adapter``, if given; for the tenant in ``ids.TENANT``, which the
        runner's batch shares by weight) as its runner generates them. A call that fails before the first token
        is retried on another replica (a pooled connection the runner had closed, a replica that died with the
        request in its queue); one that stops being read (client gone, stop string) or fails is aborted in the
        runner. Raises OpenAI errors: 429 for a full queue, 400 for what the engine refused, 503 when no replica
        answers (also mid-stream), 500 when the engine failed."""
        payload, extra = params.to_dict(), generate_args(adapter, TENANT.get())
        for attempt in range(ATTEMPTS):
            replica, request_id = self.pick(adapter), sequence_id()
            replica.load += 1
            stream = RunnerStream(replica.client.generate(request_id=request_id, prompt_ids=prompt_ids, params=payload,
                                                          **extra), replica.down)
            count, done = 0, False  # done: the runner holds the sequence no more
            try:
                async for event in stream:
                    count += 1
                    done = event.finish_reason is not None
                    yield event
                done = True
                return
            except RunnerRefused as e:
                done = True  # the runner dropped the sequence itself, or never took it
                raise self._refused(e) from None
            except Exception as e:
                self._failed(replica, e, last=bool(count) or attempt == ATTEMPTS - 1)
            finally:  # (no await: this must run in full in a cancelled task)
                replica.load = max(0, replica.load - 1)
                stream.close()
                if not done:
                    self._abort_later(replica, request_id)

    def _refused(self, e: RunnerRefused):
        if e.code == QUEUE_FULL:
            return queue_full(self.id, e.retry_after or 1)
        if e.code == INVALID_REQUEST:  # what the API's own checks let through, the engine refused
            return invalid_value(None, e.message)  # whose text names the parameter
        if e.code == ENGINE_DEAD:
            logger.warning("runner for %s: %s", self.id, e.message)
            return model_unavailable(self.id)
        return generation_failed(self.id, e.message)

    def _abort_later(self, replica: Replica, request_id: str) -> None:
        """Tell the runner to drop a sequence nobody reads any more, without waiting for its answer."""
        async def abort():
            try:
                await replica.client.abort(request_id=request_id)
            except Exception as e:  # the runner may be gone too; nothing left to free then
                logger.debug("abort of %s failed: %s", request_id, e)

        task = asyncio.get_running_loop().create_task(abort())
        _background.add(task)
        task.add_done_callback(_background.discard)

    async def encode(self, texts: list[str]) -> list:
        """Embeddings of ``texts``, in calls of at most ``ENCODE_CHUNK`` texts, which the runner batches
        with other callers' (so that a large input does not hold them back for its whole length)."""
        chunks = [texts[i:i + ENCODE_CHUNK] for i in range(0, len(texts), ENCODE_CHUNK)]
        return [v for part in await asyncio.gather(*(self._encode(c) for c in chunks)) for v in part]

    async def _encode(self, texts: list[str]):
        for attempt in range(ATTEMPTS):
            replica = self.pick()
            replica.load += 1
            try:
                return await race(replica.client.encode(texts=texts), asyncio.shield(replica.down), RunnerSilent)
            except Exception as e:
                if getattr(e, "error_code", None) in (429, 503):  # it answered: too many texts waiting
                    raise queue_full(self.id, 1) from e
                self._failed(replica, e, last=attempt == ATTEMPTS - 1)
            finally:
                replica.load = max(0, replica.load - 1)

    async def stats(self) -> dict:
        """Each ready replica's own counts (a chat engine's running and waiting sequences and tokens
        generated), summed, and per replica."""
        replicas = [r for r in self.replicas if r.ready]
        answers = await asyncio.gather(*(asyncio.wait_for(r.client.stats(), 5) for r in replicas),
                                       return_exceptions=True)
        total: dict = {}
        adapters: dict[str, dict] = {}
        per_replica = []
        for replica, answer in zip(replicas, answers):
            if isinstance(answer, BaseException):
                per_replica.append({"runner": replica.name, "error": repr(answer)})
                continue
            per_replica.append({"runner": replica.name, **answer})
            for name, counts in answer.get("adapters", {}).items():
                adapters[name] = _add(adapters.get(name, {}), counts)
            total = _add(total, {k: v for k, v in answer.items() if k != "adapters"})
        return {**total, "adapters": adapters, "replicas": per_replica}

    async def load_adapter(self, name: str, source: str) -> dict:
        """Serve LoRA adapter ``source`` (a PEFT directory or an adapter's store tag on the runners' machine)
        as ``name`` on every ready replica; on none if one refuses it (400), fails (500) or is silent (503)."""
        replicas = [r for r in self.replicas if r.ready]
        if not replicas:
            raise model_unavailable(self.id)
        answers = await asyncio.gather(*(r.client.load_adapter(name=name, source=source) for r in replicas),
                                       return_exceptions=True)
        loaded = [(r, a) for r, a in zip(replicas, answers) if isinstance(a, dict) and "adapter" in a]
        if len(loaded) < len(replicas):
            await asyncio.gather(*(r.client.unload_adapter(name=name) for r, _ in loaded), return_exceptions=True)
            refusal = next(a for a in answers if not (isinstance(a, dict) and "adapter" in a))
            if isinstance(refusal, BaseException):
                logger.warning("loading adapter %s on %s failed: %r", name, self.id, refusal)
                refusal = runner_client.error_answer(refusal)
            if refusal is None:
                raise model_unavailable(self.id)
            if refusal.get("fault"):
                raise adapter_load_failed(name, self.id, refusal["error"])
            raise invalid_value("lora_path", refusal["error"])
        for replica, answer in loaded:
            replica.adapters[name] = answer["adapter"]  # served now, not only after the next poll
            replica.adapters_at = time.monotonic()
        return loaded[0][1]["adapter"]

    async def unload_adapter(self, name: str) -> None:
        """Stop serving adapter ``name`` on every replica that serves it."""
        replicas = [r for r in self.replicas if name in r.adapters]
        for replica in replicas:
            replica.adapters.pop(name, None)  # no new request goes there
        answers = await asyncio.gather(*(r.client.unload_adapter(name=name) for r in replicas if r.ready),
                                       return_exceptions=True)
        for replica in replicas:  # nor after a poll that the runner answered before it unloaded the adapter
            replica.adapters.pop(name, None)
            replica.adapters_at = time.monotonic()
        for answer in answers:
            if isinstance(answer, BaseException) or "error" in answer:
                logger.warning("unloading adapter %s of %s: %r", name, self.id, answer)

    async def poll(self, replica: Replica, health: HealthConfig) -> None:
        started = time.monotonic()
        try:
            client = await asyncio.wait_for(replica.connect(), health.timeout_s)
            stats = await asyncio.wait_for(client.stats(), health.timeout_s)
            if self.info is None:
                await self._describe(client)
        except Exception as e:
            replica.failures += 1
            if replica.up and replica.failures >= health.failures:
                self._unanswered(replica, health, e)
            elif replica.failures == health.failures:  # once, for one never seen up
                logger.warning("runner %s of %s does not answer (%s polls failed: %r)", replica.name, self.id,
                               replica.failures, e)
            return
        if not replica.ready:
            logger.info("runner %s of %s is up", replica.name, self.id)
        replica.answered()
        replica.load = int(stats.get("running", 0)) + int(stats.get("waiting", 0))
        if started > replica.adapters_at:
            replica.adapters = {name: {k: a.get(k) for k in ("source", "base_model", "rank")}
                                for name, a in stats.get("adapters", {}).items()}

    def _unanswered(self, replica: Replica, health: HealthConfig, error: Exception) -> None:
        """``health.failures`` polls or more failed in a row: a replica that refused them or answered with
        an error is down; one whose polls timed out is silent, and down after ``health.hold_s``."""
        now, timed_out = time.monotonic(), isinstance(error, TimeoutError)
        if timed_out and replica.silent_since is None:
            replica.ready, replica.silent_since = False, now
            logger.warning("runner %s of %s is silent: its calls wait %s s for it", replica.name, self.id, health.hold_s)
        if not timed_out or now - replica.silent_since >= health.hold_s:
            logger.warning("runner %s of %s is down (%s polls failed: %r)", replica.name, self.id, replica.failures, error)
            replica.gone()

    async def _describe(self, client) -> None:
        description = await client.describe()
        into = Path(tempfile.mkdtemp(prefix=f"bentochat-{self.served.store_name or 'remote'}-"))
        self.info = await asyncio.to_thread(ModelInfo.from_description, self.served, description, into)
        logger.info("model %s: %s from runner (context %s, template %s)", self.id, self.info.kind,
                    self.info.context_length, self.info.chat_format.name if self.info.chat_format else "-")


def _add(total: dict, counts: dict) -> dict:
    """Counts summed key by key; what is not a number is kept as the first one said."""
    out = dict(total)
    for key, value in counts.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = out.get(key, 0) + value
        else:
            out.setdefault(key, value)
    return out


@dataclass
class AdapterModel:
    """A LoRA adapter served on chat model ``base``, as the routes see a model: the base's ``info``
    (tokenizer, template), and requests that run on the base's replicas serving the adapter."""

    base: Model
    name: str

    @property
    def id(self) -> str:
        return self.name

    @property
    def info(self) -> ModelInfo:
        return self.base.info

    @property
    def description(self) -> dict:
        return self.base.adapters.get(self.name, {})

    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        return self.base.generate(prompt_ids, params, adapter=self.name)


class Registry:
    """Model id -> :class:`Model`; what the routes and the UI ask about models. A LoRA adapter is
    asked for by its name, or as ``<model id>:<adapter>``."""

    def __init__(self, models: list[Model], health: HealthConfig):
        self.entries = {m.id: m for m in models}
        self.health = health
        self._task: asyncio.Task | None = None

    def models(self) -> list[ModelInfo]:
        """The models with at least one ready replica."""
        return [m.info for m in self.entries.values() if m.ready]

    def adapters(self) -> list[AdapterModel]:
        """The adapters that ready replicas serve."""
        return [AdapterModel(m, name) for m in self.entries.values() if m.ready for name in m.adapters]

    def adapter(self, model_id: str) -> AdapterModel | None:
        """The adapter clients call ``model_id`` (its name, or ``<model id>:<name>``), or None."""
        base_id, _, name = model_id.rpartition(":")
        base = self.entries.get(base_id)
        if base is not None and base.ready and name in base.adapters:
            return AdapterModel(base, name)
        return next((a for a in self.adapters() if a.name == model_id), None)

    def serves(self, name: str) -> bool:
        """Whether ``name`` is a configured model's id or a served adapter's name."""
        return name in self.entries or self.adapter(name) is not None

    def adapter_base(self, model_id: str | None) -> Model:
        """The chat model a new LoRA adapter is to run on: ``model_id``, or the only chat model when it
        is None; a 400 naming ``model`` otherwise."""
        if model_id is None:
            chat = [m for m in self.entries.values() if m.served.kind == "chat"]
            if len(chat) != 1:
                raise invalid_value("model", f"name the base model the adapter runs on: one of "
                                             f"{', '.join(m.id for m in chat)}")
            model_id = chat[0].id
        base = self.get(model_id, "chat")
        if base.id != base.info.id:
            raise invalid_value("model", f"`{model_id}` is an adapter itself; name its base model")
        return base

    async def stats(self) -> dict[str, dict]:
        """Each ready model's runner counts (``Model.stats``), by id."""
        ready = [m for m in self.entries.values() if m.ready]
        return dict(zip((m.id for m in ready), await asyncio.gather(*(m.stats() for m in ready))))

    def get(self, model_id: str, kind: str | None = None) -> Model | AdapterModel:
        """The model clients call ``model_id``, ready to serve (and of ``kind``, if given), that the request's
        tenant may use (else the 404 of an unknown model, on every route); raises the OpenAI error otherwise."""
        model = self.entries.get(model_id) or self.adapter(model_id)
        if model is None or not allowed(model.id, model.base.id if isinstance(model, AdapterModel) else model.id):
            raise model_not_found(model_id)
        if isinstance(model, AdapterModel):
            if kind is not None and kind != "chat":
                raise model_not_supported(model_id, "adapter of a chat")
            return model
        if not model.ready:
            raise model_unavailable(model_id)
        if kind is not None and model.info.kind != kind:
            raise model_not_supported(model_id, model.info.kind)
        return model

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
