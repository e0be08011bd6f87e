"""BentoChat's own matmuls (runners/engine/native.py): bfloat16 on AMX or on AVX-512 BF16 (what a CPU
without AMX runs, forced here where there is AMX), and float32 on AVX-512, each with the same bits for a
row alone and in a batch of any size, on one thread and on two, close to the exact product, with a bias
and with shapes that do not fill its panels. Skipped where the CPU lacks them. (tests/test_lean.py checks
the native forward pass built on them.)"""

import os
import time

import pytest
import torch

from runners.engine import native
from runners.engine.linear import Linear

pytestmark = pytest.mark.skipif(native.ops() is None, reason="no native kernels on this machine (CPU or compiler)")
amx = pytest.mark.skipif(not native.amx(), reason="no AMX on this CPU")
SHAPES = [(960, 576, False), (576, 1536, True), (100, 70, True), (49, 33, False)]


@pytest.fixture(params=[pytest.param("bfloat16 on AMX", marks=amx),
                        pytest.param("bfloat16 on AVX-512 BF16", marks=pytest.mark.skipif(
                            not native.cpu_has_avx512_bf16(), reason="no AVX-512 BF16 on this CPU")),
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


def test_int8_and_other_dtypes_keep_their_kernels():
    assert Linear(torch.randn(64, 32).bfloat16(), int8=True, own=True).own is None
    assert Linear(torch.randn(64, 32).half(), own=True).own is None
    assert Linear(torch.randn(64, 32)).own is None  # not asked for


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


def test_a_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path):
    """torch's extension loader waits for ever while its build lock exists; a build killed halfway
    (a runner stopped during its first start) leaves one."""
    lock = tmp_path / "lock"
    lock.touch()
    native.clear_stale_lock(tmp_path)
    assert lock.exists()  # another process may be building right now
    old = time.time() - native.STALE_LOCK_SECONDS - 1
    os.utime(lock, (old, old))
    native.clear_stale_lock(tmp_path)
    assert not lock.exists()
    native.clear_stale_lock(tmp_path)  # no lock: nothing to do
