"""One request in the engine: what it asks for (``SamplingParams``), its tokens and status
(``Sequence``), and what it streams back (``TokenEvent``).

This module imports no torch, so that the gateway builds the parameters and reads the events with the
same types the engine uses.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

# Temperatures below this sample greedily (vLLM's epsilon): dividing logits by less would overflow.
SAMPLING_EPS = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt and output
    presence_penalty: float = 0.0  # OpenAI style, over output only
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings: the gateway's detokenizer ends the text there; the engine sees ids only
    seed: int | None = None
    logprobs: int | None = None  # None: none; k: the chosen token's log-probability and the k most likely
    grammar: str | None = None  # EBNF (xgrammar's dialect) the output must match; it ends when the grammar does

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        """The inverse of :meth:`to_dict`; a key that is no parameter is a ValueError, not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameters: {', '.join(unknown)}")
        values = {k: v for k, v in d.items() if v is not None}
        for name in ("stop_token_ids", "stop"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    def check(self, vocab_size: int) -> None:
        """Raise ValueError, naming the parameter, for values the sampler cannot work with. The API
        refuses these with a 400 first; this keeps the engine safe from any other caller."""
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}: must be a finite number")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise ValueError("temperature, top_p or repetition_penalty: out of range")
        if self.max_tokens < 1 or self.min_tokens < 0 or self.top_k < 0:
            raise ValueError("max_tokens, min_tokens or top_k: out of range")
        if any(not 0 <= t < vocab_size for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids: token ids must be in [0, {vocab_size})")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError("logprobs: must be in [0, 20]")


@dataclass
class TokenEvent:
    """One generated token of a sequence, as the engine streams it."""

    token_id: int | None  # None: the request was aborted
    finish_reason: str | None = None  # "stop", "length" (or "abort") on the sequence's last event
    logprob: float | None = None  # with SamplingParams.logprobs: the chosen token's
    top_logprobs: list[tuple[int, float]] | None = None  # and the most likely (token id, logprob)
    cached_tokens: int | None = None  # on a sequence's first token: its prompt tokens taken from the prefix cache


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # its prompt is (partly) not yet in its cache
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                 on_token: Callable[[Any], None] | None = None, adapter_name: str | None = None,
                 tenant: str | None = None, weight: float = 1.0):
        self.request_id = request_id
        self.tenant = tenant  # who it is served for (None: the default tenant), and that tenant's share of
        self.weight = weight  # the batch under contention (scheduler.py)
        self.adapter_name = adapter_name  # the LoRA adapter it runs on; None: the base model
        self.adapter: Any = None  # that adapter (lora.Adapter), resolved when the engine admits it
        self.holds_slot = False  # its adapter has a slot for it, until it finishes
        self.prompt_ids = list(prompt_ids)
        self.output_ids: list[int] = []
        self.params = params
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.on_token = on_token
        self.sampler: Any = None  # a model_runner.Sampler, made by the engine when it admits the sequence
        self.grammar: Any = None  # params.grammar compiled (structured.Grammars), before it is queued
        self.matcher: Any = None  # and its state in this sequence, made at admission
        self.cache: Any = None  # its own KV cache until it joins the batch cache (model runner)
        self.blocks: list[int] = []  # or its blocks of the paged cache, in order (block_manager.py)
        self.num_cached = 0  # tokens already in a KV cache
        self.cached_prompt_tokens: int | None = None  # of them, those the prefix cache gave (at its first prefill)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefill_ids(self) -> list[int]:
        """The tokens a prefill puts in its cache (``num_tokens`` of them): the prompt, and after a
        preemption (``scheduler.py``) what it generated too, whose last logits then give the next token
        as the decode step it missed would have."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.cache = None  # free the KV cache now, not when the last reference goes
