"""The native float32 head: the product lm_head(x) to float32 rounding of the exact (float64)
sums, a row's logits bit-identical alone and in any batch, with and without threads, on the AVX2
and the portable path (which give the same bits)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import native


@pytest.fixture(params=["avx2", "portable"])
def lib(request):
    lib = native.library()
    assert lib is not None, "the native kernel must build where gcc is present"
    lib.bitskip_head_force_portable(request.param == "portable")
    yield lib
    lib.bitskip_head_force_portable(0)


@pytest.mark.parametrize("m,k,v", [(1, 128, 300), (2, 64, 33), (3, 100, 65), (8, 2048, 700), (5, 31, 7)])
def test_head_equals_float64_reference(lib, m, k, v):
    gen = torch.Generator().manual_seed(m * k + v)
    x, w = torch.randn(m, k, generator=gen), torch.randn(v, k, generator=gen)
    got = native.head_matmul(lib, x, w)
    want = x.double() @ w.double().t()
    # float32 sums of k products: error bounded by k * eps * sum |x w|
    bound = k * 2.0 ** -23 * (x.double().abs() @ w.double().abs().t())
    assert got.dtype == torch.float32 and got.shape == (m, v)
    assert bool(((got.double() - want).abs() <= bound).all())


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_alone_equals_the_row_in_a_batch(lib, threads):
    gen = torch.Generator().manual_seed(threads)
    x, w = torch.randn(7, 256, generator=gen), torch.randn(3000, 256, generator=gen)  # threaded
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batch = native.head_matmul(lib, x, w)
        for i in range(7):
            assert torch.equal(native.head_matmul(lib, x[i:i + 1], w)[0], batch[i])
        assert torch.equal(native.head_matmul(lib, x[2:5], w), batch[2:5])
    finally:
        torch.set_num_threads(before)


def test_avx2_equals_the_portable_order_bit_for_bit():
    """The vector kernel (several head rows a pass, the tree in registers) sums in the portable
    path's order: K not a multiple of 32, 1..9 rows, vocab not a multiple of the pass or the task."""
    lib = native.library()
    gen = torch.Generator().manual_seed(16)
    for _ in range(40):
        m, k, v = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((1, 10), (1, 300), (1, 200)))
        x, w = torch.randn(m, k, generator=gen), torch.randn(v, k, generator=gen) * 3
        fast = native.head_matmul(lib, x, w)
        lib.bitskip_head_force_portable(1)
        try:
            portable = native.head_matmul(lib, x, w)
        finally:
            lib.bitskip_head_force_portable(0)
        assert torch.equal(fast, portable), (m, k, v)
