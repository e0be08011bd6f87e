"""The lean forward's matrix products: ``Linear``, a weight packed once for the kernel that multiplies
it (BentoChat's own, ``native.py``, int8 included; oneDNN's, blocked so that a row's result does not
depend on its batch; torch's int8), and ``Part``, where one of transformers' linear layers is computed
(a row range of a fused ``Linear``), which LoRA adapters target by name. After nano-vllm's ``layers/linear.py``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runners.engine import native

# The batch size oneDNN packs a weight for (a hint: any batch runs); measured here, these are about
# the fastest at every batch from 1 to 64.
PACK_FOR = {torch.float32: 32, torch.bfloat16: 16}


def cpu_bf16() -> bool:
    """Whether oneDNN runs bfloat16 on this CPU with its own instructions (AVX-512 BF16, AMX)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def packs(weight: torch.Tensor) -> bool:
    """Whether the weight is packed for oneDNN: on the CPU, float32 (faster than MKL's matmul here at
    every batch) and bfloat16 where the CPU has the instructions."""
    if weight.device.type != "cpu" or weight.dtype not in PACK_FOR or not torch.backends.mkldnn.is_available():
        return False
    return weight.dtype == torch.float32 or cpu_bf16()


class Linear:
    """``y = x W^T + b``, with the weight packed for BentoChat's own kernels where ``own`` asks and they
    run, else for oneDNN on the CPU (see :func:`packs`). ``int8``: the weight quantized to int8, for
    BentoChat's int8 kernel where ``own`` asks and it runs (one scale per 32 inner elements of a feature,
    :func:`native.pack_int8`), else for torch's ``_weight_int8pack_mm`` (one scale per feature). A weight
    stored in int8 (``native.Int8Weight``) runs in int8 so: packed as it is for BentoChat's kernel, else
    dequantized and quantized per feature. ``int4`` (or a weight stored in 4 bits, ``native.Int4Weight``):
    in 4 bits on BentoChat's int4 kernel where it runs (:func:`native.int4_runs`), else in int8.

    In bfloat16, oneDNN's kernels give a row the same result in any batch only on small enough products
    (measured on the two CPU kinds this project runs on, over shapes from 32 to 3072 output features and
    64 to 4096 inner ones): with AMD Zen 4's kernels (AVX-512 BF16, also run on the Xeon with
    ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``) an inner dimension of at most ``K_BLOCK``; on
    Intel Sapphire Rapids (AMX) at most ``ROW_BLOCK`` rows at once, and a 32-feature weight (a LoRA
    adapter's A) at most ``K_BLOCK`` inner ones on two threads. So a bfloat16 weight is split along its
    inner dimension in blocks of ``K_BLOCK`` (``down_proj`` of most models is longer), their products
    summed, and at most ``ROW_BLOCK`` rows (tokens) are multiplied at once. The split costs some accuracy
    (each block's sum is rounded to bfloat16), the row blocks some speed (the weight is read once per
    block); BentoChat's own kernels (``native.py``) need neither.
    """

    K_BLOCK, ROW_BLOCK = 1024, 32

    def __init__(self, weight: torch.Tensor | native.Int8Weight | native.Int4Weight, bias: torch.Tensor | None = None,
                 int8: bool = False, own: bool = False, int4: bool = False):
        self.bias = bias
        tiles = own and native.int4_runs(weight.dtype)
        if int4 and tiles and isinstance(weight, torch.Tensor):
            weight = native.Int4Weight.of(weight)
        elif isinstance(weight, native.Int4Weight) and not tiles:  # (where int4_linear does not run: int8)
            weight = native.Int8Weight.of(weight.dequantize())
        stored = isinstance(weight, native.QUANTIZED)
        self.int8 = int8 = int8 or int4 or stored
        self.row_block = None
        self.own = None  # the weight packed for BentoChat's own matmul (native.py), where ``own`` asks and it runs
        if own and (stored or weight.device.type == "cpu") and native.runs(weight.dtype):
            self.own = native.pack_int4(weight) if isinstance(weight, native.Int4Weight) else \
                native.pack_int8(weight) if int8 else native.pack(weight)
            self.out, self.own_bias = weight.shape[0], native.pad_bias(bias, weight.shape[0])
        elif isinstance(weight, native.Int8Weight):  # (stored in int8: for torch's int8 matmul, one scale per feature)
            weight = weight.dequantize()
        self.packed = self.own is None and packs(weight) and not int8
        if int8 and self.own is None:  # symmetric, one scale per output channel
            scales = weight.float().abs().amax(dim=1).clamp(min=1e-8) / 127
            self.weight = (weight.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
            self.scales = scales.to(weight.dtype)
        elif self.packed:
            blocked = weight.dtype == torch.bfloat16
            self.row_block = self.ROW_BLOCK if blocked else None
            parts = weight.split(self.K_BLOCK, dim=1) if blocked else [weight]
            self.blocks = [torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_FOR[weight.dtype])
                           for w in parts]
        elif self.own is None:
            self.weight = weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.own is not None:
            return native.linear(x, self.own, self.out, self.own_bias)
        if self.int8:
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scales)
            y = y.view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        if not self.packed:
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])
        if self.row_block and len(rows) > self.row_block:
            return torch.cat([self._packed(part) for part in rows.split(self.row_block)]).view(*x.shape[:-1], -1)
        return self._packed(x)

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        parts = x.split(self.K_BLOCK, dim=-1) if len(self.blocks) > 1 else [x]  # (one block: any length)
        for i, (part, w) in enumerate(zip(parts, self.blocks)):
            out = torch.ops.mkldnn._linear_pointwise(part, w, self.bias if i == 0 else None, "none", [], "")
            y = out if y is None else y.add_(out)
        return y


def fused_linear(*modules, dtype: torch.dtype | None = None, **options) -> Linear:
    """One ``Linear`` computing the outputs of several of transformers' ``nn.Linear`` modules that take the
    same input (q, k and v; gate and up), their weights stacked, in order, in ``dtype`` if given. Weights
    stored quantized stay so: in 4 bits where all of them are (``native.Int4Weight``), else all in int8
    (``Int8Weight``)."""
    weights = [m.weight if isinstance(m.weight, native.QUANTIZED) else m.weight.detach().to(dtype) for m in modules]
    if all(isinstance(w, native.Int4Weight) for w in weights):  # (a stored model's)
        weight = native.Int4Weight.cat(weights)
    elif any(isinstance(w, native.QUANTIZED) for w in weights):  # mixed: all in int8
        weight = native.Int8Weight.cat([w if isinstance(w, native.Int8Weight) else native.Int8Weight.of(
            w.dequantize() if isinstance(w, native.Int4Weight) else w) for w in weights])
    else:
        weight = torch.cat(weights) if len(weights) > 1 else weights[0]
    biases = [m.bias for m in modules]
    known = next((b for b in biases if b is not None), None)
    bias = None if known is None else torch.cat(
        [b.detach() if b is not None else known.new_zeros(m.weight.shape[0]) for m, b in zip(modules, biases)]).to(dtype)
    return Linear(weight, bias, **options)


@dataclass(frozen=True)
class Part:
    """Where transformers' linear layer ``name`` is computed: attribute ``attr`` of ``holder``, rows
    ``offset .. offset + out_features`` of its output."""

    holder: object
    attr: str
    offset: int
    out_features: int
    in_features: int
