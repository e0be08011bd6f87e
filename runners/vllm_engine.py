"""vLLM's engine in a chat runner's process (``engine: vllm``, docs/engines.md), as BentoML's BentoVLLM hosts
it, behind what the runner asks of BentoChat's ``AsyncLLMEngine``: prompt token ids in, token events out
(``runners.wire``), the queue bound, abort, counts for ``stats`` and the metrics, and adapters served as
``LoRARequest``s. The gateway renders the prompts and parses the answers, so both engines see the same ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from models.config import ServedModel
from runners.engine.adapter_files import read_config
from runners.engine.async_engine import retry_after
from runners.engine.errors import AdapterError, EngineError, QueueFull, RequestError
from runners.engine.sequence import SamplingParams, TokenEvent

logger = logging.getLogger("bentochat.vllm")


@dataclass
class ServedAdapter:
    request: object  # vllm.lora.request.LoRARequest
    base_model: str
    rank: int
    running: int = 0
    inflight: int = 0
    tokens_generated: int = 0

    def describe(self) -> dict:
        return {"source": self.request.lora_path, "base_model": self.base_model, "rank": self.rank}


def cpu_environment(threads: int) -> None:
    """vLLM's CPU settings from the environment, where the runner's own do not set them: its OpenMP threads
    on the first ``threads`` cores this process may use, no usage reports."""
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cores)))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")


def engine_args(served: ServedModel, path: str, context: int, lora: bool) -> dict:
    """vLLM's ``AsyncEngineArgs`` for ``served``, its options mapped from bentochat.yaml."""
    options = served.vllm
    args = {"model": path, "served_model_name": served.id, "dtype": served.dtype,
            "trust_remote_code": served.trust_remote_code, "max_model_len": options.max_model_len or context,
            "max_num_seqs": served.max_concurrency, "enable_prefix_caching": served.prefix_cache_tokens > 0,
            "quantization": options.quantization, "enforce_eager": options.enforce_eager,
            "kv_cache_dtype": options.kv_cache_dtype, "speculative_config": options.speculative,
            "structured_outputs_config": {"backend": "xgrammar"},  # BentoChat's grammars are xgrammar's EBNF
            "enable_lora": lora, "max_loras": served.max_loras, "max_lora_rank": options.max_lora_rank,
            "enable_log_requests": False}
    if served.gpus:
        args["tensor_parallel_size"] = options.tensor_parallel_size or len(served.gpus)
        args["gpu_memory_utilization"] = options.gpu_memory_utilization or memory_share(served)
    else:
        args["kv_cache_memory_bytes"] = int(served.kv_cache_memory)
    return args


def memory_share(served: ServedModel) -> float:
    """``max_gpu_memory`` as a share of the first GPU's memory; 0.9 without it."""
    if not served.max_gpu_memory:
        return 0.9
    import torch
    from pydantic import ByteSize, TypeAdapter

    cap = TypeAdapter(ByteSize).validate_python(served.max_gpu_memory)
    return min(1.0, cap / torch.cuda.get_device_properties(0).total_memory)


def vllm_params(params: SamplingParams):
    """BentoChat's parameters as vLLM's. The stop ids hold EOS (the gateway's), so vLLM's own EOS check is off;
    stop strings stay the gateway's."""
    from vllm import SamplingParams as VLLMParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    return VLLMParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                      top_k=params.top_k, repetition_penalty=params.repetition_penalty,
                      presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                      min_tokens=params.min_tokens, stop_token_ids=list(params.stop_token_ids), seed=params.seed,
                      logprobs=params.logprobs, ignore_eos=True, detokenize=False, skip_special_tokens=False,
                      output_kind=RequestOutputKind.DELTA,
                      structured_outputs=StructuredOutputsParams(grammar=params.grammar) if params.grammar else None)


def token_events(output, logprobs: int | None, first: bool = False) -> list[TokenEvent]:
    """The tokens of one of vLLM's delta outputs, the last with the finish reason; the ``first`` delta's
    first with the prompt tokens its prefix cache gave."""
    completion = output.outputs[0]
    ids = list(completion.token_ids)
    events = [TokenEvent(token) for token in ids]
    if first and events:
        events[0].cached_tokens = output.num_cached_tokens or 0
    if logprobs is not None and completion.logprobs:
        for event, found in zip(events, completion.logprobs):
            event.logprob = found[event.token_id].logprob
            event.top_logprobs = [(t, lp.logprob) for t, lp in sorted(found.items(), key=lambda i: i[1].rank)
                                  if lp.rank <= logprobs][:logprobs]
    if output.finished and events:
        events[-1].finish_reason = completion.finish_reason
    return events


class VLLMEngine:
    """vLLM's ``AsyncLLM`` for one chat model; ``generate``, ``abort``, ``stats`` and ``alive`` as BentoChat's
    ``AsyncLLMEngine``, adapters loaded with :meth:`load_adapter`."""

    def __init__(self, served: ServedModel, path: str, context: int, adapters: list[tuple[str, Path]],
                 runtime_loading: bool, threads: int | None):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import StatLoggerBase

        if threads is not None:
            cpu_environment(threads)
        self.max_num_seqs, self.max_queue = served.max_concurrency, served.max_queue
        self.adapters: dict[str, ServedAdapter] = {}
        self._ids = 0
        for name, adapter_path in adapters:  # read and checked now; vLLM loads one when a request first needs it
            self.adapters[name] = self._adapter(name, adapter_path)
        self.inflight = 0
        self.counts = {"running": 0, "tokens_generated": 0, "prompt_tokens": 0, "prefix_cache_hit_tokens": 0,
                       "preemptions": 0, "kv_cache_usage": 0.0}
        self._finished_at: deque[float] = deque(maxlen=32)
        self._aborting: set[asyncio.Task] = set()
        args = engine_args(served, path, context, lora=bool(adapters) or runtime_loading)
        self.kv_capacity = args.get("kv_cache_memory_bytes")
        engine = self

        class Counts(StatLoggerBase):  # vLLM's scheduler counts, each step
            def __init__(self, vllm_config, engine_index=0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
                engine._record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self):
                pass

        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args), stat_loggers=[Counts])

    def _adapter(self, name: str, path: Path) -> ServedAdapter:
        from vllm.lora.request import LoRARequest

        config = read_config(Path(path))
        self._ids += 1
        return ServedAdapter(LoRARequest(name, self._ids, str(path)), str(config.get("base_model_name_or_path")),
                             int(config.get("r") or 0))

    def _record(self, scheduler, iteration) -> None:
        if scheduler is not None:
            self.counts["running"] = scheduler.num_running_reqs
            self.counts["prefix_cache_hit_tokens"] += scheduler.prefix_cache_stats.hits
            self.counts["kv_cache_usage"] = scheduler.kv_cache_usage
            for name, adapter in self.adapters.items():
                adapter.running = int(scheduler.running_lora_adapters.get(name, 0))
        if iteration is not None:
            self.counts["prompt_tokens"] += iteration.num_prompt_tokens
            self.counts["preemptions"] += iteration.num_preempted_reqs

    @property
    def alive(self) -> bool:
        return not self.llm.errored

    def stats(self) -> dict:
        """BentoChat's engine's counts, from vLLM's scheduler: the requests here split into running and
        waiting; totals since start; the KV cache's bytes held (on CPU, where its size is set)."""
        if not self.alive:
            raise EngineError(f"vLLM's engine has stopped: {self.llm.dead_error!r}")
        counts = self.counts
        running = min(counts["running"], self.inflight)
        adapters = {name: {**a.describe(), "running": min(a.running, a.inflight),
                           "waiting": a.inflight - min(a.running, a.inflight), "tokens_generated": a.tokens_generated}
                    for name, a in self.adapters.items()}
        return {"running": running, "waiting": self.inflight - running,
                "tokens_generated": counts["tokens_generated"], "prompt_tokens": counts["prompt_tokens"],
                "prefix_cache_hit_tokens": counts["prefix_cache_hit_tokens"], "preemptions": counts["preemptions"],
                "kv_cache_bytes": int(counts["kv_cache_usage"] * self.kv_capacity) if self.kv_capacity else 0,
                "kv_cache_capacity_bytes": self.kv_capacity, "adapters": adapters}

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       adapter: str | None = None, tenant: str | None = None,
                       weight: float = 1.0) -> AsyncIterator[TokenEvent]:
        """The request's tokens as vLLM generates them; before the first, ``RequestError`` for a request it
        cannot run, ``QueueFull`` past ``max_concurrency + max_queue`` requests, ``EngineError`` once it is
        dead. A caller that stops reading aborts the request. ``tenant`` salts the prefix cache's blocks;
        ``weight`` is taken and not used: vLLM's scheduler serves requests first come, first served
        (docs/engines.md)."""
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        if not self.alive:
            raise EngineError(f"vLLM's engine has stopped: {self.llm.dead_error!r}")
        if not prompt_ids:
            raise RequestError("the prompt is empty")
        served = self.adapters.get(adapter) if adapter is not None else None
        if adapter is not None and served is None:
            raise AdapterError(f"no adapter named {adapter!r} is loaded")
        if self.inflight >= self.max_num_seqs + self.max_queue:
            raise QueueFull(retry_after(self._finished_at))
        vparams = vllm_params(params)
        self.inflight += 1
        if served:
            served.inflight += 1
        finished, count = False, 0
        try:
            prompt = TokensPrompt(prompt_token_ids=list(prompt_ids))
            if tenant is not None:  # its prefix cache kept per tenant, as the native engine's (scheduler.py)
                prompt["cache_salt"] = tenant
            stream = self.llm.generate(prompt, vparams, request_id,
                                       lora_request=served.request if served else None)
            async with contextlib.aclosing(stream):
                async for output in stream:
                    finished = output.finished
                    if output.outputs[0].finish_reason == "abort":  # abort() from another call: end quietly
                        return
                    for event in token_events(output, params.logprobs, first=not count):
                        count += 1
                        self.counts["tokens_generated"] += 1
                        if served:
                            served.tokens_generated += 1
                        yield event
        except (VLLMValidationError, ValueError) as e:
            raise RequestError(str(e)) from e
        except EngineDeadError as e:
            raise EngineError(f"vLLM's engine has stopped: {e!r}") from e
        except Exception as e:  # vLLM's EngineGenerateError: it failed this request
            raise EngineError(f"generation failed: {e.__cause__ or e!r}") from e
        finally:
            self.inflight -= 1
            if served:
                served.inflight -= 1
            if finished:
                self._finished_at.append(time.monotonic())
            else:
                await self.llm.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request from another call (the gateway's, on a client gone before its first token)."""
        task = asyncio.get_running_loop().create_task(self.llm.abort(request_id))
        self._aborting.add(task)  # held until done: the loop keeps only a weak reference
        task.add_done_callback(self._aborting.discard)

    async def load_adapter(self, name: str, path: str) -> dict:
        """Serve the PEFT LoRA adapter at ``path`` as ``name``, vLLM reading it now: its description, or
        ``AdapterError``."""
        if name in self.adapters:
            raise AdapterError(f"an adapter named {name!r} is loaded already")
        adapter = self._adapter(name, Path(path))
        try:
            await self.llm.add_lora(adapter.request)
        except Exception as e:
            raise AdapterError(f"vLLM cannot serve it: {e}") from e
        self.adapters[name] = adapter
        return adapter.describe()

    async def unload_adapter(self, name: str) -> None:
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            raise AdapterError(f"no adapter named {name!r} is loaded")
        await self.llm.remove_lora(adapter.request.lora_int_id)
