"""The running batch's KV cache on every forward but the native pass (whose cache is paged,
``block_manager.py``), in the two model-side forms that can be batched, both
``[batch, heads, length, head_dim]`` tensors per layer:
- transformers' ``DynamicCache`` made only of full-attention ``DynamicLayer``s: the running batch's
  keys and values live in a ``SlotCache``, one preallocated slot per sequence, which each decode step
  writes in place (no copy of the cache per step, none of the others when a sequence joins or leaves);
- the legacy tuple of ``(key, value)`` pairs that older remote-code models (Baichuan, early Qwen)
  return, which the model extends itself: the batch cache is left-padded so that every row ends at
  the same column and a step appends one column for all rows.
A model whose cache is anything else (sliding windows, sequence-first layouts) is run one sequence at
a time (``model_runner.ModelRunner``).
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


def left_pad_kv(kv: KV, length: int) -> KV:
    """Pad every layer on the left (the sequence axis) to ``length`` columns."""
    have = kv[0][0].shape[2]
    if have == length:
        return kv
    return [(_pad(k, length - have), _pad(v, length - have)) for k, v in kv]


def _pad(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], n, t.shape[3]), t], dim=2)


def concat_kv(parts: list[KV]) -> KV:
    """Stack left-padded batches into one, padding the shorter ones on the left."""
    if len(parts) == 1:
        return parts[0]
    length = max(p[0][0].shape[2] for p in parts)
    parts = [left_pad_kv(p, length) for p in parts]
    return [(torch.cat([p[i][0] for p in parts]), torch.cat([p[i][1] for p in parts])) for i in range(len(parts[0]))]


def select_kv(kv: KV, rows: list[int], drop_columns: int = 0) -> KV:
    """Keep ``rows`` of the batch and drop the ``drop_columns`` leftmost columns (padding for every row)."""
    index = torch.tensor(rows, device=kv[0][0].device)
    return [(k.index_select(0, index)[:, :, drop_columns:], v.index_select(0, index)[:, :, drop_columns:])
            for k, v in kv]


class SlotLayer(DynamicLayer):
    """What the model sees of one layer of the slot cache in one decode step: ``update`` writes each
    row's new key and value in place at that row's own length, and returns views of the first
    ``width`` columns of the running rows (the longest row plus the new token; the attention mask
    hides what lies past each row's own length)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                 width: int):
        super().__init__()
        self.keys, self.values, self.rows, self.positions, self.width = keys, values, rows, positions, width
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys[self.rows, :, self.positions] = key_states[:, :, 0]
        self.values[self.rows, :, self.positions] = value_states[:, :, 0]
        n = len(self.rows)
        return self.keys[:n, :, :self.width], self.values[:n, :, :self.width]

    def get_seq_length(self) -> int:
        return self.width - 1


class SlotCache:
    """The running batch's keys and values for models with transformers' ``DynamicCache``: one slot
    (row) per sequence in preallocated buffers, written in place. A decode step writes one column per
    row, at that row's own length; a sequence that joins is copied into the next slot; one that leaves
    is replaced by the sequence in the last slot, so the running rows are always slots ``0..n-1``.
    Nothing is copied per step; the buffers grow (and shrink) by whole chunks of rows and columns."""

    ROWS_CHUNK, COLUMNS_CHUNK = 8, 256  # COLUMNS_CHUNK: a multiple of lean.WIDTH_MULTIPLE

    def __init__(self):
        self.rows: list = []  # the sequence in each slot; slot i holds rows[i].num_cached columns
        self.kv: KV | None = None  # per layer, [slots, heads, columns, head_dim]

    def arrange(self, seqs: list) -> list[int]:
        """Make the running rows exactly ``seqs``; returns each one's slot, in ``seqs``' order."""
        wanted = {id(s) for s in seqs}
        i = 0
        while i < len(self.rows):
            if id(self.rows[i]) in wanted:
                i += 1
                continue
            moved = self.rows.pop()  # the last slot's sequence fills the hole (unless it is the one leaving)
            if i < len(self.rows):
                n = moved.num_cached
                for k, v in self.kv:
                    k[i, :, :n], v[i, :, :n] = k[len(self.rows), :, :n], v[len(self.rows), :, :n]
                self.rows[i] = moved
        present = {id(s) for s in self.rows}
        joining = [s for s in seqs if id(s) not in present]
        self._reserve(len(seqs), max(s.num_cached for s in seqs) + 1, joining[0].cache if joining else None)
        for seq in joining:
            slot, n = len(self.rows), seq.num_cached
            for (k, v), (sk, sv) in zip(self.kv, seq.cache):
                k[slot, :, :n], v[slot, :, :n] = sk[0], sv[0]
            seq.cache = None  # now held by the slot cache
            self.rows.append(seq)
        slot = {id(s): i for i, s in enumerate(self.rows)}
        return [slot[id(s)] for s in seqs]

    def _reserve(self, rows: int, columns: int, like: KV | None) -> None:
        """Buffers of at least ``rows`` slots and ``columns`` columns (rounded up to whole chunks), and
        at most twice that, so that one long request does not hold memory after it left; what is held
        is kept."""
        rows = -(-rows // self.ROWS_CHUNK) * self.ROWS_CHUNK
        columns = -(-columns // self.COLUMNS_CHUNK) * self.COLUMNS_CHUNK
        if self.kv is not None:
            have_rows, have_columns = self.kv[0][0].shape[0], self.kv[0][0].shape[2]
            if rows <= have_rows <= 2 * rows and columns <= have_columns <= 2 * columns:
                return
        old, template = self.kv, self.kv or like
        self.kv = [(k.new_zeros(rows, k.shape[1], columns, k.shape[3]), v.new_zeros(rows, v.shape[1], columns, v.shape[3]))
                   for k, v in template]
        if old is not None:
            n, width = len(self.rows), max((s.num_cached for s in self.rows), default=0)
            for (k, v), (ok, ov) in zip(self.kv, old):
                k[:n, :, :width], v[:n, :, :width] = ok[:n, :, :width], ov[:n, :, :width]

    def model_cache(self, lengths: torch.Tensor, width: int) -> DynamicCache:
        cache = DynamicCache()
        rows = torch.arange(len(lengths), device=lengths.device)  # one index for every layer's writes
        cache.layers = [SlotLayer(k, v, rows, lengths, width) for k, v in self.kv]
        return cache


def kv_bytes(kv: list | None) -> int:
    """Bytes of the keys and values of ``kv`` (per layer ``(keys, values)``)."""
    return sum(k.nbytes + v.nbytes for k, v in kv) if kv else 0
