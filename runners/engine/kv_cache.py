"""The running batch's KV cache: per-layer key and value tensors, left-padded so that every row ends
at the same column and one decode step appends one column for all rows.

Two model-side forms are understood: transformers' ``DynamicCache`` made only of full-attention
``DynamicLayer``s, and the legacy tuple of ``(key, value)`` pairs that older remote-code models
(Baichuan, early Qwen) return. Both hold ``[batch, heads, length, head_dim]`` tensors. A model
whose cache is anything else (sliding windows, sequence-first layouts) is run one sequence at a time.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

KV = list[tuple[torch.Tensor, torch.Tensor]]


def cache_form(cache: Any, batch: int, length: int) -> str | None:
    """``"dynamic"`` or ``"tuple"`` when the cache can be batched, else None."""
    if isinstance(cache, DynamicCache):
        form = "dynamic" if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers) else None
    elif isinstance(cache, (tuple, list)) and cache and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in cache):
        form = "tuple"
    else:
        form = None
    if form is None:
        return None
    ok = all(k.dim() == 4 and v.dim() == 4 and k.shape[0] == v.shape[0] == batch
             and k.shape[2] == v.shape[2] == length for k, v in to_kv(cache))
    return form if ok else None


def to_kv(cache: Any) -> KV:
    if isinstance(cache, DynamicCache):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [tuple(p) for p in cache]


def to_model_cache(kv: KV, form: str) -> Any:
    """Wrap the tensors in the form the model takes, without copying them."""
    if form == "tuple":
        return tuple(kv)
    cache = DynamicCache()
    cache.layers = []
    for k, v in kv:
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


def kv_bytes(kv: KV | None) -> int:
    return sum(k.nbytes + v.nbytes for k, v in kv) if kv else 0


def left_pad(kv: KV, length: int) -> KV:
    """Pad every layer on the left (the sequence axis) to ``length`` columns."""
    have = kv[0][0].shape[2]
    if have == length:
        return kv
    return [(_pad(k, length - have), _pad(v, length - have)) for k, v in kv]


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)


def concat(parts: list[KV]) -> KV:
    """Stack left-padded batches into one, padding the shorter ones on the left."""
    if len(parts) == 1:
        return parts[0]
    length = max(p[0][0].shape[2] for p in parts)
    parts = [left_pad(p, length) for p in parts]
    return [(torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])) for i in range(len(parts[0]))]


def select(kv: KV, rows: list[int], drop_columns: int = 0) -> KV:
    """Keep ``rows`` of the batch and drop the ``drop_columns`` leftmost columns (padding for every row)."""
    index = torch.tensor(rows, device=kv[0][0].device)
    return [(k.index_select(0, index)[:, :, drop_columns:], v.index_select(0, index)[:, :, drop_columns:])
            for k, v in kv]
