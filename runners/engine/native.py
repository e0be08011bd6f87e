"""BentoChat's native kernels (``kernels/``), on x86-64 CPUs with AVX2 and up: built ahead of time, one library per
instruction-set level (``native_build.py``: ``python -m runners.engine.native``, which ``make install`` runs),
and loaded by :func:`ops`, the highest level this CPU runs:

- ``amx_linear.cpp``: the bfloat16 matmul on Intel AMX (Sapphire Rapids and later);
- ``avx_linear.cpp``: the float32 matmul on AVX-512, and the bfloat16 one on AVX-512 BF16 for CPUs
  without AMX (AMD Zen 4); both on AVX2 and FMA too (the ``avx2`` level, for CPUs without AVX-512: AMD
  Zen 2 and 3, Intel before Skylake-SP), bfloat16 widened to float32 in registers;
- ``int8_linear.cpp``: the int8 matmul (``quantization: int8``) for bfloat16 and float32 models: int8
  weights with a float32 scale per 32 inner elements (as GGUF's Q8_0), about half the bytes of bfloat16
  to read per decode step; on AVX-512 or AVX2 (the weights alone in int8), or for a bfloat16 model with its
  rows quantized alike (as llama.cpp multiplies Q8_0 weights) on AMX's int8 tiles, with AVX-512 VNNI or on
  AVX2 (the same bits), faster past a few rows; and the 4-bit one (``quantization: int4``) alike;
- ``forward.cpp``: the lean forward's whole pass (every layer, prefill and decode) in one call, in
  bfloat16 (on AMX, else AVX-512 BF16, else AVX2) and in float32, on any of those matmuls; its
  vector code is ``simd.h``'s 16 lanes (one AVX-512 register, or two AVX2 ones).

Why kernels of our own: each gives a row the same bits alone and in any batch by construction (oneDNN's
bfloat16 kernels change some rows' sums past 32 rows on these CPUs), each is faster on the 2-core
development machine than the oneDNN kernels the lean forward had, and one call per forward pass instead
of ~500 small torch operations removes about half of a decode step at batch 1 (docs/performance.md).
Their work is split over torch's threads with OpenMP. Where the CPU has no AVX2 and FMA, or there is no
library for its level (for this torch and these sources) and no compiler to build one at first use, or a
build fails, :func:`ops` is None and the lean forward keeps oneDNN's kernels and its Python pass; each
fallback is logged, and so is the library loaded.

``python -m runners.engine.native [--optional]`` builds the libraries and says what runs here.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from runners.engine import native_build
from runners.engine.native_build import LEVELS

logger = logging.getLogger("bentochat.engine")

PANEL, CHUNK = 64, 32  # the AMX kernel's output features per panel and inner elements per chunk
LANES = 16  # the AVX-512 kernels' output features per panel
GROUP = 32  # the int8 kernel's inner elements per scale

_ops: object | None = None
_level: str | None = None  # the level of the library loaded
_tried = False


def cpu_flags() -> set[str]:
    """The CPU's flags (/proc/cpuinfo's). ``BENTOCHAT_CPU_FLAGS``, where set, keeps only those it lists: to run
    as a CPU with fewer features would (the tests; comparing levels on one machine), never with more."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    flags = set(line.split()[2:])
    only = os.environ.get("BENTOCHAT_CPU_FLAGS")
    return flags if only is None else flags & set(only.split())


def cpu_has_avx512_bf16() -> bool:
    return "avx512_bf16" in cpu_flags()


def level_here() -> str | None:
    """The highest level of the kernels (``native_build.LEVELS``) this CPU runs, None below AVX2; what it
    lacks for the next level is logged."""
    flags = cpu_flags()
    fits = [level for level, (_, needs, _) in LEVELS.items() if needs <= flags]
    if len(fits) < len(LEVELS):
        _, needs, lacks = LEVELS[list(LEVELS)[len(fits)]]
        (logger.info if fits else logger.warning)(
            "BentoChat's native kernels: no %s on this CPU: %s (it lacks %s)", lacks,
            f"the {fits[-1]} level" if fits else "oneDNN's kernels and the Python pass instead", " ".join(sorted(needs - flags)))
    return fits[-1] if fits else None


def library(level: str) -> Path | None:
    """The library of ``level`` for this torch and these sources: the one built ahead, else built now where
    there is a compiler, else None. Each library found but refused is logged, and why."""
    path = native_build.directory() / native_build.library_name(level)
    if path.is_file():
        return path
    for other, why in native_build.others(level):
        logger.warning("BentoChat's native kernels: %s is %s: not loaded", other, why)
    where = f"no {level} library in {path.parent}"
    if native_build.compiler() is None:
        logger.warning("BentoChat's native kernels: %s and no C++ compiler (c++) to build one: oneDNN's kernels and "
                       "the Python pass instead (`python -m runners.engine.native` builds it ahead)", where)
        return None
    logger.warning("BentoChat's native kernels: %s: building it now (about 30 s; `python -m runners.engine.native` "
                   "builds it ahead)", where)
    return native_build.build(level)


def ops():
    """``torch.ops.bentochat`` of the library of this CPU's level, loaded on first call; None where this CPU
    or machine cannot run it (the reason is logged once)."""
    global _ops, _level, _tried
    if _tried:
        return _ops
    _tried = True
    level = level_here()
    if level is None:
        return None
    try:
        path = library(level)
        if path is None:
            return None
        torch.ops.load_library(str(path))
    except Exception as e:  # a failed build or load leaves oneDNN's kernels
        logger.warning("BentoChat's native kernels are not used: %s", e)
        return None
    logger.info("BentoChat's native kernels: the %s level, %s", level, path)
    _ops, _level = torch.ops.bentochat, level
    return _ops


def level() -> str | None:
    """The level of the library loaded (``native_build.LEVELS``), None where none is."""
    return _level if ops() is not None else None


def amx() -> bool:
    """Whether the AMX kernels run here: the library loaded is the AMX level's (the CPU has AMX) and Linux
    grants the process AMX's tile state (below that level ``amx_available`` is false)."""
    return ops() is not None and bool(ops().amx_available())


def quantized_rows() -> bool:
    """Whether the library loaded multiplies a bfloat16 model's int8 and 4-bit weights by its rows quantized alike:
    from the AVX-512 BF16 and VNNI level up (on AMX's tiles where :func:`amx`, else with AVX-512 VNNI), and on the
    AVX2 level (the same bits); not on the AVX-512 level without VNNI."""
    return ops() is not None and ("avx512_vnni" in LEVELS[_level][1] or _level == "avx2")


def runs(dtype: torch.dtype) -> bool:
    """Whether BentoChat's own matmul and forward pass take this dtype here: float32 at every level,
    bfloat16 on the AVX2 level (widened to float32) and from the AVX-512 BF16 level up (on AMX where
    :func:`amx`)."""
    if ops() is None:
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _level != "avx512")


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] in the layout of its kernel, zero-padded. bfloat16 on AMX: panels of 64
    output features, chunks of 32 inner elements, each chunk four B tiles of 16 features by 16 inner
    pairs. bfloat16 on AVX-512 BF16: panels of 16 output features, each [in / 2, 16, 2] (pairs of inner
    elements). float32: panels of 16 output features, each [in, 16]."""
    out, inner = weight.shape
    if weight.dtype == torch.float32 or not amx():
        panels, pairs = -(-out // LANES), -(-inner // 2)
        if weight.dtype == torch.float32:
            return F.pad(weight, (0, 0, 0, panels * LANES - out)).view(panels, LANES, inner).transpose(1, 2).contiguous()
        w = F.pad(weight, (0, 2 * pairs - inner, 0, panels * LANES - out))
        return w.view(panels, LANES, pairs, 2).transpose(1, 2).contiguous()
    panels, chunks = -(-out // PANEL), -(-inner // CHUNK)
    w = F.pad(weight.to(torch.bfloat16), (0, chunks * CHUNK - inner, 0, panels * PANEL - out))
    # [p, j, o, kc, pair, e] (feature p*64 + j*16 + o, inner kc*32 + 2*pair + e) -> [p, kc, j, pair, o, e]
    return w.view(panels, 4, 16, chunks, 16, 2).permute(0, 3, 1, 4, 2, 5).contiguous()


@dataclass
class Int8Weight:
    """A linear layer's weight kept in int8, as a stored model holds it (GGUF's Q8_0 kept at import, or
    quantized at import): values [out, groups * GROUP] and float32 scales [out, groups], one per GROUP
    inner elements of a feature (:func:`quantize_int8`'s). ``dtype``: the model's, for
    :meth:`dequantize` and for the kernels that run it."""

    q: torch.Tensor
    scales: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @classmethod
    def of(cls, weight: torch.Tensor) -> Int8Weight:
        return cls(*quantize_int8(weight), weight.dtype)

    @classmethod
    def cat(cls, weights: list[Int8Weight]) -> Int8Weight:
        return cls(torch.cat([w.q for w in weights]), torch.cat([w.scales for w in weights]), weights[0].dtype)

    def dequantize(self) -> torch.Tensor:
        out, groups = self.scales.shape
        return (self.q.view(out, groups, GROUP).float() * self.scales[..., None].float()).view(out, -1).to(self.dtype)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` [out, in] in int8 [out, groups * GROUP] (zero-padded to whole groups) with float32
    scales [out, groups]: symmetric, one scale (absmax / 127) per GROUP inner elements of a feature, as
    GGUF's Q8_0 (whose scales are float16: such a weight quantizes back to itself)."""
    out, inner = weight.shape
    groups = -(-inner // GROUP)
    w = F.pad(weight.float(), (0, groups * GROUP - inner)).view(out, groups, GROUP)
    scales = w.abs().amax(dim=-1) / 127
    q = (w / scales.clamp(min=1e-30)[..., None]).round_().clamp_(-127, 127).to(torch.int8)
    return q.view(out, groups * GROUP), scales


def pack_int8(weight: torch.Tensor | Int8Weight) -> torch.Tensor:
    """``weight`` [out, in] for ``int8_linear``, quantized by :func:`quantize_int8` (or already, an
    :class:`Int8Weight`), zero-padded to panels of ``LANES`` features. An int8 tensor
    [panels, groups, 576]: per panel and group the 32 x 16 weights (inner element i's 16 features at
    bytes 16 i ..), then the 16 features' scales (float32, as bytes). A bfloat16 model's where
    :func:`quantized_rows` (x quantized): [panels, groups, 16, 36], the same bytes but the weights as AMX's int8
    B tile (and VPDPBUSD) takes them (inner quad j's 16 features at bytes 64 j .., each feature's four elements side by
    side). Quantized a few thousand
    features at a time (a float32 copy of a whole lm_head is large)."""
    out, inner = weight.shape
    panels, groups = -(-out // LANES), -(-inner // GROUP)
    tiles = weight.dtype == torch.bfloat16 and quantized_rows()
    packed = torch.empty(panels, groups, GROUP * LANES + 4 * LANES, dtype=torch.int8)
    step = 256  # panels at a time
    for first in range(0, panels, step):
        last = min(panels, first + step)
        rows = slice(first * LANES, last * LANES)
        q, scales = (weight.q[rows], weight.scales[rows]) if isinstance(weight, Int8Weight) else \
            quantize_int8(weight[rows])
        q = F.pad(q, (0, 0, 0, (last - first) * LANES - len(q))).view(last - first, LANES, groups, GROUP)
        scales = F.pad(scales.float(), (0, 0, 0, (last - first) * LANES - len(scales))).view(last - first, LANES, groups)
        order = q.view(last - first, LANES, groups, GROUP // 4, 4).permute(0, 2, 3, 1, 4) if tiles else \
            q.permute(0, 2, 3, 1)
        packed[first:last, :, :GROUP * LANES] = order.reshape(last - first, groups, GROUP * LANES)
        packed[first:last, :, GROUP * LANES:] = scales.transpose(1, 2).contiguous().view(torch.int8)
    return packed.view(panels, groups, 16, -1) if tiles else packed


def unpack_int8(packed: torch.Tensor, out: int, inner: int) -> torch.Tensor:
    """The float32 weight [out, inner] that :func:`pack_int8`'s tensor holds (its int8 values times their scales)."""
    panels, groups = packed.shape[:2]
    tiles, packed = packed.dim() == 4, packed.reshape(panels, groups, -1)
    q = packed[..., :GROUP * LANES].reshape(panels, groups, GROUP, LANES).float() if not tiles else \
        packed[..., :GROUP * LANES].reshape(panels, groups, GROUP // 4, LANES, 4).transpose(3, 4).reshape(
            panels, groups, GROUP, LANES).float()
    scales = packed[..., GROUP * LANES:].contiguous().view(torch.float32)  # [panels, groups, 16]
    w = (q * scales[:, :, None, :]).permute(0, 3, 1, 2).reshape(panels * LANES, groups * GROUP)
    return w[:out, :inner]


@dataclass
class Int4Weight:
    """A linear layer's weight in 4 bits, as a stored model holds it (GGUF's Q4_0, Q4_1 and Q4_K kept at
    import, or quantized at import) or as ``quantization: int4`` makes it: per GROUP inner elements of a
    feature, unsigned values q in 0..15 with a float32 scale d and offset m, w = d q + m (Q4_0's symmetric
    blocks have m = -8 d). ``q``: [out, in / 2] uint8, element 2i in the low nibble of byte i, 2i + 1 in
    its high one; ``scales`` and ``mins``: [out, groups] float32."""

    q: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.q.shape[0], 2 * self.q.shape[1]))

    @classmethod
    def of(cls, weight: torch.Tensor) -> Int4Weight:
        """``weight`` [out, in] in 4 bits: per group, its range [min, max] in 15 steps."""
        out, inner = weight.shape
        groups = -(-inner // GROUP)
        w = F.pad(weight.float(), (0, groups * GROUP - inner)).view(out, groups, GROUP)
        low, high = w.amin(dim=-1), w.amax(dim=-1)
        scales = (high - low) / 15
        q = ((w - low[..., None]) / scales.clamp(min=1e-30)[..., None]).round_().clamp_(0, 15).to(torch.uint8)
        return cls(pair_nibbles(q.view(out, -1)), scales, low, weight.dtype)

    @classmethod
    def cat(cls, weights: list[Int4Weight]) -> Int4Weight:
        return cls(*(torch.cat([getattr(w, f) for w in weights]) for f in ("q", "scales", "mins")), weights[0].dtype)

    def values(self) -> torch.Tensor:
        """q unpaired: [out, in] uint8."""
        return torch.stack([self.q & 15, self.q >> 4], dim=-1).view(self.q.shape[0], -1)

    def dequantize(self) -> torch.Tensor:
        out, groups = self.scales.shape
        w = self.values().view(out, groups, GROUP).float() * self.scales[..., None].float() + self.mins[..., None].float()
        return w.view(out, -1).to(self.dtype)


QUANTIZED = (Int8Weight, Int4Weight)  # the weights stored models hold quantized


def int4_runs(dtype: torch.dtype) -> bool:
    """Whether ``int4_linear`` runs a model of ``dtype`` here: in bfloat16, on AMX, AVX-512 VNNI or AVX2
    (:func:`quantized_rows`; elsewhere 4-bit weights run in int8)."""
    return dtype == torch.bfloat16 and quantized_rows()


def pair_nibbles(values: torch.Tensor) -> torch.Tensor:
    """uint8 values in 0..15 [..., 2n] as [..., n] bytes: element 2i in the low nibble, 2i + 1 the high
    (a tensor, or a numpy array: the GGUF import's)."""
    return values[..., 0::2] | (values[..., 1::2] << 4)


GROUP4_BYTES = GROUP * LANES // 2 + 8 * LANES  # int4_linear's bytes per panel and group: weights, scales, offsets


def pack_int4(weight: Int4Weight) -> torch.Tensor:
    """``weight`` for ``int4_linear`` (bfloat16 models, :func:`int4_runs`), zero-padded to panels of ``LANES`` features:
    uint8 [panels, groups, 384]. Per panel and group, 256 bytes of weights, whose low nibbles are the 512
    values of the first half of AMX's B tile (inner quad j's 16 features at 64 j, each feature's 4
    elements side by side) and whose high nibbles its second half; then the 16 features' scales and
    their offsets (float32, as bytes)."""
    out, inner = weight.shape
    panels, groups = -(-out // LANES), inner // GROUP
    pad = panels * LANES - out
    q = F.pad(weight.values(), (0, 0, 0, pad)).view(panels, LANES, groups, GROUP // 4, 4).permute(0, 2, 3, 1, 4)
    q = q.reshape(panels, groups, 2, GROUP * LANES // 2)
    packed = torch.empty(panels, groups, GROUP4_BYTES, dtype=torch.uint8)
    packed[..., :GROUP * LANES // 2] = q[:, :, 0] | (q[:, :, 1] << 4)
    for i, part in enumerate((weight.scales, weight.mins)):
        part = F.pad(part.float(), (0, 0, 0, pad)).view(panels, LANES, groups).transpose(1, 2).contiguous()
        packed[..., GROUP * LANES // 2 + 64 * i:GROUP * LANES // 2 + 64 * (i + 1)] = part.view(torch.uint8)
    return packed


def unpack_int4(packed: torch.Tensor, out: int, inner: int) -> torch.Tensor:
    """The float32 weight [out, inner] that :func:`pack_int4`'s tensor holds."""
    panels, groups = packed.shape[:2]
    half = GROUP * LANES // 2
    q = torch.stack([packed[..., :half] & 15, packed[..., :half] >> 4], dim=2)  # [panels, groups, 2, 256]
    q = q.view(panels, groups, GROUP // 4, LANES, 4).permute(0, 3, 1, 2, 4).reshape(panels, LANES, groups, GROUP)
    scales, mins = (packed[..., half + 64 * i:half + 64 * (i + 1)].contiguous().view(torch.float32).transpose(1, 2)
                    for i in (0, 1))  # [panels, 16, groups]
    w = q.float() * scales[..., None] + mins[..., None]
    return w.reshape(panels * LANES, groups * GROUP)[:out, :inner]


def pad_bias(bias: torch.Tensor | None, out: int) -> torch.Tensor | None:
    """The bias as the kernels take it: float32, padded to whole panels."""
    if bias is None:
        return None
    return F.pad(bias.float(), (0, -(-out // PANEL) * PANEL - out)).contiguous()


def linear(x: torch.Tensor, packed: torch.Tensor, out: int, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` on the kernel that ``W``'s layout (:func:`pack`, :func:`pack_int8`) is for."""
    if packed.dtype == torch.int8:
        return torch.ops.bentochat.int8_linear(x, packed, out, bias)
    if packed.dtype == torch.uint8:
        return torch.ops.bentochat.int4_linear(x, packed, out, bias)
    kernels = {6: torch.ops.bentochat.amx_linear, 4: torch.ops.bentochat.bf16_linear, 3: torch.ops.bentochat.f32_linear}
    return kernels[packed.dim()](x, packed, out, bias)


def main(args: list[str]) -> int:
    """``python -m runners.engine.native [--optional]``: see native_build's docstring."""
    optional = "--optional" in args
    if platform.machine().lower() not in ("x86_64", "amd64"):
        print(f"BentoChat's native kernels are for x86-64 CPUs with AVX2: none built on {platform.machine()}")
        return 0
    if optional and level_here() is None:
        print("BentoChat's native kernels: not built, this CPU has no AVX2 and FMA "
              "(`python -m runners.engine.native` builds them for other machines)")
        return 0
    if optional and native_build.compiler() is None:
        print("BentoChat's native kernels: not built, this machine has no C++ compiler (c++)")
        return 0
    for level in LEVELS:
        started = time.monotonic()
        try:
            path = native_build.build(level)
        except Exception as e:
            print(f"BentoChat's native kernels: the {level} level's build failed: {e}", file=sys.stderr)
            return 0 if optional else 1
        print(f"{path}: {path.stat().st_size / 1e6:.1f} MB, {time.monotonic() - started:.0f} s")
    if ops() is None:
        print("BentoChat's native kernels: not used on this machine")
    else:
        bf16 = "AMX" if amx() else "AVX2" if _level == "avx2" else "AVX-512 BF16" if runs(torch.bfloat16) else None
        rows = "AMX" if amx() else "AVX2" if _level == "avx2" else "AVX-512 VNNI"
        print("BentoChat's native kernels: float32" + (f", bfloat16 on {bf16}" if bf16 else " (bfloat16 on oneDNN)")
              + ", int8 weights"
              + (f" and 4 bits (bfloat16 rows quantized, on {rows})" if quantized_rows() else ""))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main(sys.argv[1:]))
