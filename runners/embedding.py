"""The embedding runner: one BentoML service per served embedding model. Calls that arrive while a
batch is being encoded wait and go together into the next one (up to EMBEDDING_MAX_BATCH texts); a
call that finds the model free runs at once."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import typing as t
from pathlib import Path

import bentoml
import numpy as np
from bentoml.exceptions import ServiceUnavailable

from models.config import ServedModel
from runners.base import RunnerService, cpu_threads, freeze_startup_heap, service_options


EMBEDDING_MAX_BATCH = 64  # texts encoded in one forward pass
EMBEDDING_MAX_WAITING = 64 * EMBEDDING_MAX_BATCH  # texts waiting before a call is refused (the gateway's 429)


def pooling_mode(model_dir: Path) -> str:
    """sentence-transformers' pooling config when the model ships one (mean, cls); mean otherwise."""
    cfg = model_dir / "1_Pooling" / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("pooling_mode_cls_token"):
        return "cls"
    return "mean"


def embedding_runner(served: ServedModel) -> bentoml.Service:
    class EmbeddingRunner(RunnerService):
        model_ref = bentoml.models.BentoModel(served.model)

        def __init__(self) -> None:
            import torch
            from transformers import AutoModel, AutoTokenizer

            # torch: the engine's helpers are imported in the runner's process, not where it is only declared
            from runners.engine.llm_engine import leave_cores_to_the_engine
            from runners.engine.loader import resolve_dtype

            path = Path(self.model_ref.path)  # the attribute resolves to the stored model
            if not served.gpus:  # the encoding thread (below) is the one with an OpenMP team of every core
                leave_cores_to_the_engine()
            device = "cuda:0" if served.gpus else "cpu"
            if served.gpus and not torch.cuda.is_available():
                raise RuntimeError(f"gpus {served.gpus} are configured but CUDA is not available")
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=served.trust_remote_code)
            self.model = AutoModel.from_pretrained(path, trust_remote_code=served.trust_remote_code,
                                                   dtype=resolve_dtype(served.dtype, None, bool(served.gpus)))
            self.model.to(device).eval()
            self.device = device
            self.pooling = pooling_mode(path)
            self.running = 0  # calls in the batch being encoded
            self.waiting: collections.deque[tuple[list[str], asyncio.Future]] = collections.deque()
            self.worker: asyncio.Task | None = None
            # One thread encodes: each thread that runs torch's parallel operations keeps an OpenMP team of
            # its own, and more teams than cores make every one of them slow (leave_cores_to_the_engine).
            self.encoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bentochat-encode")
            freeze_startup_heap()

        @bentoml.api
        async def stats(self) -> t.Dict[str, int]:
            """Calls being encoded and waiting, as the gateway's health poll reads a chat runner's queue."""
            return {"running": self.running, "waiting": len(self.waiting)}

        # Not BentoML's adaptive batching: its dispatcher holds a call back for about the mean wait of
        # the last 50 batches, so after a burst a lone call waited seconds with the model idle.
        @bentoml.api
        async def encode(self, texts: t.List[str]) -> np.ndarray:
            """Normalized sentence embeddings of ``texts``, encoded with whatever else is waiting."""
            waiting = sum(len(queued) for queued, _ in self.waiting)
            if waiting + len(texts) > EMBEDDING_MAX_WAITING:
                raise ServiceUnavailable(f"{waiting} texts are waiting to be encoded")
            future = asyncio.get_running_loop().create_future()
            self.waiting.append((texts, future))
            if self.worker is None or self.worker.done():
                self.worker = asyncio.create_task(self._drain())
            return await future  # a caller that leaves cancels it, and the worker skips it

        async def _drain(self) -> None:
            while self.waiting:
                batch, size = [], 0
                while self.waiting and (not batch or size + len(self.waiting[0][0]) <= EMBEDDING_MAX_BATCH):
                    texts, future = self.waiting.popleft()
                    if not future.done():
                        batch.append((texts, future))
                        size += len(texts)
                if not batch:
                    continue
                self.running = len(batch)
                try:
                    vectors = await asyncio.get_running_loop().run_in_executor(
                        self.encoder, self._encode, [text for texts, _ in batch for text in texts])
                except Exception as e:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                    continue
                finally:
                    self.running = 0
                start = 0
                for texts, future in batch:
                    if not future.done():
                        future.set_result(vectors[start:start + len(texts)])
                    start += len(texts)

        def _encode(self, texts: list[str]) -> np.ndarray:
            import torch

            if not served.gpus:
                torch.set_num_threads(cpu_threads(served))  # the count is this thread's own
            batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy()

    return bentoml.service(**service_options(served, "embedding"))(EmbeddingRunner)
