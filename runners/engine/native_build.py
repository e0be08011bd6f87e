"""BentoChat's native kernels (``kernels/``) built ahead of time: one shared library per instruction-set level
(as ggml builds one per CPU level), which :func:`runners.engine.native.ops` loads with ``torch.ops.load_library``,
the highest this CPU runs. Serving so needs no compiler, ninja, Python headers or write access.

- ``avx512``: AVX-512 F/BW/VL: float32, and the int8 matmul of float32 models (int8 weights only);
- ``avx512-bf16``: and AVX-512 BF16 and VNNI (AMD Zen 4, Intel Cooper Lake; every CPU with AVX-512 BF16 has
  VNNI): bfloat16 too, and a bfloat16 model's int8 and 4-bit weights times rows quantized alike (VPDPBUSD);
- ``amx``: and AMX (Intel Sapphire Rapids and later): bfloat16, int8 and 4 bits on AMX's tiles.

Each level is compiled with its own flags only, and ``kernels/kernels.h`` compiles out the code that needs
more: a library holds no instruction above its level, whatever the compiler chooses. A library is named
``bentochat-kernels_<level>_torch<torch's version>_<sources>.so`` (sources: a hash of the kernels' sources and
flags), and is loaded only by that torch, for those sources.

``python -m runners.engine.native`` builds every level (compiling needs no particular CPU: an image's builder
may not be its hosts) into ``$BENTOCHAT_KERNELS_DIR``, by default ``runners/engine/kernels/lib``, keeping those
already built, and exits 1 where a build fails (so that an image's build fails). With ``--optional`` (``make
install``) it builds only on a machine that runs them (AVX-512, a C++ compiler) and otherwise exits 0, saying
why. On other CPUs than x86-64 there is nothing to build.

The compiler is called directly (each source in parallel, then one link against torch's ``c10`` and
``torch_cpu``) rather than through torch's extension loader: the kernels are torch operators with no Python
module, so neither ninja nor Python's headers are needed, and the file is named as above.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

KERNELS = Path(__file__).parent / "kernels"
SOURCES = [KERNELS / name for name in ("amx_linear.cpp", "avx_linear.cpp", "int8_linear.cpp", "forward.cpp")]
# OpenMP: ATen's parallel_for, inlined into the kernels, runs on one thread without it.
COMMON = ["-O3", "-std=c++20", "-fPIC", "-fopenmp"]
_AVX512 = (["-mavx512f", "-mavx512bw", "-mavx512vl"], {"avx512f", "avx512bw", "avx512vl"})
_BF16 = (_AVX512[0] + ["-mavx512bf16", "-mavx512vnni"], _AVX512[1] | {"avx512_bf16", "avx512_vnni"})
# level: its compiler flags, the CPU flags it needs (as /proc/cpuinfo names them), what those are; lowest first
LEVELS = {
    "avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}, "AVX2 and FMA"),
    "avx512": (*_AVX512, "AVX-512"),
    "avx512-bf16": (*_BF16, "AVX-512 BF16 and VNNI"),
    "amx": (_BF16[0] + ["-mamx-tile", "-mamx-bf16", "-mamx-int8"], _BF16[1] | {"amx_tile", "amx_bf16", "amx_int8"},
            "AMX"),
}


def directory() -> Path:
    """Where the libraries are: ``$BENTOCHAT_KERNELS_DIR``, by default ``kernels/lib`` in the package."""
    return Path(os.environ.get("BENTOCHAT_KERNELS_DIR") or KERNELS / "lib")


def sources_hash() -> str:
    digest = hashlib.sha256(" ".join(COMMON + [flag for flags, _, _ in LEVELS.values() for flag in flags]).encode())
    for source in [KERNELS / "kernels.h", KERNELS / "simd.h", *SOURCES]:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:12]


def library_name(level: str) -> str:
    return f"bentochat-kernels_{level}_torch{torch.__version__}_{sources_hash()}.so"


def others(level: str) -> list[tuple[Path, str]]:
    """The libraries of ``level`` in :func:`directory` that this torch and these sources may not load, and why."""
    found = []
    for path in sorted(directory().glob(f"bentochat-kernels_{level}_*.so")):
        parts = path.stem.split("_")
        if path.name != library_name(level) and len(parts) == 4:
            version = parts[2].removeprefix("torch")
            found.append((path, f"built for another torch ({version}; this is {torch.__version__})"
                          if version != torch.__version__ else "built from other kernel sources"))
    return found


def compiler() -> str | None:
    return shutil.which("c++")


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed:\n{done.stderr[-4000:]}")


def build(level: str) -> Path:
    """The library of ``level`` in :func:`directory`, compiled unless it is there (any other of that level, left
    by other sources or another torch, removed). A lock on the directory makes concurrent builds (runners
    starting together) one; the system drops it with its process, however that ends."""
    from torch.utils.cpp_extension import include_paths, library_paths

    into = directory()
    into.mkdir(parents=True, exist_ok=True)
    path = into / library_name(level)
    with open(into / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():
            return path
        cxx = compiler() or "c++"
        flags = [*COMMON, *LEVELS[level][0], f"-I{KERNELS}", *(f"-isystem{p}" for p in include_paths())]
        with tempfile.TemporaryDirectory(dir=into) as tmp:
            objects = [str(Path(tmp) / f"{source.stem}.o") for source in SOURCES]
            with ThreadPoolExecutor(len(SOURCES)) as pool:
                list(pool.map(lambda s, o: _run([cxx, *flags, "-c", str(s), "-o", o]), SOURCES, objects))
            linked = Path(tmp) / path.name
            _run([cxx, "-shared", "-fopenmp", *objects, *(f"-L{p}" for p in library_paths()), "-lc10", "-ltorch_cpu",
                  "-o", str(linked)])
            os.replace(linked, path)
        for old, _ in others(level):
            old.unlink(missing_ok=True)
    return path

