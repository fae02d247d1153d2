"""The native gated activation (gate.c) equals libm's SiLU to the bit: its four-lane exp is only
trusted where its float32 rounding is certain, every other lane is recomputed with libm. The
reference here is Python's float arithmetic (float64, math.exp: libm's exp), rounded once to
float32, as models/functional.py's arithmetic is defined (DESIGN section 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.kernels import native


def reference(g: np.ndarray, u: np.ndarray, relu2: bool) -> np.ndarray:
    out = np.empty(len(g), dtype=np.float32)
    for i, (gi, ui) in enumerate(zip(g.tolist(), u.tolist())):
        if relu2:
            pos = gi if gi > 0.0 else 0.0  # the C comparison's: NaN gives 0
            act = pos * pos
        else:
            try:
                act = gi / (1.0 + math.exp(-gi))
            except OverflowError:  # exp(-g) = inf in C: g / inf
                act = math.copysign(0.0, gi) if not math.isnan(gi) else gi
        out[i] = np.float32(act * ui)
    return out


def gate(g: np.ndarray, u: np.ndarray, relu2: bool) -> np.ndarray:
    lib = native.library()
    assert lib is not None
    out = np.empty(len(g), dtype=np.float32)
    lib.bitskip_gate(g.ctypes.data, u.ctypes.data, len(g), int(relu2), out.ctypes.data)
    return out


@pytest.mark.parametrize("relu2", [False, True])
def test_gate_equals_libm_float64_to_the_bit(relu2):
    rng = np.random.default_rng(1)
    scales = np.array([1e-30, 1e-3, 0.5, 1.0, 4.0, 20.0, 100.0, 800.0, 1e30], dtype=np.float64)
    n = 60_003  # not a multiple of the four lanes
    g = (rng.uniform(-1, 1, n) * scales[rng.integers(0, len(scales), n)]).astype(np.float32)
    u = (rng.uniform(-1, 1, n) * scales[rng.integers(0, len(scales), n)]).astype(np.float32)
    special = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 708.0, -708.0, 709.5, -745.2, 1e-45, -1e-45,
                        3.4e38, -3.4e38], dtype=np.float32)
    g[:len(special)] = special
    u[len(special):2 * len(special)] = special
    with np.errstate(all="ignore"):
        want = reference(g, u, relu2)
    got = gate(g, u, relu2)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


# Every float32 g in 0.01 <= |g| <= 8 whose SiLU (u = 1) sits within 2^-47 of a float32 midpoint
# (an exhaustive search over the floats with libm's exp): the lanes the check must send to libm.
BESIDE_MIDPOINTS = [
    "0x1.4b0b3p-7", "0x1.7ccc2p-7", "0x1.8c23d8p-7", "0x1.1d5754p-6", "0x1.26e18ep-6",
    "0x1.3359b4p-6", "0x1.3c90acp-4", "0x1.a20e9ap-4", "0x1.2adc5ap-2", "0x1.9b9accp-2",
    "0x1.9d4d6p-2", "0x1.586306p-1", "0x1.f17634p-1", "0x1.f5a86ap-1", "0x1.252184p+0",
    "0x1.29d2fcp+0", "0x1.5ff36p+1", "0x1.92d308p+2", "0x1.a503acp+2", "-0x1.4b0b3p-7",
    "-0x1.7ccc2p-7", "-0x1.8c23d8p-7", "-0x1.1d5754p-6", "-0x1.26e18ep-6", "-0x1.3359b4p-6",
    "-0x1.3c90acp-4", "-0x1.118ac4p-2", "-0x1.9b9accp-2", "-0x1.9d4d6p-2", "-0x1.c1071p-2",
]


def test_gate_on_values_beside_float32_rounding_boundaries():
    """SiLU values within 2^-47 of a float32 rounding boundary (found exhaustively), and pairs whose
    float64 product sits within 2^-36 of one (found among 2M random pairs): they round as libm's
    path rounds them."""
    g = np.array([float.fromhex(v) for v in BESIDE_MIDPOINTS], dtype=np.float32)
    assert np.array_equal(gate(g, np.ones_like(g), False).view(np.uint32),
                          reference(g, np.ones_like(g), False).view(np.uint32))
    rng = np.random.default_rng(2)
    g = rng.uniform(-8, 8, 2_000_000).astype(np.float32)
    u = rng.uniform(-4, 4, len(g)).astype(np.float32)
    gd = g.astype(np.float64)
    v = gd / (1.0 + np.exp(-gd)) * u.astype(np.float64)
    r = v.astype(np.float32).astype(np.float64)
    gap = np.spacing(np.abs(v).astype(np.float32)).astype(np.float64)
    off = np.abs(np.abs(v - r) - gap / 2) / np.abs(v)  # distance to the nearest midpoint
    near = np.nonzero(off < 2.0 ** -36)[0]
    assert len(near) >= 20
    g, u = g[near], u[near]
    assert np.array_equal(gate(g, u, False).view(np.uint32), reference(g, u, False).view(np.uint32))
