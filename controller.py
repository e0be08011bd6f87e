"""FastChat's controller, inside the gateway: model id -> :class:`Model`, which holds what the gateway
knows of the model (:class:`ModelInfo`: tokenizer, template, stops, defaults) and the replicas of its
runner, their health, and shortest-queue dispatch among them.

A replica is a runner in this ``bentoml serve`` (a BentoML dependency) or a runner served elsewhere
(an HTTP client on its URL). The gateway polls every replica's ``stats`` each ``health.interval_s``
(FastChat's heartbeats, turned around). A replica that fails ``health.failures`` polls in a row is
down: its model leaves ``/v1/models`` and routing when no replica is left, and requests for it get
503. A replica that answers again is back at that poll. A runner elsewhere also sends, at its first
answer, its model's files but the weights (tokenizer, configs), so the gateway needs no copy of them.

``Model.generate`` and ``Model.encode`` are the gateway's side of the runner API: they pick the
replica, name the request, retry on another replica what failed before its first token, abort what
nobody reads any more, and raise OpenAI's errors.

A chat model's LoRA adapters are served by its runners: each poll tells the gateway which adapters a
replica serves, and :class:`AdapterModel` is an adapter as the routes see a model, whose requests go
to the replicas serving it.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import random
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from middleware import REQUEST_ID
from models.config import DEFAULT_CONTEXT_LENGTH, HealthConfig, ServedModel
from models.templates import ChatFormat, describe_tools, resolve_chat_format
from openai_api.errors import generation_failed, invalid_value, model_not_found, model_not_supported, \
    model_unavailable, queue_full
from openai_api.protocol import new_id
from openai_api.tool_calls import FORMATS, ToolFormat, format_for_template
from runners.base import NEVER_RECYCLE, REQUEST_TIMEOUT_S
from runners.chat import ENGINE_DEAD, INVALID_REQUEST, QUEUE_FULL, RunnerRefused, read_events
from runners.engine.sequence import SamplingParams, TokenEvent

logger = logging.getLogger("bentochat.controller")
ENCODE_CHUNK = 32  # texts per call to an embedding runner; its batches hold up to EMBEDDING_MAX_BATCH
ATTEMPTS = 3  # tries of a call that fails before its answer starts, each on the best replica left
# generation_config.json keys that become defaults for parameters a request leaves out.
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")
_background: set[asyncio.Task] = set()


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
    adapters: dict[str, dict] = field(default_factory=dict)  # LoRA adapters it serves (its last poll), by name
    adapters_at: float = 0.0  # when the gateway last loaded or unloaded one: older polls do not say
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


def generation_defaults(raw: dict) -> dict:
    """Only what the model's authors wrote in ``generation_config.json``, not transformers' own defaults."""
    defaults = {k: raw[k] for k in GENERATION_DEFAULT_KEYS if raw.get(k) is not None}
    if raw.get("do_sample") is False:
        defaults["temperature"] = 0.0  # the authors asked for greedy decoding
    return defaults


def _source_name(meta: dict) -> str:
    """The imported directory's, file's or hub repository's own name: ``dir:/models/Baichuan-13B-Chat`` ->
    ``Baichuan-13B-Chat``."""
    source = str(meta.get("source", "")).split(":", 1)[-1]
    return Path(source).stem if source.endswith(".gguf") else Path(source).name


def _ids(*values) -> tuple[int, ...]:
    """Token ids from ints and lists of them, each once, in order."""
    ids = [i for v in values for i in ([v] if isinstance(v, int) else v or [])]
    return tuple(dict.fromkeys(ids))


@dataclass
class ModelInfo:
    """What the gateway knows of a served model: its tokenizer, context, sampling defaults, and the
    tokens and strings that end an answer (the template's folded in once, here)."""

    served: ServedModel
    tag: str  # the store tag of the model, here or on the runner elsewhere
    created: int
    context_length: int
    tokenizer: object
    defaults: dict = field(default_factory=dict)  # from generation_config.json
    eos_token_ids: tuple[int, ...] = ()  # what ends a text completion
    chat_format: ChatFormat | None = None  # chat models only
    stop_token_ids: tuple[int, ...] = ()  # what ends a chat answer: EOS and the template's stop tokens
    stop: tuple[str, ...] = ()  # and the template's stop strings
    tool_format: ToolFormat = FORMATS["builtin"]  # how its tool calls are written (chat models)

    @property
    def id(self) -> str:
        return self.served.id

    @property
    def kind(self) -> str:
        return self.served.kind

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @classmethod
    def load(cls, served: ServedModel) -> ModelInfo:
        """From the local model store (a runner in this ``bentoml serve``)."""
        import bentoml

        stored = bentoml.models.get(served.model)
        return cls.from_dir(served, Path(stored.path), str(stored.tag), stored.info.metadata,
                            int(stored.info.creation_time.timestamp()))

    @classmethod
    def from_description(cls, served: ServedModel, description: dict, into: Path) -> ModelInfo:
        """From what a runner served elsewhere sent (``describe``): its model's files but the weights."""
        for name, data in description["files"].items():
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(base64.b64decode(data))
        return cls.from_dir(served, into, description["tag"], description["metadata"], description["created"])

    @classmethod
    def from_dir(cls, served: ServedModel, path: Path, tag: str, meta: dict, created: int) -> ModelInfo:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=served.trust_remote_code)
        raw_gen = path / "generation_config.json"
        gen = json.loads(raw_gen.read_text(encoding="utf-8")) if raw_gen.is_file() else {}
        eos = _ids(gen.get("eos_token_id"), tokenizer.eos_token_id)
        chat_format = None
        if served.kind == "chat":
            chat_format = resolve_chat_format(served.id, tokenizer, gen, configured=served.template,
                                              names=[served.store_name, _source_name(meta)],
                                              architecture=str(meta.get("architecture", "")))
        return cls(
            served=served,
            tag=tag,
            created=created,
            context_length=int(meta.get("context_length") or DEFAULT_CONTEXT_LENGTH),
            tokenizer=tokenizer,
            defaults=generation_defaults(gen),
            eos_token_ids=eos,
            chat_format=chat_format,
            stop_token_ids=_ids(eos, chat_format.stop_token_ids if chat_format else ()),
            stop=tuple(dict.fromkeys(chat_format.stop)) if chat_format else (),
            tool_format=FORMATS[served.tool_parser] if served.tool_parser else
            format_for_template(chat_format.template_text if chat_format else None),
        )

    @functools.cached_property
    def tool_marker_ids(self) -> frozenset[int]:
        """Special tokens of the tokenizer that are markers of its tool-call format (``[TOOL_CALLS]``,
        ``<|python_tag|>``): the detokenizer shows them to the tool-call parser."""
        special = set(self.tokenizer.all_special_ids) | {
            i for i, t in getattr(self.tokenizer, "added_tokens_decoder", {}).items() if t.special}
        ids = {self.tokenizer.convert_tokens_to_ids(t): t for t in self.tool_format.triggers}
        return frozenset(i for i, t in ids.items() if i in special and self.tokenizer.convert_ids_to_tokens(i) == t)

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Prompt ids of a chat, with ``tools`` the model may call: rendered by its template when that
        takes tools, else described in the system prompt (``models.templates.describe_tools``)."""
        fmt = self.chat_format
        if fmt.takes_tools:
            return fmt.render(messages, tools)
        if tools or any("tool_calls" in m or m["role"] == "tool" for m in messages):
            messages = describe_tools(messages, tools or [], self.tool_format.call_text)
        return fmt.render(messages)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]


def _request_id() -> str:
    """A sequence's id in its runner: the request's own (x-request-id), so that the runner's log lines
    name it, and a suffix that keeps choices and retries apart."""
    return f"{REQUEST_ID.get() or new_id('req')}-{uuid.uuid4().hex[:8]}"


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
        return self.info is not None and any(r.ready for r in self.replicas)

    @property
    def adapters(self) -> dict[str, dict]:
        """The LoRA adapters its ready replicas serve, by name."""
        return {name: a for r in self.replicas if r.ready for name, a in r.adapters.items()}

    def pick(self, adapter: str | None = None) -> Replica:
        """The ready replica (serving ``adapter``, if given) with the shortest queue (FastChat's
        shortest_queue), ties at random."""
        ready = [r for r in self.replicas if r.ready and (adapter is None or adapter in r.adapters)]
        if not ready:
            raise model_unavailable(adapter or self.id)
        now = time.monotonic()
        preferred = [r for r in ready if r.avoid_until <= now] or ready
        shortest = min(r.queue for r in preferred)
        return random.choice([r for r in preferred if r.queue == shortest])

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
        """The tokens of one sequence (on LoRA ``adapter``, if given) as its runner generates them. A
        call that fails before the first token is retried on another replica (a pooled connection the
        runner had closed, a replica that died with the request in its queue); one that stops being read
        (client gone, stop string) or fails is aborted in the runner. Raises OpenAI errors: 429 for a full queue, 400 for what the
        engine refused, 503 when no replica answers (also mid-stream), 500 when the engine failed."""
        payload = params.to_dict()
        lora = {"adapter": adapter} if adapter else {}
        for attempt in range(ATTEMPTS):
            replica, request_id = self.pick(adapter), _request_id()
            replica.queue += 1
            stream = replica.client.generate(request_id=request_id, prompt_ids=prompt_ids, params=payload, **lora)
            count, done = 0, False  # done: the runner holds the sequence no more
            try:
                async for event in read_events(_until_silent(stream, replica.down)):
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
            finally:
                replica.queue = max(0, replica.queue - 1)
                await stream.aclose()
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
            replica.queue += 1
            try:
                return await _unless_silent(replica.client.encode(texts=texts), replica.down)
            except Exception as e:
                if getattr(e, "error_code", None) in (429, 503):  # it answered: too many texts waiting
                    raise queue_full(self.id, 1) from e
                self._failed(replica, e, last=attempt == ATTEMPTS - 1)
            finally:
                replica.queue = max(0, replica.queue - 1)

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
        """Serve LoRA adapter ``source`` (a PEFT directory on the runners' machine, or an adapter's store
        tag there) as ``name`` on every ready replica; on none if one refuses it (a 400 saying why)."""
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
                raise model_unavailable(self.id)
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
            replica.adapters_at = time.monotonic()
        answers = await asyncio.gather(*(r.client.unload_adapter(name=name) for r in replicas if r.ready),
                                       return_exceptions=True)
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
        if started > replica.adapters_at:
            replica.adapters = {name: {k: a.get(k) for k in ("source", "base_model", "rank")}
                                for name, a in stats.get("adapters", {}).items()}

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

    def ready(self) -> bool:
        return any(m.ready for m in self.entries.values())

    def get(self, model_id: str, kind: str | None = None) -> Model | AdapterModel:
        """The model clients call ``model_id``, ready to serve (and of ``kind``, if given); raises the
        OpenAI error otherwise."""
        if model_id not in self.entries:
            adapter = self.adapter(model_id)
            if adapter is None:
                raise model_not_found(model_id)
            if kind is not None and kind != "chat":
                raise model_not_supported(model_id, "adapter of a chat")
            return adapter
        model = self.entries[model_id]
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
