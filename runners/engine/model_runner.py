"""Owns the model and its tensors: loading with the configured placement, prefill and decode."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("bentochat.engine")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str, checkpoint_dtype: str | None, on_gpu: bool) -> torch.dtype:
    if dtype != "auto":
        return DTYPES[dtype]
    if not on_gpu:
        return torch.float32  # half precision on CPU is slow and often unsupported
    return DTYPES.get(str(checkpoint_dtype), torch.float16)


def load_causal_lm(path: str, *, dtype: str = "auto", gpus: list[int] | None = None,
                   max_gpu_memory: str | None = None, trust_remote_code: bool = False):
    """Load a stored causal LM onto the configured GPUs (FastChat's --gpus/--max-gpu-memory) or the CPU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    gpus = list(gpus or [])
    if gpus:
        # Pin this process to the configured GPUs before CUDA initializes; they are then cuda:0..n-1.
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        if not torch.cuda.is_available():
            raise RuntimeError(f"gpus {gpus} are configured but CUDA is not available in this process")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    torch_dtype = resolve_dtype(dtype, getattr(config, "dtype", None), bool(gpus))
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if len(gpus) > 1 or max_gpu_memory:
        kwargs["device_map"] = "auto"
        if max_gpu_memory:
            kwargs["max_memory"] = {i: max_gpu_memory for i in range(len(gpus))}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if len(gpus) == 1 and not max_gpu_memory:
        model.to("cuda:0")
    model.eval()
    logger.info("loaded %s as %s on %s", path, torch_dtype, "GPUs " + str(gpus) if gpus else "CPU")
    return model


class ModelRunner:
    """Runs the model for one sequence at a time, each with its own KV cache.

    Any causal LM that transformers loads works here, including remote-code models that return a
    legacy tuple cache: the cache object the model returns is handed back to it unchanged.
    """

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def forward(self, seq) -> torch.Tensor:
        """Prefill the prompt on the first call, then decode the last token; return next-token logits."""
        if seq.cache is None:
            ids = seq.prompt_ids + seq.output_ids
        else:
            ids = seq.output_ids[-1:]
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(input_ids=input_ids, past_key_values=seq.cache, use_cache=True)
        seq.cache = out.past_key_values
        return out.logits[0, -1]
