"""BentoChat's AMX matmul (runners/engine/amx.py): the same bits for a row alone and in a batch of any
size, close to float32's product, with a bias and with shapes that do not fill its panels. Skipped
where the CPU has no AMX."""

import os
import time

import pytest
import torch

from runners.engine import amx
from runners.engine.lean import Linear

pytestmark = pytest.mark.skipif(amx.ops() is None, reason="no AMX matmul on this machine (CPU or compiler)")


@pytest.mark.parametrize("out,inner,bias", [(960, 576, False), (576, 1536, True), (100, 70, True), (49, 33, False)])
def test_a_row_gets_the_same_bits_in_any_batch_and_float32s_product_rounded(out, inner, bias):
    generator = torch.Generator().manual_seed(out)
    weight = (torch.randn(out, inner, generator=generator) * 0.05).bfloat16()
    b = torch.randn(out, generator=generator).bfloat16() if bias else None
    x = torch.randn(70, inner, generator=generator).bfloat16()
    linear = Linear(weight, b, amx=True)
    assert linear.amx is not None
    alone = torch.cat([linear(x[j:j + 1]) for j in range(len(x))])
    for m in (2, 15, 16, 17, 32, 33, 64, 70):
        assert torch.equal(linear(x[:m]), alone[:m]), m
    reference = x.float() @ weight.float().T + (b.float() if bias else 0)
    # float32 sums in another order, then one rounding to bfloat16 (8 bits): within 2 ulps of bfloat16
    assert torch.allclose(alone.float(), reference, rtol=2 ** -7, atol=1e-2)
    assert linear(x[:5].view(1, 5, inner)).shape == (1, 5, out)  # any leading dimensions


def test_no_rows():
    linear = Linear(torch.randn(64, 32).bfloat16(), amx=True)
    assert linear(torch.zeros(0, 32, dtype=torch.bfloat16)).shape == (0, 64)


def test_float32_and_int8_keep_their_kernels():
    assert Linear(torch.randn(64, 32), amx=True).amx is None
    assert Linear(torch.randn(64, 32).bfloat16(), int8=True, amx=True).amx is None


def test_up_to_32_rows_the_same_bits_as_onednn():
    """What oneDNN's packed bfloat16 kernels give where they are batch-invariant (README, Performance):
    switching a served model to the AMX matmul changes none of its answers."""
    generator = torch.Generator().manual_seed(1)
    for out, inner in [(960, 576), (576, 1536)]:
        weight = (torch.randn(out, inner, generator=generator) * 0.05).bfloat16()
        x = torch.randn(32, inner, generator=generator).bfloat16()
        onednn = Linear(weight)
        assert onednn.packed
        for m in (1, 7, 32):
            assert torch.equal(Linear(weight, amx=True)(x[:m]), onednn(x[:m])), (out, inner, m)


def test_the_same_bits_on_one_thread_and_on_every_core():
    """The kernel splits its panels over torch's threads (OpenMP), each thread with its own tiles: the
    split changes no output."""
    generator = torch.Generator().manual_seed(2)
    weight = (torch.randn(3072, 576, generator=generator) * 0.05).bfloat16()
    x = torch.randn(40, 576, generator=generator).bfloat16()
    linear, threads = Linear(weight, amx=True), torch.get_num_threads()
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
    amx.clear_stale_lock(tmp_path)
    assert lock.exists()  # another process may be building right now
    old = time.time() - amx.STALE_LOCK_SECONDS - 1
    os.utime(lock, (old, old))
    amx.clear_stale_lock(tmp_path)
    assert not lock.exists()
    amx.clear_stale_lock(tmp_path)  # no lock: nothing to do
