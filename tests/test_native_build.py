"""BentoChat's native kernels built ahead of time (runners/engine/native_build.py): one library per level,
loaded with no compiler on the machine; the highest level the CPU runs picked, and each fallback logged (a
CPU without AVX2, AVX-512, AVX-512 BF16 and VNNI, or AMX, a library built for another torch, none and no compiler,
a build that fails); a level's library holds no instruction above it; the build command fails loudly unless
``--optional``. Each case runs in a process of its own (a library, once loaded, stays)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runners.engine import native, native_build

ROOT = Path(__file__).resolve().parent.parent
HERE = native.level_here()
pytestmark = pytest.mark.skipif(HERE is None, reason="this CPU has no AVX2 and FMA")
avx512 = pytest.mark.skipif(HERE not in ("avx512", "avx512-bf16", "amx"), reason="this CPU has no AVX-512")

# Runs the kernels as the engine would, and says what it ran.
PROBE = """
import logging, torch
logging.basicConfig(level=logging.INFO, format="%(message)s")
from runners.engine import native
assert native.ops() is not None
x, w = torch.randn(5, 70), torch.randn(40, 70) * 0.1
assert torch.allclose(native.linear(x, native.pack(w), 40, None), x @ w.T, atol=1e-4)
if native.runs(torch.bfloat16):
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.allclose(native.linear(xb, native.pack(wb), 40, None).float(), (xb.float() @ wb.float().T), atol=0.1)
print("RAN", native._level, native.amx(), native.runs(torch.bfloat16))
"""


def run(code: str, env: dict, args: tuple = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *(("-c", code) if code else ()), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800, env={**os.environ, **env})


@pytest.fixture(scope="module")
def libraries() -> Path:
    """Every level's library, built as ``make install`` and an image's builder do (kept where already built)."""
    if native_build.compiler() is None and not all(
            (native_build.directory() / native_build.library_name(level)).is_file() for level in native_build.LEVELS):
        pytest.skip("no libraries built and no compiler")
    done = run("", {}, ("-m", "runners.engine.native"))
    assert done.returncode == 0, done.stderr
    return native_build.directory()


def flags_without(*names: str) -> str:
    return " ".join(native.cpu_flags() - set(names))


def test_the_library_is_loaded_with_no_compiler_on_the_machine_and_its_kernels_run(libraries):
    done = run(PROBE, {"PATH": "/nonexistent", "BENTOCHAT_KERNELS_DIR": str(libraries)})
    assert done.returncode == 0, done.stderr
    assert f"the {HERE} level, {libraries / native_build.library_name(HERE)}" in done.stderr
    assert "building" not in done.stderr and "RAN " + HERE in done.stdout


@pytest.mark.skipif(HERE != "amx", reason="this CPU has no AMX")
def test_a_cpu_without_amx_gets_the_avx512_bf16_level_and_the_log_says_so(libraries):
    done = run(PROBE, {"PATH": "/nonexistent", "BENTOCHAT_KERNELS_DIR": str(libraries),
                       "BENTOCHAT_CPU_FLAGS": flags_without("amx_tile", "amx_bf16", "amx_int8")})
    assert done.returncode == 0, done.stderr
    assert "no AMX on this CPU: the avx512-bf16 level" in done.stderr
    assert "RAN avx512-bf16 False True" in done.stdout  # bfloat16 on AVX-512 BF16, no tiles


@avx512
def test_a_cpu_without_avx512_bf16_gets_the_avx512_level_whose_library_refuses_bfloat16(libraries):
    code = PROBE + """
try:
    torch.ops.bentochat.bf16_linear(torch.zeros(1, 2, dtype=torch.bfloat16), torch.zeros(1, 1, 16, 2, dtype=torch.bfloat16), 16, None)
except RuntimeError as e:
    print("REFUSED", e)
"""
    done = run(code, {"PATH": "/nonexistent", "BENTOCHAT_KERNELS_DIR": str(libraries),
                      "BENTOCHAT_CPU_FLAGS": flags_without("avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")})
    assert done.returncode == 0, done.stderr
    assert "no AVX-512 BF16 and VNNI on this CPU: the avx512 level (it lacks avx512_bf16)" in done.stderr
    assert "RAN avx512 False False" in done.stdout  # float32 only: bfloat16 stays on oneDNN
    assert "REFUSED bf16_linear: this library is built without AVX-512 BF16" in done.stdout


@avx512
def test_a_cpu_with_avx512_bf16_but_no_vnni_gets_the_avx512_level_whose_int8_keeps_x_as_it_is(libraries):
    code = PROBE + """
from runners.engine.linear import Linear
print("INT8", native.quantized_rows(), Linear(torch.randn(40, 70), int8=True, own=True).own.dim())
"""
    done = run(code, {"PATH": "/nonexistent", "BENTOCHAT_KERNELS_DIR": str(libraries),
                      "BENTOCHAT_CPU_FLAGS": flags_without("avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")})
    assert done.returncode == 0, done.stderr
    assert "no AVX-512 BF16 and VNNI on this CPU: the avx512 level (it lacks avx512_vnni)" in done.stderr
    assert "RAN avx512 False False" in done.stdout and "INT8 False 3" in done.stdout  # the weight-only layout


def test_a_cpu_without_avx512_gets_the_avx2_level_whose_kernels_run_float32_bfloat16_and_int8_weights(libraries):
    """A CPU without AVX-512 runs the avx2 level: float32 and bfloat16 matmuls, a float32 model's int8 weights times
    x as it is and a bfloat16 model's times x quantized (VPMADDUBSW)."""
    code = PROBE + """
from runners.engine.linear import Linear
x, w = torch.randn(5, 70), torch.randn(40, 70) * 0.1
for dtype in (torch.float32, torch.bfloat16):
    linear = Linear(w.to(dtype), int8=True, own=True)
    exact = x.to(dtype).float() @ native.unpack_int8(linear.own, 40, 70).T
    assert torch.allclose(linear(x.to(dtype)).float(), exact, rtol=0.01, atol=0.02)
print("INT8", native.quantized_rows(), linear.own.dim())
"""
    done = run(code, {"PATH": "/nonexistent", "BENTOCHAT_KERNELS_DIR": str(libraries),
                      "BENTOCHAT_CPU_FLAGS": "fpu sse2 avx avx2 fma f16c"})
    assert done.returncode == 0, done.stderr
    assert "no AVX-512 on this CPU: the avx2 level (it lacks avx512bw avx512f avx512vl)" in done.stderr
    assert "RAN avx2 False True" in done.stdout  # float32, and bfloat16 widened to float32
    assert "INT8 True 4" in done.stdout  # (the bfloat16 model's, in the tiles' order)


def test_a_cpu_without_avx2_gets_no_native_kernels_and_the_log_says_so():
    done = run("from runners.engine import native; import logging; logging.basicConfig(level=logging.INFO); "
               "print('OPS', native.ops())", {"BENTOCHAT_CPU_FLAGS": "fpu sse2 avx"})
    assert "no AVX2 and FMA on this CPU: oneDNN's kernels and the Python pass instead" in done.stderr
    assert "OPS None" in done.stdout


@pytest.mark.skipif(shutil.which("objdump") is None, reason="no objdump")
def test_a_levels_library_holds_no_instruction_above_its_level(libraries):
    bf16 = ("vdpbf16ps", "vcvtneps2bf16", "vcvtne2ps2bf16", "vpdpbusd", "vpdpbusds", "vpdpwssd")
    amx = ("tileloadd", "tdpbf16ps", "tdpbssd", "tdpbsud", "ldtilecfg", "tilerelease", "tilezero", "tilestored")
    for level, above in (("avx2", bf16 + amx), ("avx512", bf16 + amx), ("avx512-bf16", amx), ("amx", ())):
        code = subprocess.run(["objdump", "-d", str(libraries / native_build.library_name(level))],
                              capture_output=True, text=True, check=True).stdout
        mnemonics = {line.split("\t")[2].split()[0] for line in code.splitlines() if line.count("\t") >= 2}
        assert not mnemonics & set(above), level
        assert (level == "avx2") == ("%zmm" not in code), level  # (AVX-512's registers)
        assert level != "amx" or {"tdpbf16ps", "vdpbf16ps"} <= mnemonics  # (the check sees them where they are)
        assert level in ("avx2", "avx512") or "vpdpbusd" in mnemonics  # (int8 and 4 bits on AVX-512 VNNI)


def test_a_library_built_for_another_torch_is_refused_and_the_log_says_why(libraries, tmp_path):
    name = native_build.library_name(HERE).replace(f"torch{torch.__version__}", "torch2.0.0")
    shutil.copy(libraries / native_build.library_name(HERE), tmp_path / name)
    done = run("from runners.engine import native; import logging; logging.basicConfig(level=logging.INFO); "
               "print('OPS', native.ops())", {"PATH": "/nonexistent", "BENTOCHAT_KERNELS_DIR": str(tmp_path)})
    assert f"{tmp_path / name} is built for another torch (2.0.0; this is {torch.__version__}): not loaded" in done.stderr
    assert f"no {HERE} library in {tmp_path} and no C++ compiler (c++) to build one" in done.stderr
    assert "OPS None" in done.stdout


def test_a_failed_build_fails_the_command_unless_optional_and_leaves_onednn_at_first_use(tmp_path):
    """A compiler that fails: the image's build stops; ``make install`` goes on; a runner keeps oneDNN."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "c++").write_text("#!/bin/sh\necho 'error: no such instruction' >&2\nexit 1\n")
    (bin_dir / "c++").chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "BENTOCHAT_KERNELS_DIR": str(tmp_path / "lib")}
    strict = run("", env, ("-m", "runners.engine.native"))
    assert strict.returncode == 1 and "the avx2 level's build failed" in strict.stderr
    assert "no such instruction" in strict.stderr
    optional = run("", env, ("-m", "runners.engine.native", "--optional"))
    assert optional.returncode == 0 and "build failed" in optional.stderr
    first_use = run("from runners.engine import native; import logging; logging.basicConfig(level=logging.INFO); "
                    "print('OPS', native.ops())", env)
    assert f"no {HERE} library in {tmp_path / 'lib'}: building it now" in first_use.stderr
    assert "BentoChat's native kernels are not used" in first_use.stderr and "OPS None" in first_use.stdout
    assert not list((tmp_path / "lib").glob("*.so"))


def test_optional_builds_nothing_on_a_cpu_without_avx2(tmp_path):
    done = run("", {"BENTOCHAT_CPU_FLAGS": "fpu sse2", "BENTOCHAT_KERNELS_DIR": str(tmp_path)},
               ("-m", "runners.engine.native", "--optional"))
    assert done.returncode == 0 and "not built, this CPU has no AVX2 and FMA" in done.stdout
    assert not list(tmp_path.iterdir())
