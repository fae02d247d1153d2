"""The native CPU kernel computes the torch backend's integers exactly: random shapes (K not a
multiple of the kernel's 128-wide group, M from 1 to 64, fused parts), V1/V2/V3 quantizers, its
AVX2 and portable paths, and the one-line fallback when no compiler is present."""

from __future__ import annotations

import logging

import pytest
import torch

from engine.kernels import PackedWeight, native, ternary_linear
from engine.kernels.cpu import CpuTernaryLinear
from models.packing import pack_ternary, unpack_ternary

VARIANTS = {"v1": (8, False), "v2": (4, True), "v3": (8, True)}


@pytest.fixture(params=["avx2", "portable"])
def lib(request):
    lib = native.library()
    assert lib is not None, "the native kernel must build where gcc is present"
    if request.param == "avx2" and not lib.bitskip_has_avx2():
        pytest.skip("this CPU has no AVX2")  # never on the project's machines (AVX2)
    lib.bitskip_force_portable(request.param == "portable")
    yield lib
    lib.bitskip_force_portable(0)


def random_parts(out_features: list[int], k: int, gen: torch.Generator) -> list[PackedWeight]:
    return [PackedWeight(pack_ternary(torch.randint(-1, 2, (n, k), generator=gen)),
                         float(torch.rand((), generator=gen) * 0.05 + 0.01)) for n in out_features]


@pytest.mark.parametrize("m,k,out_features", [
    (1, 4, [3]), (1, 128, [64]), (2, 132, [5, 7]), (3, 252, [16, 4, 4]), (7, 384, [33]),
    (1, 260, [5, 6, 3]), (2, 1156, [7, 2]),  # M = 1, 2 over parts of odd sizes, K tails
    (1, 128 * 17, [5, 6, 3]), (1, 2048, [4, 9]),  # M = 1 on whole groups: rows in fours and alone
    (2, 128 * 9, [5, 6]), (6, 2048, [19]),  # M > 1 on whole groups: passes of 2, then 4 + 2 rows
    (16, 1028, [40, 8, 9]), (33, 644, [31]), (64, 1000, [300]),  # the last runs on threads
])
def test_accumulators_equal_int64_reference(lib, m, k, out_features):
    gen = torch.Generator().manual_seed(m * 1000 + k)
    parts = random_parts(out_features, k, gen)
    codes = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    codes[0, :8] = 127                     # the extremes of the int16 partial sums
    codes[-1, -8:] = -128
    weight = torch.cat([unpack_ternary(p.qweight) for p in parts]).long()
    got = CpuTernaryLinear(parts, 8, False, kernel="native").accumulate(codes)
    assert got.dtype == torch.int32
    assert torch.equal(got.long(), codes.long() @ weight.t())


@pytest.mark.parametrize("k", [128, 384, 128 * 3 + 36])
def test_every_row_count_up_to_64_equals_int64_reference(lib, k):
    """Tiles of 4 weight rows x 4 activation rows (whole groups) and the pass loop (K tails): every
    M from 1 to 12, then counts that leave 1, 2, 3 rows in the last pass, over fused parts whose
    rows are not a multiple of the tiles."""
    gen = torch.Generator().manual_seed(k)
    parts = random_parts([5, 22, 10], k, gen)
    weight = torch.cat([unpack_ternary(p.qweight) for p in parts]).long()
    linear = CpuTernaryLinear(parts, 8, False, kernel="native")
    for m in [*range(1, 13), 29, 30, 31, 64]:
        codes = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
        codes[m // 2, :16] = -128          # int16 extremes in a middle row too
        assert torch.equal(linear.accumulate(codes).long(), codes.long() @ weight.t()), m


def test_extreme_codes_over_long_rows_do_not_overflow(lib):
    """Every weight +1 (or -1) against every activation at the limit: the largest partial sums."""
    for k, m in ((128 * 40 + 36, 2), (128 * 40, 1), (128 * 13, 1), (128 * 13, 3), (128 * 16, 4)):
        for t, a in ((1, 127), (1, -128), (-1, -128), (-1, 127)):
            parts = [PackedWeight(pack_ternary(torch.full((5, k), t)), 1.0)]
            codes = torch.full((m, k), a, dtype=torch.int8)
            got = CpuTernaryLinear(parts, 8, False, kernel="native").accumulate(codes)
            assert torch.equal(got, torch.full((m, 5), t * a * k, dtype=torch.int32))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("m,k", [(1, 256), (5, 512), (64, 64)])
def test_projection_outputs_bit_identical_to_torch_backend(lib, variant, m, k):
    bits, hadamard = VARIANTS[variant]
    gen = torch.Generator().manual_seed(k + m)
    parts = random_parts([k // 2, k // 4], k, gen)
    x = torch.randn(m, k - 4 if hadamard else k, generator=gen)  # V2/V3 pad to the power of two
    fast = CpuTernaryLinear(parts, bits, hadamard, kernel="native")
    ref = CpuTernaryLinear(parts, bits, hadamard, kernel="torch")
    assert torch.equal(fast(x), ref(x))
    assert fast.in_features == ref.in_features and fast.out_features == ref.out_features


def test_weights_stay_packed_and_are_not_copied():
    parts = random_parts([8, 8], 256, torch.Generator().manual_seed(0))
    proj = ternary_linear(parts, 8, False, backend="cpu")
    assert proj.kernel == "native"
    assert [p.data_ptr() for p in proj._matmul.parts] == [p.qweight.data_ptr() for p in parts]


def test_fresh_cache_builds_the_library(tmp_path, monkeypatch):
    monkeypatch.setenv("BITSKIP_CACHE", str(tmp_path))
    path = native.build(native.compiler(), native.cache_dir())
    assert path.parent == tmp_path / "native" and path.suffix == ".so"
    assert native.build(native.compiler(), native.cache_dir()) == path  # cached: not rebuilt


def test_without_a_compiler_the_torch_path_is_used_with_one_log_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("PATH", "")
    monkeypatch.setenv("BITSKIP_CACHE", str(tmp_path))  # nothing built there yet
    native.library.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="bitskip.kernels"):
            parts = random_parts([4], 128, torch.Generator().manual_seed(0))
            projs = [ternary_linear(parts, 8, False, backend="cpu") for _ in range(3)]
        assert all(p.kernel == "torch" for p in projs)
        assert len(caplog.records) == 1 and "no C compiler" in caplog.records[0].getMessage()
    finally:
        native.library.cache_clear()
