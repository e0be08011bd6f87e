"""BentoChat's bfloat16 matmul on Intel AMX (``kernels/amx_linear.cpp``), built with torch's C++
extension loader on first use (about 20 s, once per machine: ``make install`` builds it ahead) and
used by the lean forward's :class:`~runners.engine.lean.Linear` on CPUs with AMX.

Why a kernel of our own: a row gets the same result alone and in any batch by construction (oneDNN's
bfloat16 kernels change some rows' sums past 32 rows on these CPUs), and on the 2-core development
machine it multiplies 1.3x to 2.4x faster than oneDNN's packed bfloat16 at batch 1 to 64, on one
thread and on two (see README, Performance). Its panels are split over torch's threads with OpenMP
(``-fopenmp``: without it ATen's ``parallel_for`` runs on one thread). Where the CPU has no AMX, the
compiler is missing or the build fails, :func:`ops` is None and the lean forward keeps oneDNN.

``python -m runners.engine.amx`` builds it and says whether it runs here.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger("bentochat.engine")

KERNELS = Path(__file__).parent / "kernels"
SOURCES = [KERNELS / "amx_linear.cpp", KERNELS / "forward.cpp"]
PANEL, CHUNK = 64, 32  # output features per panel and inner elements per chunk, as in the kernel
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16"]

_ops: object | None = None
_tried = False


def cpu_has_amx() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"amx_tile", "amx_bf16", "avx512_bf16"} <= set(flags.split())


# A build lock older than this was left by a process killed while it built (a build takes about 20 s).
STALE_LOCK_SECONDS = 300


def build_directory() -> Path:
    """Where the kernel is built: ``bentochat_amx`` under torch's extension root (``TORCH_EXTENSIONS_DIR``,
    by default ``~/.cache/torch_extensions``)."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root()) / "bentochat_amx"


def clear_stale_lock(directory: Path) -> None:
    """Remove the build lock a killed build left behind: torch's loader waits for it to go, for ever."""
    lock = directory / "lock"
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            logger.warning("removing %s, left by a build that did not finish", lock)
            lock.unlink()
    except FileNotFoundError:
        pass


def ops():
    """``torch.ops.bentochat`` with ``amx_linear``, built and loaded on first call; None where this
    CPU or machine cannot run it (the reason is logged once)."""
    global _ops, _tried
    if _tried:
        return _ops
    _tried = True
    if not cpu_has_amx():
        return None
    if shutil.which("c++") is None:
        logger.warning("the AMX matmul needs a C++ compiler (c++), which this machine lacks: oneDNN's kernels instead")
        return None
    try:
        from torch.utils.cpp_extension import load

        logger.info("loading BentoChat's AMX matmul (a first build takes about 20 s)")
        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        clear_stale_lock(directory)
        load("bentochat_amx", [str(s) for s in SOURCES], extra_cflags=FLAGS, extra_include_paths=[str(KERNELS)], extra_ldflags=["-fopenmp"],
             build_directory=str(directory), is_python_module=False)
        if not torch.ops.bentochat.amx_available():
            raise RuntimeError("the kernel refused AMX's tile state (arch_prctl)")
    except Exception as e:  # a failed build or load leaves oneDNN's kernels, which give the same answers
        logger.warning("BentoChat's AMX matmul is not used: %s", e)
        return None
    _ops = torch.ops.bentochat
    return _ops


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] in the kernel's layout: panels of 64 output features, chunks of 32 inner
    elements, each chunk four B tiles of 16 features by 16 inner pairs (zero-padded)."""
    out, inner = weight.shape
    panels, chunks = -(-out // PANEL), -(-inner // CHUNK)
    w = F.pad(weight.to(torch.bfloat16), (0, chunks * CHUNK - inner, 0, panels * PANEL - out))
    # [p, j, o, kc, pair, e] (feature p*64 + j*16 + o, inner kc*32 + 2*pair + e) -> [p, kc, j, pair, o, e]
    return w.view(panels, 4, 16, chunks, 16, 2).permute(0, 3, 1, 4, 2, 5).contiguous()


def pad_bias(bias: torch.Tensor | None, out: int) -> torch.Tensor | None:
    """The bias as the kernel takes it: float32, padded to whole panels."""
    if bias is None:
        return None
    return F.pad(bias.float(), (0, -(-out // PANEL) * PANEL - out)).contiguous()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print("AMX matmul:", "ready" if ops() is not None else "not used on this machine")
