"""The embedding runner: one BentoML service per served embedding model, with adaptive batching."""

from __future__ import annotations

import asyncio
import json
import typing as t
from pathlib import Path

import bentoml
import numpy as np

from models.config import ServedModel
from runners.base import StoredModelRunner, resolve_dtype, service_options


EMBEDDING_MAX_BATCH = 64  # texts encoded in one forward pass


def pooling_mode(model_dir: Path) -> str:
    """sentence-transformers' pooling config when the model ships one (mean, cls); mean otherwise."""
    cfg = model_dir / "1_Pooling" / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("pooling_mode_cls_token"):
        return "cls"
    return "mean"


def embedding_runner(served: ServedModel) -> bentoml.Service:
    class EmbeddingRunner(StoredModelRunner):
        model_ref = bentoml.models.BentoModel(served.model)

        def __init__(self) -> None:
            import torch
            from transformers import AutoModel, AutoTokenizer

            path = Path(self.model_ref.path)  # the attribute resolves to the stored model
            device = "cuda:0" if served.gpus else "cpu"
            if served.gpus and not torch.cuda.is_available():
                raise RuntimeError(f"gpus {served.gpus} are configured but CUDA is not available")
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=served.trust_remote_code)
            self.model = AutoModel.from_pretrained(path, trust_remote_code=served.trust_remote_code,
                                                   dtype=resolve_dtype(served.dtype, None, bool(served.gpus)))
            self.model.to(device).eval()
            self.device = device
            self.pooling = pooling_mode(path)
            self.running = 0

        @bentoml.api
        async def stats(self) -> t.Dict[str, int]:
            """Calls being encoded, as the gateway's health poll reads a chat runner's queue."""
            return {"running": self.running, "waiting": 0}

        # BentoML's batcher refuses (503) a call it expects to finish later than max_latency_ms; a
        # second's worth was far too little for 64 callers at once on a CPU. The gateway splits large
        # inputs into calls of a few texts each, and answers 429 when this still refuses.
        @bentoml.api(batchable=True, max_batch_size=EMBEDDING_MAX_BATCH, max_latency_ms=60_000)
        async def encode(self, texts: t.List[str]) -> np.ndarray:
            """Normalized sentence embeddings; concurrent calls are batched by BentoML."""
            self.running += 1
            try:
                return await asyncio.to_thread(self._encode, texts)
            finally:
                self.running -= 1

        def _encode(self, texts: list[str]) -> np.ndarray:
            import torch

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
