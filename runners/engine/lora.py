"""LoRA adapters (PEFT's format) on the engine's model: read and checked against the model, held in
``max_loras`` slots on the model's device (the least recently used idle one evicted for a newcomer,
and read again from its files when next asked for), and applied per row of the batch, so that
requests for the base model and for several adapters run in one forward pass.

Every linear layer an adapter targets is wrapped once in a :class:`LoRALinear`, which holds the A
matrices of all slots stacked (``[slots * R, in]``) and their B matrices side by side
(``[out, slots * R]``, each slot's scale folded in). A step computes ``x A^T`` for every slot at
once, zeroes in each row the columns of the slots that are not its own (a 0/1 mask per row, built
once per step), and multiplies by ``B``: two small matmuls per layer for the whole batch whatever its
mix of adapters. A row without an adapter gets exactly the base model's output (its mask is all
zero), and a layer no row's adapter targets is not touched at all. On the lean forward, whose
q/k/v and gate/up matmuls are fused, an adapter's q, k and v (or gate and up) matrices fill their
own rows of the fused layer's B, so they too cost one pair of matmuls.

This is cheaper than PEFT's mixed-batch path (``adapter_names``), which loops over the adapters in
the batch in every layer, and it needs no PEFT at run time.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from runners.engine.adapter_files import Adapter, check, read_adapter, read_weights
from runners.engine.errors import AdapterError
from runners.engine.linear import Linear, Part

logger = logging.getLogger("bentochat.engine")

def linear_parts(model) -> dict[str, Part]:
    """transformers' name of each linear layer of ``model`` -> where it is computed. The lean forward
    says so itself (its matmuls are fused); any other model's ``nn.Linear`` modules are their own."""
    if hasattr(model, "linear_parts"):
        return model.linear_parts()
    parts = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            parent, _, attr = name.rpartition(".")
            parts[name] = Part(model.get_submodule(parent), attr, 0, module.out_features, module.in_features)
    return parts


class RowAdapters:
    """Which slot each row of the next forward pass uses, as the 0/1 masks the layers multiply by."""

    def __init__(self, slots: int):
        self.slots = slots
        self.onehot: torch.Tensor | None = None  # [rows, slots]; None: no row has an adapter
        self.used: set[int] = set()
        self._masks: dict = {}

    def select(self, row_slots: list[int | None], device, dtype) -> None:
        self._masks = {}
        self.used = {s for s in row_slots if s is not None}
        if not self.used:
            self.onehot = None
            return
        onehot = torch.zeros(len(row_slots), self.slots, dtype=dtype)
        for row, slot in enumerate(row_slots):
            if slot is not None:
                onehot[row, slot] = 1
        self.onehot = onehot.to(device)

    def mask(self, layer: LoRALinear) -> torch.Tensor | None:
        """``[rows, 1, slots * rank]``: 1 where a column belongs to the row's own slot; None when no
        row's adapter changes this layer."""
        if self.onehot is None or not any(layer.present[s] for s in self.used):
            return None
        key = (layer.rank, tuple(layer.present))
        if key not in self._masks:
            present = torch.tensor(layer.present, dtype=self.onehot.dtype, device=self.onehot.device)
            self._masks[key] = (self.onehot * present).repeat_interleave(layer.rank, dim=1).unsqueeze(1)
        return self._masks[key]


class LoRALinear(torch.nn.Module):
    """A linear layer plus the LoRA deltas of every slot (see the module's docstring)."""

    def __init__(self, base, in_features: int, out_features: int, rows: RowAdapters, device, dtype):
        super().__init__()
        self.base, self.rows = base, rows
        self.in_features, self.out_features = in_features, out_features
        self.rank = 0  # columns per slot
        self.present = [False] * rows.slots
        self.a = torch.zeros(0, in_features, device=device, dtype=dtype)
        self.b = torch.zeros(out_features, 0, device=device, dtype=dtype)
        self._pack()

    def set(self, slot: int, deltas: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Slot ``slot`` computes ``B A`` for each ``(offset, A, B)`` (B scaled), in rows ``offset..``."""
        self.clear(slot)
        need = sum(a.shape[0] for _, a, _ in deltas)
        if need > self.rank:
            self._grow(need)
        column = slot * self.rank
        for offset, a, b in deltas:
            r = a.shape[0]
            self.a[column:column + r] = a
            self.b[offset:offset + b.shape[0], column:column + r] = b
            column += r
        self.present[slot] = True
        self._pack()

    def clear(self, slot: int) -> None:
        if self.present[slot]:
            self.a[slot * self.rank:(slot + 1) * self.rank] = 0
            self.b[:, slot * self.rank:(slot + 1) * self.rank] = 0
            self.present[slot] = False
            self._pack()

    def _pack(self) -> None:
        """The matmuls by A and B, on the lean forward's kernels as its own layer's (on the CPU, torch's
        own bfloat16 matmul of these narrow matrices is several times slower)."""
        own = getattr(self.base, "own", None) is not None
        self.mm_a, self.mm_b = (Linear(self.a, own=own), Linear(self.b, own=own)) if self.rank else (None, None)

    def _grow(self, rank: int) -> None:
        """``rank`` columns per slot; each slot's columns are kept (the new ones are zero)."""
        slots, old = self.rows.slots, self.rank
        a = self.a.new_zeros(slots, rank, self.in_features)
        b = self.b.new_zeros(self.out_features, slots, rank)
        if old:
            a[:, :old] = self.a.view(slots, old, -1)
            b[:, :, :old] = self.b.view(self.out_features, slots, old)
        self.a, self.b, self.rank = a.view(slots * rank, -1), b.view(self.out_features, -1), rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        mask = self.rows.mask(self)
        if mask is None:
            return y
        if x.dim() != 3:  # [rows * tokens, in] from a model that flattens
            return y + self.mm_b(self.mm_a(x.view(mask.shape[0], -1, x.shape[-1])) * mask).view(y.shape)
        return y.add_(self.mm_b(self.mm_a(x) * mask))  # y is the base layer's own new tensor

    __call__ = forward  # no hooks: this runs hundreds of times per step


@dataclass
class Adapters:
    """The adapters an engine knows (``known``, by name), and which of them are resident in one of
    ``max_loras`` slots on the model's device, least recently used first."""

    model: object
    max_loras: int = 4
    known: dict[str, Adapter] = field(default_factory=dict)
    resident: OrderedDict = field(default_factory=OrderedDict)  # Adapter -> slot index, LRU first
    loads: int = 0  # adapters read into a slot (a first use, or again after an eviction)
    evictions: int = 0

    def __post_init__(self):
        self.rows = RowAdapters(self.max_loras)
        self.layers: dict[tuple[int, str], LoRALinear] = {}
        self.parts = linear_parts(self.model)  # before any layer is wrapped
        param = next(self.model.parameters())
        self.device = param.device
        self.dtype = param.dtype if param.dtype.is_floating_point else torch.float32

    def read(self, name: str, path: str | Path, pickles: bool = True) -> Adapter:
        """Read and check an adapter (no state changes: any thread); ``pickles=False`` refuses ``.bin`` weights."""
        return read_adapter(name, path, self.parts, pickles)

    def add(self, adapter: Adapter) -> None:
        """Know ``adapter`` under its name (engine thread). A name in use is an AdapterError."""
        if adapter.name in self.known:
            raise AdapterError(f"an adapter named {adapter.name!r} is loaded already")
        self.known[adapter.name] = adapter

    def remove(self, name: str) -> Adapter:
        """Forget adapter ``name`` (engine thread): no new request can use it; its slot is freed once
        the requests already using it are done (:meth:`free_unknown`)."""
        adapter = self.get(name)
        del self.known[name]
        return adapter

    def get(self, name: str) -> Adapter:
        if name not in self.known:
            raise AdapterError(f"no adapter named {name!r} is loaded")
        return self.known[name]

    def free_unknown(self, busy: set[Adapter]) -> None:
        for adapter in [a for a in self.resident if a not in busy and self.known.get(a.name) is not a]:
            self._evict(adapter)

    def slot(self, adapter: Adapter, busy: set[Adapter]) -> int | None:
        """``adapter``'s slot, after reading it into one if it is not resident (evicting the least
        recently used adapter that no request in ``busy`` uses); None when every slot is busy."""
        if adapter in self.resident:
            self.resident.move_to_end(adapter)
            return self.resident[adapter]
        if len(self.resident) >= self.max_loras:
            idle = next((a for a in self.resident if a not in busy), None)
            if idle is None:
                return None
            self._evict(idle)
            self.evictions += 1
        index = min(set(range(self.max_loras)) - set(self.resident.values()))
        self._install(adapter, index)
        self.resident[adapter] = index
        self.loads += 1
        return index

    def _install(self, adapter: Adapter, index: int) -> None:
        weights = read_weights(adapter.path, file=adapter.weights)
        check(weights, self.parts, f"adapter {adapter.name!r} ({adapter.path})")  # its files may have changed
        by_layer: dict[tuple[int, str], list] = {}
        for module, (a, b, scale) in weights.items():
            part = self.parts[module]
            by_layer.setdefault((id(part.holder), part.attr), []).append(
                (part, (part.offset, a.to(self.device, self.dtype), (b * scale).to(self.device, self.dtype))))
        for key, deltas in by_layer.items():
            self._layer(key, deltas[0][0]).set(index, [d for _, d in deltas])
        logger.info("adapter %s in slot %d (%d layers, rank %d)", adapter.name, index, len(weights), adapter.rank)

    def _layer(self, key: tuple[int, str], part: Part) -> LoRALinear:
        """The layer that computes ``part``, wrapped for LoRA (once)."""
        if key not in self.layers:
            out = max(p.offset + p.out_features for p in self.parts.values()
                      if p.holder is part.holder and p.attr == part.attr)
            wrapped = LoRALinear(getattr(part.holder, part.attr), part.in_features, out, self.rows, self.device,
                                 self.dtype)
            setattr(part.holder, part.attr, wrapped)
            self.layers[key] = wrapped
        return self.layers[key]

    def _evict(self, adapter: Adapter) -> None:
        index = self.resident.pop(adapter)
        for layer in self.layers.values():
            layer.clear(index)
        logger.info("adapter %s left slot %d", adapter.name, index)

    def select(self, seqs: list) -> None:
        """The next forward pass's rows are ``seqs``, each with its own adapter (or none)."""
        if not self.resident:
            self.rows.onehot = None
            return
        self.rows.select([self.resident[s.adapter] if s.adapter is not None else None for s in seqs],
                         self.device, self.dtype)
