"""Which engine runs a chat model (``engine`` in bentochat.yaml): BentoChat's own, or vLLM's in the runner's
process (``runners/vllm_engine.py``), and vLLM's own options (``vllm``). Imports no vLLM: the gateway's
process only asks whether it is installed."""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ENGINES = ("auto", "bentochat", "vllm")
EngineName = Literal["auto", "bentochat", "vllm"]


class VLLMOptions(BaseModel):
    """vLLM's own options, for a model on `engine: vllm` (docs/engines.md); the model's other keys map onto
    vLLM's where they can (dtype, gpus, max_gpu_memory, max_concurrency, prefix_cache_tokens, kv_cache_memory
    on CPU, max_loras), and those that cannot (quantization, forward, attention, matmul, cpu_threads on a GPU)
    stop the start, naming the key."""

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int | None = Field(default=None, ge=1, description="GPUs the model is split over, tensor "
                                             "by tensor; unset: as many as `gpus` lists")
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1, description="the share of each GPU's "
                                                 "memory vLLM takes (weights, activations, KV cache); unset: "
                                                 "`max_gpu_memory` over the GPU's memory when set, else 0.9")
    max_model_len: int | None = Field(default=None, ge=1, description="the longest sequence, prompt and answer; "
                                      "unset: the model's context length")
    quantization: str | None = Field(default=None, description="vLLM's quantization method (`awq`, `gptq`, `fp8`, "
                                     "...); unset: what the checkpoint's config says, if anything")
    enforce_eager: bool = Field(default=False, description="no CUDA graphs (less memory, slower decoding)")
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3", "fp8_e5m2"] = Field(
        default="auto", description="the KV cache's type; auto: the model's dtype")
    max_lora_rank: int = Field(default=16, ge=1, description="the largest LoRA rank served (the adapters' own "
                                                             "and those loaded at run time)")
    speculative: dict[str, Any] | None = Field(default=None, description="vLLM's speculative_config, e.g. "
                                               "`{method: ngram, num_speculative_tokens: 4, prompt_lookup_max: 4}` "
                                               "or `{model: <draft model directory>, num_speculative_tokens: 4}`")


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_engine(engine: str, gpus: list[int]) -> str:
    """``auto``: vLLM for a model on GPUs where vLLM is installed, else BentoChat's engine."""
    if engine == "auto":
        return "vllm" if gpus and vllm_installed() else "bentochat"
    return engine


def unmapped_by_vllm(served) -> list[str]:
    """The keys of a served model (``models.config.ServedModel``) set to what only BentoChat's engine does."""
    defaults = {"quantization": None, "forward": "lean", "attention": "fused", "matmul": "auto"}
    hints = {"quantization": " (vllm.quantization names vLLM's)"}
    return [f"{key}: {getattr(served, key)}{hints.get(key, '')}" for key, default in defaults.items()
            if getattr(served, key) != default]
