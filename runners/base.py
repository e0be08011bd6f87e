"""What both runner services share: their name and BentoML options (resources, traffic) from
bentochat.yaml, their CPU threads, and ``describe``, which a gateway elsewhere reads their model from."""

from __future__ import annotations

import base64
import gc
import logging
import os
import typing as t
from pathlib import Path

import bentoml

from models.config import ServedModel
from runners.wire import NEVER_RECYCLE, REQUEST_TIMEOUT_S

logger = logging.getLogger("bentochat.runner")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")


def service_options(served: ServedModel, kind: str) -> dict:
    resources = {"gpu": len(served.gpus)} if served.gpus else {}
    # concurrency: what BentoCloud scales a runner's replicas on (requests in flight per replica), the batch;
    # bentoml serve does not read it. Taken from max_concurrency, so the bento carries it in step.
    traffic: dict = {"timeout": REQUEST_TIMEOUT_S, "concurrency": served.max_concurrency}
    if kind == "embedding":  # chat engines bound their own queue (429) and must still take abort calls
        traffic["max_concurrency"] = served.max_concurrency + served.max_queue
    return {
        "name": served.runner_name,
        "description": f"BentoChat {kind} runner for {served.id} ({served.model})",
        "resources": resources,
        "traffic": traffic,
        "runner_connection": NEVER_RECYCLE,
        # The gateway's health polls call `stats` every few seconds: not an access line each (BentoML's own
        # probes stay unlogged too).
        "logging": {"access": {"skip_paths": ["/metrics", "/healthz", "/livez", "/readyz", "/stats"]}},
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
    Measured on 2 cores (docs/performance.md): two threads gave 1.09x-1.30x the served tokens/s of one
    at concurrency 32 and 64, although the gateway and the HTTP streams share the cores."""
    return served.cpu_threads or len(os.sched_getaffinity(0))


def describe_stored(stored: bentoml.Model) -> dict:
    """What a gateway elsewhere needs to serve a runner's model (metadata, tokenizer, configs,
    generation_config.json, remote code): every file but the weights, base64."""
    path = Path(stored.path)
    files = {str(p.relative_to(path)): base64.b64encode(p.read_bytes()).decode()
             for p in sorted(path.rglob("*")) if p.is_file() and not p.name.endswith(WEIGHT_SUFFIXES)}
    return {"tag": str(stored.tag), "metadata": dict(stored.info.metadata),
            "created": int(stored.info.creation_time.timestamp()), "files": files}


class RunnerService:
    """The base of both runner services; a subclass sets ``model_ref`` (a ``bentoml.models.BentoModel``,
    as a class attribute so that ``bentoml build`` packs the model)."""

    model_ref: t.Any

    @bentoml.api
    async def describe(self) -> t.Dict[str, t.Any]:
        """For a gateway on another machine: the model's metadata and files, all but the weights."""
        return describe_stored(self.model_ref)
