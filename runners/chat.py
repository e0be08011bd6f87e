"""The chat runner: one BentoML service per served chat model, holding its engine.

Wire format of ``generate``: one JSON object a line, ``{"token": id, "finish_reason": null|"stop"|"length"}``,
or ``{"error": "..."}`` when the engine failed the sequence.
"""

from __future__ import annotations

import json
import typing as t

import bentoml

from models.config import ServedModel
from runners.placement import service_options


def chat_runner(served: ServedModel) -> bentoml.Service:
    class ChatRunner:
        model_ref = bentoml.models.BentoModel(served.model)  # a class attribute, so `bentoml build` packs it

        def __init__(self) -> None:
            from runners.engine import AsyncLLMEngine, LLMEngine, ModelRunner, load_causal_lm

            stored = self.model_ref  # the attribute resolves to the stored model
            model = load_causal_lm(stored.path, dtype=served.dtype, gpus=served.gpus,
                                   max_gpu_memory=served.max_gpu_memory, trust_remote_code=served.trust_remote_code)
            context = int(stored.info.metadata.get("context_length") or 2048)
            self.engine = AsyncLLMEngine(LLMEngine(ModelRunner(model), max_num_seqs=served.max_concurrency,
                                                   max_model_len=context))

        @bentoml.api
        async def generate(self, request_id: str, prompt_ids: t.List[int],
                           params: t.Dict[str, t.Any]) -> t.AsyncGenerator[str, None]:
            from runners.engine import SamplingParams
            from runners.engine.llm_engine import EngineError

            try:
                async for event in self.engine.generate(request_id, prompt_ids, SamplingParams.from_dict(params)):
                    yield json.dumps({"token": event.token_id, "finish_reason": event.finish_reason}) + "\n"
            except EngineError as e:
                yield json.dumps({"error": str(e)}) + "\n"

        @bentoml.api
        async def abort(self, request_id: str) -> bool:
            self.engine.abort(request_id)
            return True

        @bentoml.api
        async def stats(self) -> t.Dict[str, int]:
            return {"running": self.engine.num_running, "waiting": self.engine.num_waiting,
                    "tokens_generated": self.engine.engine.tokens_generated}

    return bentoml.service(**service_options(served, "chat"))(ChatRunner)
