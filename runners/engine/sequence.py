"""One request in the engine: its token ids, status and per-request state."""

from __future__ import annotations

import enum
from typing import Any, Callable

from runners.engine.sampling import Sampler, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # its prompt is (partly) not yet in its cache
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 on_token: Callable[[Any], None] | None = None):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.on_token = on_token
        self.sampler: Sampler | None = None  # made by the engine, which knows the vocabulary
        self.cache: Any = None  # its own KV cache until it joins the batch cache (model runner)
        self.num_cached = 0  # tokens already in a KV cache

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.cache = None  # free the KV cache now, not when the last reference goes
