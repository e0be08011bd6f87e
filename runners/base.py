"""What both runner services share: their name, BentoML options (resources, traffic) from
bentochat.yaml, where and in which dtype their model is loaded, and ``describe``."""

from __future__ import annotations

import base64
import gc
import logging
import os
import typing as t
from pathlib import Path

import bentoml

from models.config import ServedModel

logger = logging.getLogger("bentochat.runner")

REQUEST_TIMEOUT_S = 3600  # a long generation streams for minutes; BentoML's default of 60 s would cut it
# BentoML's client to a dependency closes its connection pool after 100 requests or 300 s by default,
# and with it every stream still running on it: the gateway would lose requests under load.
NEVER_RECYCLE = {"max_requests": 2**31 - 1, "max_age": 1e9}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")


def service_options(served: ServedModel, kind: str) -> dict:
    resources = {"gpu": len(served.gpus)} if served.gpus else {}
    traffic: dict = {"timeout": REQUEST_TIMEOUT_S}
    if kind == "embedding":  # chat engines bound their own queue (429) and must still take abort calls
        traffic["max_concurrency"] = served.max_concurrency + served.max_queue
    return {
        "name": served.runner_name,
        "description": f"BentoChat {kind} runner for {served.id} ({served.model})",
        "resources": resources,
        "traffic": traffic,
        "runner_connection": NEVER_RECYCLE,
        "workers": 1,  # one engine per model replica; scale with replicas, not workers
    }


def freeze_startup_heap() -> None:
    """Leave what start-up made out of Python's garbage collector (``gc.freeze``): a full collection
    walks every tracked object, and the libraries, models and tokenizers loaded at start are most of
    them, while the engine's thread and the streams wait. Measured on a chat runner under load: one
    full collection held everything for 270 ms, as a wave of 32 requests arrived (their time to first
    token)."""
    gc.collect()
    gc.freeze()


def cpu_threads(served: ServedModel) -> int:
    """Torch threads of a runner on CPU: ``cpu_threads`` if set, else every core this process may use.
    Measured on 2 cores (README, Performance): two threads gave 1.09x-1.30x the served tokens/s of one
    at concurrency 32 and 64, although the gateway and the HTTP streams share the cores."""
    return served.cpu_threads or len(os.sched_getaffinity(0))


def resolve_dtype(dtype: str, checkpoint_dtype: str | None, on_gpu: bool, lean: bool = False):
    """The torch dtype to load in. ``auto``: on a GPU the checkpoint's own; on a CPU with bfloat16
    instructions (AVX-512 BF16, AMX) bfloat16 for a model on the lean forward, whose packed bfloat16
    matmuls are faster than float32 at every batch size; float32 otherwise (transformers' bfloat16
    path is slower than float32 at small batches, and half precision is often unsupported)."""
    import torch

    from runners.engine.lean import cpu_bf16

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype != "auto":
        return dtypes[dtype]
    if on_gpu:
        return dtypes.get(str(checkpoint_dtype), torch.float16)
    if lean and cpu_bf16():
        return torch.bfloat16
    return torch.float32


def load_causal_lm(path: str, *, dtype: str = "auto", gpus: list[int] | None = None,
                   max_gpu_memory: str | None = None, trust_remote_code: bool = False, forward: str = "transformers",
                   quantization: str | None = None, attention: str = "fused", matmul: str = "auto"):
    """Load a stored causal LM onto the configured GPUs (FastChat's --gpus/--max-gpu-memory) or the CPU;
    with ``forward="lean"``, on BentoChat's lean forward where its family is supported, its weights
    in int8 with ``quantization="int8"`` (FastChat's --load-8bit), in BentoChat's native pass where its
    kernels run (bfloat16 on AMX or AVX-512 BF16, float32 on AVX-512) unless ``matmul="onednn"`` or ``attention="eager"``,
    else with its decode step attending with torch's fused kernel unless ``attention="eager"``
    (``lean.LeanCausalLM``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from runners.engine.lean import FAMILIES, lean, supported_config

    gpus = list(gpus or [])
    if gpus:
        # Pin this process to the configured GPUs before CUDA initializes; they are then cuda:0..n-1.
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        if not torch.cuda.is_available():
            raise RuntimeError(f"gpus {gpus} are configured but CUDA is not available in this process")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    on_lean = forward == "lean" and supported_config(config)
    if quantization and not on_lean:
        raise ValueError(f"quantization: {quantization} runs on the lean forward, for {', '.join(FAMILIES)} models "
                         f"with forward: lean; this one is {config.model_type} with forward: {forward}")
    torch_dtype = resolve_dtype(dtype, getattr(config, "dtype", None), bool(gpus), on_lean)
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
    return lean(model, int8=quantization == "int8", fused_attention=attention == "fused",
                matmul=matmul) if on_lean else model


def describe_stored(stored: bentoml.Model) -> dict:
    """What a gateway elsewhere needs to serve a runner's model (metadata, tokenizer, configs,
    generation_config.json, remote code): every file but the weights, base64."""
    path = Path(stored.path)
    files = {str(p.relative_to(path)): base64.b64encode(p.read_bytes()).decode()
             for p in sorted(path.rglob("*")) if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)}
    return {"tag": str(stored.tag), "metadata": dict(stored.info.metadata),
            "created": int(stored.info.creation_time.timestamp()), "files": files}


class StoredModelRunner:
    """The base of both runner services; a subclass sets ``model_ref`` (a ``bentoml.models.BentoModel``,
    as a class attribute so that ``bentoml build`` packs the model)."""

    model_ref: t.Any

    @bentoml.api
    async def describe(self) -> t.Dict[str, t.Any]:
        """For a gateway on another machine: the model's metadata and files, all but the weights."""
        return describe_stored(self.model_ref)
