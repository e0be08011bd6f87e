"""The generation engine: plain Python and torch, no BentoML import, testable in-process.

Structure after nano-vllm, bottom up:
- ``sequence`` — one request: its parameters (``SamplingParams``), tokens and status, and the events
  it streams (``TokenEvent``); torch-free, so the gateway uses the same types; ``errors`` — what the
  engine raises to its callers, torch-free too;
- ``native`` and ``kernels/`` — BentoChat's C++ kernels; ``linear`` — a weight packed for its kernel
  (``Linear``), and where each of transformers' linear layers is computed (``Part``);
- ``lean`` — BentoChat's own forward pass for Llama, Mistral, Qwen2 and Qwen3; ``loader`` — which
  forward, dtype, kernels and attention a model runs on (one ``Plan``, logged), and loading it;
- ``adapter_files`` and ``lora`` — LoRA adapters: read and checked, held in slots (least recently used
  evicted), each row of a batch with its own adapter;
- ``kv_cache`` — the running batch's keys and values (a slot per sequence, written in place);
  ``structured`` — grammar masks; ``sampler`` — each sequence's next token with its own parameters;
- ``scheduler`` — the waiting and running queues, admission with the prefix cache, the per-step
  prefill budget; ``model_runner`` — the tensors: chunked and batched prefill, the batched decode step;
- ``llm_engine`` — the step loop (schedule, run, postprocess); ``async_engine`` — the thread that
  drives it for asyncio callers, with the bounded queue.

Names are imported lazily, so that importing ``runners.engine.sequence`` loads no torch.
"""

from importlib import import_module

_EXPORTS = {"AsyncLLMEngine": "async_engine", "LLMEngine": "llm_engine", "ModelRunner": "model_runner",
            "RequestError": "errors", "SamplingParams": "sequence", "Sequence": "sequence", "TokenEvent": "sequence"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"runners.engine.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'runners.engine' has no attribute {name!r}")
