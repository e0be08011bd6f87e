"""BentoChat's own matmuls (runners/engine/native.py): bfloat16 on AMX or on AVX-512 BF16 (what a CPU
without AMX runs, forced here where there is AMX) or on AVX2 (a CPU without AVX-512), float32 on AVX-512 or AVX2, and int8 weights (a float32 scale
per 32 inner elements) for bfloat16 and float32 models, each with the same bits for a row alone and in a
batch of any size, on one thread and on two, close to the exact product, with a bias and with shapes that
do not fill its panels; and int8 and 4-bit weights times x quantized with AVX-512 VNNI (what a CPU without
AMX runs, AMX masked off where there is AMX) and on AVX2 (AVX-512 masked off), with the higher levels' bits.
Skipped where the CPU lacks them.
(tests/test_lean.py checks the native forward pass built on them.)"""


import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from runners.engine import native
from runners.engine.linear import Linear

pytestmark = pytest.mark.skipif(native.ops() is None, reason="no native kernels on this machine (CPU or compiler)")
amx = pytest.mark.skipif(not native.amx(), reason="no AMX on this CPU")
SHAPES = [(960, 576, False), (576, 1536, True), (100, 70, True), (49, 33, False)]


@pytest.fixture(params=[pytest.param("bfloat16 on AMX", marks=amx),
                        pytest.param("bfloat16 on AVX-512 BF16", marks=pytest.mark.skipif(
                            not native.cpu_has_avx512_bf16(), reason="no AVX-512 BF16 on this CPU")),
                        pytest.param("bfloat16 on AVX2", marks=pytest.mark.skipif(
                            native.level() != "avx2", reason="this CPU has AVX-512: the avx2 level's bfloat16 is "
                                                             "checked in tests/test_native_build.py")),
                        "float32"])
def dtype(request, monkeypatch):
    """The dtype of a kernel, with AMX out of the way for the AVX-512 BF16 one."""
    if request.param == "bfloat16 on AVX-512 BF16":
        monkeypatch.setattr(native, "amx", lambda: False)
    return torch.float32 if request.param == "float32" else torch.bfloat16


@pytest.mark.parametrize("out,inner,bias", SHAPES)
def test_a_row_gets_the_same_bits_in_any_batch_and_close_to_the_exact_product(dtype, out, inner, bias):
    generator = torch.Generator().manual_seed(out)
    weight = (torch.randn(out, inner, generator=generator) * 0.05).to(dtype)
    b = torch.randn(out, generator=generator).to(dtype) if bias else None
    x = torch.randn(70, inner, generator=generator).to(dtype)
    linear = Linear(weight, b, own=True)
    assert linear.own.dim() == (3 if dtype == torch.float32 else 6 if native.amx() else 4)  # the kernel's layout
    alone = torch.cat([linear(x[j:j + 1]) for j in range(len(x))])
    for m in (2, 5, 6, 7, 15, 16, 17, 32, 33, 64, 70):
        assert torch.equal(linear(x[:m]), alone[:m]), m
    exact = x.double() @ weight.double().T + (b.double() if bias else 0)
    if dtype == torch.bfloat16:  # float32 sums in another order, then one rounding to bfloat16: within 2 ulps
        assert torch.allclose(alone.double(), exact, rtol=2 ** -7, atol=1e-2)
    else:  # float32 sums of up to 1536 products
        assert torch.allclose(alone.double(), exact, rtol=1e-5, atol=1e-5)
    assert linear(x[:5].view(1, 5, inner)).shape == (1, 5, out)  # any leading dimensions


def test_no_rows(dtype):
    linear = Linear(torch.randn(64, 32).to(dtype), own=True)
    assert linear(torch.zeros(0, 32, dtype=dtype)).shape == (0, 64)


def test_other_dtypes_keep_their_kernels():
    assert Linear(torch.randn(64, 32).half(), own=True).own is None
    assert Linear(torch.randn(64, 32).half(), int8=True, own=True).own is None  # torch's int8 matmul
    assert Linear(torch.randn(64, 32)).own is None  # not asked for
    assert Linear(torch.randn(64, 32), int8=True).own is None


INT8_DTYPES = [pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not native.runs(torch.bfloat16),
                                                                     reason="no native bfloat16 on this CPU")),
               torch.float32]


def as_multiplied(x: torch.Tensor, linear: Linear) -> torch.Tensor:
    """x as int8_linear and int4_linear multiply it: as it is (int8 weights alone), or (a bfloat16 model's on AMX,
    AVX-512 VNNI or AVX2) quantized."""
    return x if linear.own.dtype == torch.int8 and linear.own.dim() == 3 else quantized(x)


def quantized(x: torch.Tensor) -> torch.Tensor:
    """x quantized as the int8 weights are, a scale per 32 of each row, in the kernels' float32 maths (times
    1 / scale)."""
    inner = x.shape[-1]
    groups = F.pad(x.float().reshape(-1, inner), (0, -inner % 32)).view(-1, -(-inner // 32), 32)
    scale = groups.abs().amax(-1, keepdim=True) / 127
    q = (groups * torch.where(scale > 0, 1 / scale, 0)).round().clamp(-127, 127)
    return (q * scale).view(len(groups), -1)[:, :inner].view(x.shape)


@pytest.mark.parametrize("dtype", INT8_DTYPES)
@pytest.mark.parametrize("out,inner,bias", SHAPES)
def test_int8_weights_quantized_per_group_and_multiplied_as_the_dequantized_weights(dtype, out, inner, bias):
    """int8_linear: each weight within half its group's scale (absmax / 127 of 32 inner elements) of the
    original; the product that of the dequantized weights (on AMX, by x quantized alike), summed exactly
    (float64), within float32's rounding (and bfloat16's once at the end); any batch."""
    generator = torch.Generator().manual_seed(out)
    weight = (torch.randn(out, inner, generator=generator) * 0.05).to(dtype)
    weight[0, :min(inner, 32)] = 0  # a group of zeros
    b = torch.randn(out, generator=generator).to(dtype) if bias else None
    x = torch.randn(70, inner, generator=generator).to(dtype)
    linear = Linear(weight, b, int8=True, own=True)
    assert linear.own.dtype == torch.int8 and linear.own.shape[:2] == (-(-out // 16), -(-inner // 32))
    assert linear.own[0, 0].numel() == 576  # per panel and group: 512 weights, 16 float32 scales
    assert (linear.own.dim() == 4) == (dtype == torch.bfloat16 and native.quantized_rows())  # (x quantized: the tiles' order)
    dequantized = native.unpack_int8(linear.own, out, inner).double()
    groups = F.pad(weight.double().abs(), (0, -inner % 32)).view(out, -1, 32).amax(-1)
    scale = groups.repeat_interleave(32, dim=1)[:, :inner] / 127
    assert ((dequantized - weight.double()).abs() <= scale / 2 * 1.001 + 1e-12).all()  # (float32 scales)
    assert torch.equal(dequantized[0, :min(inner, 32)], torch.zeros(min(inner, 32), dtype=torch.float64))
    exact = as_multiplied(x, linear).double() @ dequantized.T + (b.double() if bias else 0)
    y = linear(x)
    assert y.dtype == dtype
    if dtype == torch.bfloat16:
        assert torch.allclose(y.double(), exact, rtol=2 ** -7, atol=1e-2)
    else:
        assert torch.allclose(y.double(), exact, rtol=1e-5, atol=1e-5)
    assert linear(x[:5].view(1, 5, inner)).shape == (1, 5, out)
    assert linear(torch.zeros(0, inner, dtype=dtype)).shape == (0, out)


@pytest.mark.skipif(not native.int4_runs(torch.bfloat16), reason="int4_linear runs on AMX, AVX-512 VNNI or AVX2")
@pytest.mark.parametrize("out,inner,bias", SHAPES)
def test_int4_weights_multiplied_as_the_dequantized_weights_and_a_row_alike_in_any_batch(out, inner, bias):
    """int4_linear (bfloat16): each weight within half a step of its group's range in 15 steps; the
    product that of the dequantized weights by x quantized as int8_linear's, within bfloat16's
    rounding; a row the same bits alone and in batches of any size, on one thread and two."""
    generator = torch.Generator().manual_seed(out)
    weight = (torch.randn(out, inner, generator=generator) * 0.05).bfloat16()
    b = torch.randn(out, generator=generator).bfloat16() if bias else None
    x = torch.randn(40, inner, generator=generator).bfloat16()
    linear = Linear(weight, b, int4=True, own=True)
    assert linear.own.dtype == torch.uint8 and linear.own.shape == (-(-out // 16), -(-inner // 32), 384)
    dequantized = native.unpack_int4(linear.own, out, inner).double()
    groups = F.pad(weight.double(), (0, -inner % 32)).view(out, -1, 32)
    step = (groups.amax(-1) - groups.amin(-1)).repeat_interleave(32, dim=1)[:, :inner] / 15
    assert ((dequantized - weight.double()).abs() <= step / 2 * 1.001 + 1e-6).all()
    exact = as_multiplied(x, linear).double() @ dequantized.T + (b.double() if bias else 0)
    y = linear(x)
    assert y.dtype == torch.bfloat16 and torch.allclose(y.double(), exact, rtol=2 ** -7, atol=1e-2)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert all(torch.equal(linear(x[j:j + 1])[0], y[j]) for j in range(len(x)))
            assert all(torch.equal(linear(x[:m]), y[:m]) for m in (2, 16, 17, 33))
    finally:
        torch.set_num_threads(threads)


def test_int4_elsewhere_runs_in_int8():
    """Where int4_linear does not run (a float32 model; AVX-512 without VNNI), 4 bits run in int8."""
    weight = torch.randn(64, 64)
    assert Linear(weight, int4=True, own=True).own.dtype == torch.int8
    stored = native.Int4Weight.of(weight)
    linear = Linear(stored, own=True)
    assert linear.own.dtype == torch.int8
    assert torch.equal(native.unpack_int8(linear.own, 64, 64), native.Int8Weight.of(stored.dequantize()).dequantize())


@pytest.mark.parametrize("dtype", INT8_DTYPES)
def test_int8_a_row_gets_the_same_bits_alone_and_in_batches_of_1_to_40_on_one_and_two_threads(dtype):
    """Whatever rows share the weights' conversions (blocks of up to 6 rows, 2 or 4 panels at once) and
    whichever thread computes a panel, each row's sums run in one order."""
    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(1000, 600, generator=generator) * 0.05).to(dtype)  # (a panel and a group not full)
    b = torch.randn(1000, generator=generator).to(dtype)
    x = torch.randn(40, 600, generator=generator).to(dtype)
    linear, threads = Linear(weight, b, int8=True, own=True), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([linear(x[j:j + 1]) for j in range(len(x))])
        for t in (1, 2):
            torch.set_num_threads(t)
            for m in range(1, 41):
                assert torch.equal(linear(x[:m]), alone[:m]), (t, m)
            assert torch.equal(linear(x[7:19]), alone[7:19])  # (rows in other places of their blocks)
    finally:
        torch.set_num_threads(threads)


@amx
def test_up_to_32_rows_the_same_bits_as_onednn():
    """What oneDNN's packed bfloat16 kernels give where they are batch-invariant, up to 32 rows and an
    inner dimension of 1024 (a longer one is multiplied in blocks on oneDNN's path, each block's sum
    rounded to bfloat16): there the AMX matmul changes no bit."""
    generator = torch.Generator().manual_seed(1)
    for out, inner in [(960, 576), (576, 1024)]:
        weight = (torch.randn(out, inner, generator=generator) * 0.05).bfloat16()
        x = torch.randn(32, inner, generator=generator).bfloat16()
        onednn = Linear(weight)
        assert onednn.packed
        for m in (1, 7, 32):
            assert torch.equal(Linear(weight, own=True)(x[:m]), onednn(x[:m])), (out, inner, m)


def test_the_same_bits_on_one_thread_and_on_every_core(dtype):
    """The kernels split their panels over torch's threads (OpenMP), each thread with its own tiles: the
    split changes no output."""
    generator = torch.Generator().manual_seed(2)
    weight = (torch.randn(3072, 576, generator=generator) * 0.05).to(dtype)
    x = torch.randn(40, 576, generator=generator).to(dtype)
    linear, threads = Linear(weight, own=True), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [linear(x[:m]) for m in (1, 17, 40)]
        torch.set_num_threads(max(2, threads))
        assert all(torch.equal(linear(x[:m]), y) for m, y in zip((1, 17, 40), one))
    finally:
        torch.set_num_threads(threads)



# Runs int8_linear and int4_linear as a CPU of argv[3]'s level would (BENTOCHAT_CPU_FLAGS): the weights and rows
# of argv[1]'s cases, each row alone, in batches of several sizes, on one thread and two; saves (packed weight, y).
QUANTIZED_RUN = """
import sys, torch
from runners.engine import native
from runners.engine.linear import Linear
assert native.quantized_rows() and native._level == sys.argv[3] and not native.amx(), native._level
results = []
for weight, b, x in torch.load(sys.argv[1]):
    for options in ({"int8": True}, {"int4": True}):
        linear = Linear(weight, b, own=True, **options)
        y = linear(x)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert all(torch.equal(linear(x[j:j + 1])[0], y[j]) for j in range(len(x)))
            assert all(torch.equal(linear(x[:m]), y[:m]) for m in (2, 3, 5, 6, 7, 8, 13, 33))
        results.append((linear.own, y))
torch.save(results, sys.argv[2])
"""


AMX = {"amx_tile", "amx_bf16", "amx_int8"}
QUANTIZED_ROWS_LEVELS = [  # (level, the CPU flags it needs, the flags masked off to run it)
    pytest.param("avx512-bf16", {"avx512_bf16", "avx512_vnni"}, AMX, id="AVX-512 VNNI"),
    pytest.param("avx2", {"avx2", "fma", "f16c"}, {"avx512f"}, id="AVX2"),
]


@pytest.mark.parametrize("level,needs,masked", QUANTIZED_ROWS_LEVELS)
def test_int8_and_int4_weights_times_x_quantized_close_to_the_float_product_and_with_higher_levels_bits(
        tmp_path, level, needs, masked):
    """A CPU without AMX (VPDPBUSD on AVX-512 VNNI), or without AVX-512 (VPMADDUBSW on AVX2), here this CPU with
    those masked off in a process of its own, multiplies a bfloat16 model's int8 and 4-bit weights by x quantized
    per 32: within float32's and bfloat16's rounding of the exact product of the dequantized weights by x
    quantized; within the quantization's error of the float product; a row the same bits alone and in any batch,
    on one thread and two; and the same bits as this CPU's own level, where that is a higher one (AMX's tiles,
    VNNI)."""
    if not needs <= native.cpu_flags():
        pytest.skip(f"no {level} on this CPU")
    generator = torch.Generator().manual_seed(4)
    cases = []
    for out, inner, bias in SHAPES:
        weight = (torch.randn(out, inner, generator=generator) * 0.05).bfloat16()
        b = torch.randn(out, generator=generator).bfloat16() if bias else None
        cases.append((weight, b, torch.randn(40, inner, generator=generator).bfloat16()))
    torch.save(cases, tmp_path / "cases.pt")
    flags = " ".join(native.cpu_flags() - masked)
    done = subprocess.run([sys.executable, "-c", QUANTIZED_RUN, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt"),
                           level],
                          cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "BENTOCHAT_CPU_FLAGS": flags})
    assert done.returncode == 0, done.stderr
    results = iter(torch.load(tmp_path / "out.pt"))
    for weight, b, x in cases:
        out, inner = weight.shape
        for four, error in ((False, 0.02), (True, 0.15)):
            own, y = next(results)
            assert own.dtype == torch.uint8 if four else own.dtype == torch.int8 and own.dim() == 4
            dequantized = (native.unpack_int4 if four else native.unpack_int8)(own, out, inner).double()
            bias = b.double() if b is not None else 0
            exact = quantized(x).double() @ dequantized.T + bias
            assert torch.allclose(y.double(), exact, rtol=2 ** -7, atol=1e-2)
            product = x.double() @ weight.double().T
            assert (y.double() - bias - product).norm() <= error * product.norm(), (out, inner, four)
            if native.quantized_rows() and native.level() != level:
                assert torch.equal(Linear(weight, b, own=True, int4=four, int8=not four)(x), y)
