"""The generation engine: plain Python and torch, no BentoML import, testable in-process.

Structure after nano-vllm: ``sequence`` (one request), ``sampling`` (parameters and the sampler),
``scheduler`` (waiting/running queues), ``model_runner`` (the tensors), ``llm_engine`` (the step
loop and its thread).
"""

from runners.engine.llm_engine import AsyncLLMEngine, LLMEngine
from runners.engine.model_runner import ModelRunner, load_causal_lm
from runners.engine.sampling import SamplingParams
from runners.engine.sequence import Sequence

__all__ = ["AsyncLLMEngine", "LLMEngine", "ModelRunner", "SamplingParams", "Sequence", "load_causal_lm"]
