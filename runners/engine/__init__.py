"""The generation engine: plain Python and torch, no BentoML import, testable in-process.

Structure after nano-vllm:
- ``sequence`` — one request: its parameters (``SamplingParams``), tokens and status, and the events
  it streams (``TokenEvent``); torch-free, so the gateway uses the same types;
- ``scheduler`` — the waiting and running queues, admission with the prefix cache, the per-step
  prefill budget;
- ``model_runner`` — the tensors: chunked and batched prefill, the batched decode step, the running
  batch's KV cache (a slot per sequence, written in place), and sampling (per sequence, on transformers' logits processors) with
  log-probabilities;
- ``lora`` — LoRA adapters: read and checked, held in slots (least recently used evicted), each
  row of a batch with its own adapter;
- ``llm_engine`` — the step loop (schedule, run, postprocess) and the thread that drives it for
  asyncio callers, with the bounded queue.

Names are imported lazily, so that importing ``runners.engine.sequence`` loads no torch.
"""

from importlib import import_module

_EXPORTS = {"AsyncLLMEngine": "llm_engine", "LLMEngine": "llm_engine", "ModelRunner": "model_runner",
            "RequestError": "llm_engine", "SamplingParams": "sequence", "Sequence": "sequence", "TokenEvent": "sequence"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"runners.engine.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'runners.engine' has no attribute {name!r}")
