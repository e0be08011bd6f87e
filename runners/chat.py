"""The chat runner: one BentoML service per served chat model, holding its engine.

Wire format of ``generate``: one JSON object a line, ``{"token": id, "finish_reason": null|"stop"|"length"}``
(with ``"logprob"`` and ``"top_logprobs": [[id, logprob], ...]`` when asked for), or
``{"error": "...", "code": ...}`` when the engine refused (``"queue_full"``, with ``"retry_after"``
seconds) or failed the sequence.
"""

from __future__ import annotations

import json
import time
import typing as t

import bentoml

from models.config import ServedModel
from runners.placement import service_options

TOKEN_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
FIRST_TOKEN_SECONDS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Prometheus metrics beside BentoML's own at /metrics, one series per model id.
QUEUE = bentoml.metrics.Gauge("bentochat_queue_length", "Requests waiting to join the batch",
                              labelnames=["model"], multiprocess_mode="livesum")
RUNNING = bentoml.metrics.Gauge("bentochat_running_sequences", "Sequences in the running batch",
                                labelnames=["model"], multiprocess_mode="livesum")
TOKENS = bentoml.metrics.Counter("bentochat_generated_tokens", "Output tokens generated", labelnames=["model"])
REJECTED = bentoml.metrics.Counter("bentochat_rejected_requests", "Requests refused with a full queue",
                                   labelnames=["model"])
TTFT = bentoml.metrics.Histogram("bentochat_time_to_first_token_seconds", "From arrival at the runner to the first token",
                                 labelnames=["model"], buckets=FIRST_TOKEN_SECONDS)
TPOT = bentoml.metrics.Histogram("bentochat_time_per_output_token_seconds", "Between consecutive output tokens",
                                 labelnames=["model"], buckets=TOKEN_SECONDS)


def chat_runner(served: ServedModel) -> bentoml.Service:
    class ChatRunner:
        model_ref = bentoml.models.BentoModel(served.model)  # a class attribute, so `bentoml build` packs it

        def __init__(self) -> None:
            from runners.engine import AsyncLLMEngine, LLMEngine, ModelRunner, load_causal_lm

            stored = self.model_ref  # the attribute resolves to the stored model
            model = load_causal_lm(stored.path, dtype=served.dtype, gpus=served.gpus,
                                   max_gpu_memory=served.max_gpu_memory, trust_remote_code=served.trust_remote_code)
            context = int(stored.info.metadata.get("context_length") or 2048)
            engine = LLMEngine(ModelRunner(model), max_num_seqs=served.max_concurrency, max_model_len=context,
                               prefix_cache_tokens=served.prefix_cache_tokens)
            self.engine = AsyncLLMEngine(engine, max_queue=served.max_queue)

        def _observe_load(self) -> None:
            QUEUE.labels(model=served.id).set(self.engine.num_waiting)
            RUNNING.labels(model=served.id).set(self.engine.num_running)

        @bentoml.api
        async def generate(self, request_id: str, prompt_ids: t.List[int],
                           params: t.Dict[str, t.Any]) -> t.AsyncGenerator[str, None]:
            from runners.engine import SamplingParams
            from runners.engine.llm_engine import EngineError, QueueFull

            last = time.monotonic()  # arrival at the runner
            count = 0
            try:
                async for event in self.engine.generate(request_id, prompt_ids, SamplingParams.from_dict(params)):
                    now = time.monotonic()
                    (TPOT if count else TTFT).labels(model=served.id).observe(now - last)
                    if not count:
                        self._observe_load()
                    last, count = now, count + 1
                    line = {"token": event.token_id, "finish_reason": event.finish_reason}
                    if event.logprob is not None:
                        line["logprob"], line["top_logprobs"] = event.logprob, event.top_logprobs
                    yield json.dumps(line) + "\n"
            except QueueFull as e:
                REJECTED.labels(model=served.id).inc()
                yield json.dumps({"error": str(e), "code": "queue_full", "retry_after": e.retry_after}) + "\n"
            except EngineError as e:
                yield json.dumps({"error": str(e)}) + "\n"
            finally:
                TOKENS.labels(model=served.id).inc(count)
                self._observe_load()

        @bentoml.api
        async def abort(self, request_id: str) -> bool:
            self.engine.abort(request_id)
            return True

        @bentoml.api
        async def describe(self) -> t.Dict[str, t.Any]:
            """For a gateway on another machine: the model's metadata and files, all but the weights."""
            from models.served import describe_stored

            return describe_stored(self.model_ref)

        @bentoml.api
        async def stats(self) -> t.Dict[str, int]:
            self._observe_load()
            return {"running": self.engine.num_running, "waiting": self.engine.num_waiting,
                    "tokens_generated": self.engine.engine.tokens_generated}

    return bentoml.service(**service_options(served, "chat"))(ChatRunner)
