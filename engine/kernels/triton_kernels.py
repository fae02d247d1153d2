"""Triton kernels of the CUDA backend, and their thin launch wrappers.

The kernels, all reproducing DESIGN section 2 bit for bit (design and measurements to do:
engine/kernels/NOTES.md; one module because the three matrix kernels share the weight layout
and the launch code, and the quantizer shares the interpreter switch):

* `_quant_kernel`: one program per token row. Optional fused RMSNorm (mean of squares accumulated
  in float64, like models.functional.rms_norm), optional Walsh-Hadamard butterfly (the same adds,
  in the same order, as models.quant.hadamard_transform), then per-token absmax quantization to
  int8 codes in [-Q, Q] with round-half-to-even.
* `_prefill_kernel`: tiles of int8 activations times 2-bit weight codes unpacked in registers to
  int8, `tl.dot` into int32 (tensor cores on Ampere/Hopper), epilogue acc * (s / Q) * gamma.
* `_decode_kernel`: a handful of rows (M <= 8). Row-parallel GEMV on 32-bit words: each program
  owns BLOCK_N output features over the whole K, reads every packed byte exactly once, and
  multiplies four weights per dp4a into int32 partial sums that are reduced once at the end.
* `_decode_bytes_kernel`: the same GEMV one weight at a time (fallback and benchmark baseline).

Weight layout (re-laid once at load by `relayout_packed`): uint8 [N, Kp / 4], Kp = K rounded up to
a multiple of GROUP = 128, padding codes = 1 (weight 0). Inside each group of 128 in-features the
byte r (0 <= r < 32) of a row holds the codes of k = 32 * j + r at bits 2j..2j+1 (j = 0..3), so the
"plane" j of a 32-byte chunk, (byte >> 2j) & 3, is the codes of 32 CONTIGUOUS in-features. A kernel
therefore unpacks one plane with a shift and a mask and pairs it with a contiguous slice of the
activations; no interleaving shuffle is needed. Still 2 bits per weight.

Under TRITON_INTERPRET=1 (set before this module is imported: Triton picks the interpreter when
the @triton.jit decorator runs) the kernels run on CPU tensors with a single small config and no
autotuning; that is how CI checks them.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.0
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older layouts
    from triton.language.extra.cuda import libdevice

GROUP = 128            # in-features per re-laid group
PLANE = GROUP // 4     # bytes per row per group = in-features per plane


# ---------------------------------------------------------------------------------------------
# Weight layout
# ---------------------------------------------------------------------------------------------

def padded_in_features(k: int) -> int:
    return -(-k // GROUP) * GROUP


def relayout_packed(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Canonical packing uint8 [N, K / 4] (models.packing) -> grouped layout uint8 [N, Kp / 4].

    Runs on whatever device `packed` is on; the int8 temporary it makes is dropped on return.
    """
    n, kb = packed.shape
    if kb * 4 != in_features:
        raise ValueError(f"packed rows hold {kb * 4} codes, expected {in_features}")
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = ((packed.unsqueeze(-1) >> shifts) & 3).reshape(n, in_features)   # raw codes, k order
    kp = padded_in_features(in_features)
    if kp != in_features:
        pad = torch.ones((n, kp - in_features), dtype=torch.uint8, device=packed.device)
        codes = torch.cat([codes, pad], dim=1)                                 # code 1 = weight 0
    planes = codes.reshape(n, kp // GROUP, 4, PLANE)                           # [n, g, j, r]
    out = planes[:, :, 0] | (planes[:, :, 1] << 2) | (planes[:, :, 2] << 4) | (planes[:, :, 3] << 6)
    return out.reshape(n, kp // 4).contiguous()


def unrelayout_packed(grouped: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `relayout_packed` (for tests and debugging)."""
    n, kpb = grouped.shape
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=grouped.device)
    planes = (grouped.reshape(n, kpb // PLANE, 1, PLANE) >> shifts.view(1, 1, 4, 1)) & 3
    codes = planes.reshape(n, kpb * 4)[:, :in_features].reshape(n, in_features // 4, 4)
    return (codes << shifts).sum(dim=-1, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _quant_kernel(x_ptr, nw_ptr, codes_ptr, s_ptr,
                  K_IN, K_OUT, stride_xm, stride_cm, eps, inv_sqrt_n,
                  QMAX: tl.constexpr, HAS_NORM: tl.constexpr, HADAMARD: tl.constexpr,
                  LOG_N: tl.constexpr, BLOCK: tl.constexpr, USE_RINT: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    in_mask = offs < K_IN
    x = tl.load(x_ptr + row * stride_xm + offs, mask=in_mask, other=0.0).to(tl.float32)

    if HAS_NORM:
        # models.functional.rms_norm: x / sqrt(mean(x^2) + eps) * w, mean in float64.
        x64 = x.to(tl.float64)
        mean_sq = (_sum(x64 * x64, axis=0) / K_IN).to(tl.float32)
        # Correctly rounded square root (as torch on CUDA). NOTE: torch's CPU float32 sqrt is not
        # always correctly rounded (about 0.6% of inputs 1 ulp off on an AVX-512 build), so a
        # fused norm can differ from models.functional.rms_norm on a CPU by 1 ulp in rare rows.
        denom = tl.sqrt_rn(mean_sq + eps)
        w = tl.load(nw_ptr + offs, mask=in_mask, other=0.0).to(tl.float32)
        x = tl.div_rn(x, denom) * w

    if HADAMARD:
        # models.quant.hadamard_transform: for h = 1, 2, 4, ...: the pairs (i, i + h) with bit h of
        # i clear become (a + b, a - b). BLOCK == K_OUT == n, a power of two; x is zero past K_IN.
        for i in tl.static_range(LOG_N):
            x3 = tl.reshape(x, (BLOCK // (2 << i), 2, 1 << i))
            a, b = tl.split(tl.permute(x3, (0, 2, 1)))
            x3 = tl.permute(tl.join(a + b, a - b), (0, 2, 1))
            x = tl.reshape(x3, (BLOCK,))
        x = x * inv_sqrt_n

    # models.quant.quantize_activations: s = max(absmax, eps); q = clamp(round(x * (Q / s)), -Q, Q)
    out_mask = offs < K_OUT
    amax = _max(tl.where(out_mask, tl.abs(x), 0.0), axis=0)
    s = tl.maximum(amax, 1e-5)                                  # eps of DESIGN section 2
    # `q_max / s` in torch is Tensor.__rtruediv__ = s.reciprocal() * q_max: two roundings, and
    # a quarter of the time not the correctly rounded quotient. Reproduce exactly that.
    inv = tl.div_rn(1.0 + _zeros_like(s), s) * QMAX
    y = x * inv
    # torch.round: round half to even.
    if USE_RINT:
        q = libdevice.rint(y)                                   # cvt.rni.f32.f32
    else:
        # Interpreter path (libdevice does not run there). Exact for |y| < 2^23: floor(y) and
        # y - floor(y) are exact in float32.
        f = tl.floor(y)
        d = y - f
        f_odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
        q = tl.where((d > 0.5) | ((d == 0.5) & f_odd), f + 1.0, f)
    q = tl.minimum(tl.maximum(q, -QMAX * 1.0), QMAX * 1.0)
    tl.store(codes_ptr + row * stride_cm + offs, q.to(tl.int8), mask=out_mask)
    tl.store(s_ptr + row, s)


@triton.jit
def _prefill_kernel(a_ptr, w_ptr, out_ptr, s_ptr, gamma_ptr,
                    M, N, K, stride_am, stride_wn, stride_om, M_BUCKET,
                    QMAX: tl.constexpr, EPILOGUE: tl.constexpr, R: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Grouped program order: GROUP_M row tiles share each weight tile while it sits in L2.
    pid = tl.program_id(0)
    num_pid_m = _cdiv(M, BLOCK_M)
    num_pid_n = _cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R)
    m_mask = offs_m < M
    n_mask = offs_n < N
    a_rows = a_ptr + offs_m[:, None] * stride_am
    # B tile [R, BLOCK_N] read from the N-major packed rows: K-major, as int8 MMA wants it.
    w_tile = w_ptr + offs_n[None, :] * stride_wn + offs_r[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for g in range(0, _cdiv(K, 4 * R)):
        wb = tl.load(w_tile + g * R, mask=n_mask[None, :], other=0).to(tl.int32)
        for j in tl.static_range(4):
            k = g * (4 * R) + j * R + offs_r
            a = tl.load(a_rows + k[None, :], mask=m_mask[:, None] & (k[None, :] < K), other=0)
            t = (((wb >> (2 * j)) & 3) - 1).to(tl.int8)       # ternary weights, int8 [R, BLOCK_N]
            acc = tl.dot(a, t, acc, out_dtype=tl.int32)

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if EPILOGUE:
        s = tl.load(s_ptr + offs_m, mask=m_mask, other=1.0)
        gamma = tl.load(gamma_ptr + offs_n, mask=n_mask, other=0.0)
        sq = tl.div_rn(s, QMAX * 1.0 + _zeros_like(s))           # s / Q, as the reference
        y = acc.to(tl.float32) * sq[:, None] * gamma[None, :]       # (acc * (s/Q)) * gamma
        tl.store(out_ptrs, y, mask=mask)
    else:
        tl.store(out_ptrs, acc, mask=mask)


@triton.jit
def _decode_bytes_kernel(a_ptr, w_ptr, out_ptr, s_ptr, gamma_ptr,
                         M, N, K, KB, stride_am, stride_wn, stride_om,
                         QMAX: tl.constexpr, EPILOGUE: tl.constexpr, R: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr):
    """The plain GEMV: bytes, one weight at a time (about 3 integer ops per weight)."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_KB)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    a_rows = a_ptr + offs_m[:, None] * stride_am

    # Codes c in {0, 1, 2} (weight c - 1): sum a * (c - 1) = sum a * c - sum a. Partial sums stay
    # elementwise (no cross-lane reduction inside the loop); one reduction at the end.
    part = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KB), dtype=tl.int32)
    asum = tl.zeros((BLOCK_M, BLOCK_KB), dtype=tl.int32)
    for kb0 in range(0, KB, BLOCK_KB):
        c = kb0 + offs_c
        c_mask = c < KB
        wb = tl.load(w_rows + c[None, :], mask=n_mask[:, None] & c_mask[None, :], other=0)
        wb = wb.to(tl.int32)
        k_base = (c // R) * (4 * R) + (c % R)
        for j in tl.static_range(4):
            k = k_base + j * R
            a = tl.load(a_rows + k[None, :], mask=m_mask[:, None] & (c_mask & (k < K))[None, :],
                        other=0).to(tl.int32)                                   # [BLOCK_M, BLOCK_KB]
            code = (wb >> (2 * j)) & 3                                          # [BLOCK_N, BLOCK_KB]
            part += a[:, None, :] * code[None, :, :]
            asum += a
    acc = _sum(part, axis=2) - _sum(asum, axis=1)[:, None]                 # [BLOCK_M, BLOCK_N]

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if EPILOGUE:
        s = tl.load(s_ptr + offs_m, mask=m_mask, other=1.0)
        gamma = tl.load(gamma_ptr + offs_n, mask=n_mask, other=0.0)
        sq = tl.div_rn(s, QMAX * 1.0 + _zeros_like(s))
        y = acc.to(tl.float32) * sq[:, None] * gamma[None, :]
        tl.store(out_ptrs, y, mask=mask)
    else:
        tl.store(out_ptrs, acc, mask=mask)


@triton.jit
def _dp4a(cw, aw, acc, USE_DP4A: tl.constexpr):
    """acc + sum over the 4 byte lanes of unsigned(cw) * signed(aw): PTX dp4a.u32.s32."""
    if USE_DP4A:
        r = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [cw, aw, acc],
                                      dtype=tl.int32, is_pure=True, pack=1)
    else:
        # Same sum in plain integer ops (the interpreter's path): unsigned lanes of cw, signed
        # lanes of aw (shift left then arithmetic shift right sign-extends a byte).
        r = acc + (cw & 0xFF) * ((aw << 24) >> 24)
        r += ((cw >> 8) & 0xFF) * ((aw << 16) >> 24)
        r += ((cw >> 16) & 0xFF) * ((aw << 8) >> 24)
        r += ((cw >> 24) & 0xFF) * (aw >> 24)
    return r


@triton.jit
def _decode_kernel(a_ptr, w_ptr, out_ptr, s_ptr, gamma_ptr,
                   M, N, KW, KBW, stride_am, stride_wn, stride_om,
                   QMAX: tl.constexpr, EPILOGUE: tl.constexpr, RW: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                   USE_DP4A: tl.constexpr):
    """GEMV on 32-bit words: activations int8 [M, K] read as int32 [M, K/4] (KW words a row),
    weights as int32 [N, Kp/16] (KBW words a row), strides in words.

    A weight word holds 16 codes: bytes r..r+3 of a 32-byte plane chunk. `word & (0x03030303 << 2j)`
    leaves in each byte lane the code of in-feature 32j + r + lane, times 4^j; those four
    in-features are one activation word, so one dp4a multiplies four weights: per 16 weights,
    4 LOP3 + 4 DP4A. The four planes are the leading axis of every tensor here.
    """
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_w = tl.arange(0, BLOCK_W)
    plane = tl.arange(0, 4)
    n_mask = offs_n < N
    m_mask = offs_m < M
    w_rows = w_ptr + offs_n[:, None] * stride_wn
    a_rows = a_ptr + offs_m[:, None] * stride_am
    # Byte-lane masks of the four planes: 0x03030303 << 2j (the last one wraps to negative int32).
    lane_mask = (0x03030303 << (2 * plane))[:, None, None, None]

    acc = tl.zeros((4, BLOCK_M, BLOCK_N, BLOCK_W), dtype=tl.int32)   # plane j holds 4^j * dot
    asum = tl.zeros((4, BLOCK_M, 1, BLOCK_W), dtype=tl.int32)
    ones = tl.full((4, BLOCK_M, 1, BLOCK_W), 0x01010101, dtype=tl.int32)
    for w0 in range(0, KBW, BLOCK_W):
        c = w0 + offs_w
        c_mask = c < KBW
        wv = tl.load(w_rows + c[None, :], mask=n_mask[:, None] & c_mask[None, :], other=0)
        # Activation word of plane j for weight word c: group * 32 + 8j + (c % 8) (RW = 8).
        kw = ((c // RW) * (4 * RW) + (c % RW))[None, :] + RW * plane[:, None]       # [4, BLOCK_W]
        a_ok = (c_mask[None, :] & (kw < KW))[:, None, :] & m_mask[None, :, None]
        aw = tl.load(a_rows[None, :, :] + kw[:, None, :], mask=a_ok, other=0)      # [4, BLOCK_M, BLOCK_W]
        aw = aw[:, :, None, :]
        asum = _dp4a(ones, aw, asum, USE_DP4A)
        cw = wv[None, None, :, :] & lane_mask                                     # [4, 1, BLOCK_N, BLOCK_W]
        acc = _dp4a(tl.broadcast_to(cw, (4, BLOCK_M, BLOCK_N, BLOCK_W)),
                    tl.broadcast_to(aw, (4, BLOCK_M, BLOCK_N, BLOCK_W)), acc, USE_DP4A)

    # Plane sums are exact multiples of 4^j, so the arithmetic shifts are exact divisions. Weights
    # are codes - 1: sum a * (c - 1) = sum a * c - sum a.
    per_plane = _sum(acc, axis=3) >> (2 * plane)[:, None, None]                # [4, BLOCK_M, BLOCK_N]
    acc = _sum(per_plane, axis=0) - _sum(_sum(asum, axis=3), axis=0)        # [BLOCK_M, BLOCK_N]

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if EPILOGUE:
        s = tl.load(s_ptr + offs_m, mask=m_mask, other=1.0)
        gamma = tl.load(gamma_ptr + offs_n, mask=n_mask, other=0.0)
        sq = tl.div_rn(s, QMAX * 1.0 + _zeros_like(s))
        y = acc.to(tl.float32) * sq[:, None] * gamma[None, :]
        tl.store(out_ptrs, y, mask=mask)
    else:
        tl.store(out_ptrs, acc, mask=mask)


# ---------------------------------------------------------------------------------------------
# Configs: a single small one under the interpreter; a few H100 candidates for the autotuner.
# ---------------------------------------------------------------------------------------------

def _is_interpreted(fn) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return isinstance(fn, InterpretedFunction)


INTERPRETED = _is_interpreted(_quant_kernel)


def plain(fn):
    """Under the interpreter every call of a nested @triton.jit function (ours, or tl.sum, tl.max,
    tl.cdiv) re-patches triton.language, milliseconds each; inside an interpreted kernel the
    plain Python function computes the same. On a GPU: the function itself."""
    return fn.fn if INTERPRETED else fn


_dp4a = plain(_dp4a)
_sum, _max, _cdiv, _zeros_like = plain(tl.sum), plain(tl.max), plain(tl.cdiv), plain(tl.zeros_like)
# Autotune on a real GPU unless BITSKIP_TRITON_AUTOTUNE=0 (then the heuristic configs below).
AUTOTUNE = not INTERPRETED and os.environ.get("BITSKIP_TRITON_AUTOTUNE", "1") != "0"
# dp4a through inline PTX on a GPU (BITSKIP_DP4A=0 falls back to the same kernel in plain Triton
# integer ops, which is what the interpreter runs).
USE_DP4A = not INTERPRETED and os.environ.get("BITSKIP_DP4A", "1") != "0"

INTERPRETER_CONFIGS = {
    # Large tiles: the interpreter's cost is per Triton op, so fewer, bigger programs run faster.
    # test_triton_kernels.py also runs small explicit tiles for the ragged-edge paths.
    "prefill": dict(BLOCK_M=32, BLOCK_N=128, GROUP_M=2, num_warps=4, num_stages=1),
    "decode": dict(BLOCK_N=128, BLOCK_W=32, num_warps=4, num_stages=1),
    "decode_bytes": dict(BLOCK_N=128, BLOCK_KB=128, num_warps=4, num_stages=1),
}

_PREFILL_CONFIGS = [
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "GROUP_M": 8}, num_warps=8, num_stages=3),
]

# Decode: 4 planes x BLOCK_M x BLOCK_N x BLOCK_W int32 partial sums live in registers; the pruner
# keeps BLOCK_M * BLOCK_N * BLOCK_W <= 256 per warp (<= 32 accumulator registers a thread).
_DECODE_CONFIGS = [
    triton.Config({"BLOCK_N": 4, "BLOCK_W": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 8, "BLOCK_W": 64}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 16, "BLOCK_W": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 8, "BLOCK_W": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 4, "BLOCK_W": 32}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 16, "BLOCK_W": 32}, num_warps=8, num_stages=2),
]
_DECODE_ELEMS_PER_WARP = 256

_DECODE_BYTES_CONFIGS = [
    triton.Config({"BLOCK_N": 8, "BLOCK_KB": 256}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 16, "BLOCK_KB": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 16, "BLOCK_KB": 256}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 32, "BLOCK_KB": 128}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 4, "BLOCK_KB": 512}, num_warps=4, num_stages=2),
]
_DECODE_BYTES_ELEMS_PER_WARP = 2048


def _prune_prefill(configs, named_args, **kwargs):
    bucket = named_args["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, bucket)]
    return kept or configs[:1]


def _pruner(width_key: str, budget_per_warp: int):
    def prune(configs, named_args, **kwargs):
        block_m = kwargs.get("BLOCK_M", named_args.get("BLOCK_M", 1))
        kept = [c for c in configs
                if block_m * c.kwargs["BLOCK_N"] * c.kwargs[width_key] <= budget_per_warp * c.num_warps]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs[width_key])]
    return prune


if AUTOTUNE:
    _prefill_tuned = triton.autotune(_PREFILL_CONFIGS, key=["M_BUCKET", "N", "K", "EPILOGUE"],
                                     prune_configs_by={"early_config_prune": _prune_prefill})(_prefill_kernel)
    _decode_tuned = triton.autotune(
        _DECODE_CONFIGS, key=["N", "KW", "BLOCK_M", "EPILOGUE"],
        prune_configs_by={"early_config_prune": _pruner("BLOCK_W", _DECODE_ELEMS_PER_WARP)})(_decode_kernel)
    _decode_bytes_tuned = triton.autotune(
        _DECODE_BYTES_CONFIGS, key=["N", "K", "BLOCK_M", "EPILOGUE"],
        prune_configs_by={"early_config_prune": _pruner("BLOCK_KB", _DECODE_BYTES_ELEMS_PER_WARP)},
    )(_decode_bytes_kernel)


def _m_bucket(m: int) -> int:
    return min(1 << max(m - 1, 0).bit_length(), 512)


def default_config(kernel: str, m: int) -> dict:
    """Meta-parameters when not autotuning (interpreter, or BITSKIP_TRITON_AUTOTUNE=0)."""
    if INTERPRETED:
        return dict(INTERPRETER_CONFIGS[kernel])
    if kernel == "prefill":
        bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
        return dict(BLOCK_M=bm, BLOCK_N=128, GROUP_M=8, num_warps=8 if bm == 128 else 4,
                    num_stages=3 if bm == 128 else 4)
    if kernel == "decode":
        return dict(BLOCK_N=8 if m <= 4 else 4, BLOCK_W=64 if m <= 2 else 32, num_warps=4, num_stages=2)
    return dict(BLOCK_N=16 if m <= 2 else 8, BLOCK_KB=256 if m <= 2 else 128, num_warps=4, num_stages=2)


# ---------------------------------------------------------------------------------------------
# Launch wrappers
# ---------------------------------------------------------------------------------------------

DECODE_MAX_M = 8  # the decode kernels' hard limit; CudaTernaryLinear picks its own threshold
KERNELS = ("prefill", "decode", "decode_bytes")


def _check_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    return t if t.stride(1) == 1 else t.contiguous()


def quantize_rows(x: torch.Tensor, qmax: int, out_features: int, hadamard: bool,
                  norm_weight: torch.Tensor | None = None, eps: float = 1e-5,
                  codes_out: torch.Tensor | None = None, scale_out: torch.Tensor | None = None):
    """float [T, K_in] -> (int8 codes [T, out_features], float32 scales [T, 1]).

    With `hadamard`, out_features is the power-of-two transform size (x zero-padded); without it,
    out_features must equal K_in. `norm_weight` [K_in] fuses models.functional.rms_norm first.
    """
    x = _check_rows(x, "x")
    if x.dtype != torch.float32:
        raise TypeError(f"activations must be float32 (the reference quantizes in float32), got {x.dtype}")
    t, k_in = x.shape
    if hadamard:
        if out_features & (out_features - 1) or out_features < k_in:
            raise ValueError(f"Hadamard size {out_features} must be a power of two >= {k_in}")
    elif out_features != k_in:
        raise ValueError(f"input has {k_in} features, the projection takes {out_features}")
    if codes_out is None:
        codes_out = torch.empty((t, out_features), dtype=torch.int8, device=x.device)
    if scale_out is None:
        scale_out = torch.empty((t, 1), dtype=torch.float32, device=x.device)
    if t == 0:
        return codes_out, scale_out
    if norm_weight is not None:
        if norm_weight.shape != (k_in,):
            raise ValueError(f"norm weight shape {tuple(norm_weight.shape)} != ({k_in},)")
        norm_weight = norm_weight.contiguous()
    block = triton.next_power_of_2(out_features)
    inv_sqrt_n = 1.0 / math.sqrt(out_features)  # Triton passes it as float32, as torch casts it
    nw = 4 if block <= 2048 else 8 if block <= 8192 else 16
    _quant_kernel[(t,)](
        x, norm_weight if norm_weight is not None else x, codes_out, scale_out,
        k_in, out_features, x.stride(0), codes_out.stride(0), float(eps), inv_sqrt_n,
        QMAX=qmax, HAS_NORM=norm_weight is not None, HADAMARD=hadamard,
        LOG_N=out_features.bit_length() - 1 if hadamard else 0, BLOCK=block,
        USE_RINT=not INTERPRETED, num_warps=nw, enable_fp_fusion=False)
    return codes_out, scale_out


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """int8/uint8 [R, C] (C % 4 == 0, rows 4-byte aligned) -> the same bytes as int32 [R, C / 4]."""
    if t.stride(1) != 1 or t.stride(0) % 4 or t.data_ptr() % 4:
        t = t.contiguous()
    return t.view(torch.int32)


def ternary_matmul(codes: torch.Tensor, qweight: torch.Tensor, in_features: int,
                   scales: torch.Tensor | None = None, gamma: torch.Tensor | None = None,
                   qmax: int = 127, kernel: str = "prefill", out: torch.Tensor | None = None,
                   config: dict | None = None) -> torch.Tensor:
    """int8 codes [M, K] x grouped packed weights [N, Kp / 4].

    Without `scales`/`gamma`: the exact int32 accumulators [M, N]. With them: the float32
    projection acc * (s / Q) * gamma. `kernel` is one of KERNELS; `config` overrides the
    autotuner / default meta-parameters (e.g. {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4}).
    """
    codes = _check_rows(codes, "codes")
    m, k = codes.shape
    n, kpb = qweight.shape
    if k != in_features or padded_in_features(in_features) != kpb * 4:
        raise ValueError(f"codes have {k} features; weights take {in_features} (packed {kpb} bytes)")
    if codes.dtype != torch.int8:
        raise TypeError(f"codes must be int8, got {codes.dtype}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel != "prefill" and m > DECODE_MAX_M:
        raise ValueError(f"the decode kernels take at most {DECODE_MAX_M} rows, got {m}")
    epilogue = scales is not None
    if epilogue and gamma is None:
        raise ValueError("the float epilogue needs both scales and gamma")
    if out is None:
        out = torch.empty((m, n), dtype=torch.float32 if epilogue else torch.int32, device=codes.device)
    if m == 0 or n == 0:
        return out
    s_arg = scales.reshape(-1) if epilogue else out          # placeholders are never read
    g_arg = gamma if epilogue else out
    tuned = config is None and AUTOTUNE
    cfg = None if tuned else dict(default_config(kernel, m) if config is None else config)

    if kernel == "prefill":
        args = (codes, qweight, out, s_arg, g_arg, m, n, k,
                codes.stride(0), qweight.stride(0), out.stride(0), _m_bucket(m))
        meta = dict(QMAX=qmax, EPILOGUE=epilogue, R=PLANE)
        grid = lambda META: (triton.cdiv(m, META["BLOCK_M"]) * triton.cdiv(n, META["BLOCK_N"]),)
        if tuned:
            _prefill_tuned[grid](*args, **meta)
        else:
            cfg.setdefault("GROUP_M", 8)
            _prefill_kernel[grid(cfg)](*args, **meta, **cfg)
    elif kernel == "decode":
        a32, w32 = _as_words(codes), _as_words(qweight)
        args = (a32, w32, out, s_arg, g_arg, m, n, k // 4, kpb // 4,
                a32.stride(0), w32.stride(0), out.stride(0))
        meta = dict(QMAX=qmax, EPILOGUE=epilogue, RW=PLANE // 4, BLOCK_M=triton.next_power_of_2(m),
                    USE_DP4A=USE_DP4A)
        grid = lambda META: (triton.cdiv(n, META["BLOCK_N"]),)
        if tuned:
            _decode_tuned[grid](*args, **meta)
        else:
            _decode_kernel[grid(cfg)](*args, **meta, **cfg)
    else:
        args = (codes, qweight, out, s_arg, g_arg, m, n, k, kpb,
                codes.stride(0), qweight.stride(0), out.stride(0))
        meta = dict(QMAX=qmax, EPILOGUE=epilogue, R=PLANE, BLOCK_M=triton.next_power_of_2(m))
        grid = lambda META: (triton.cdiv(n, META["BLOCK_N"]),)
        if tuned:
            _decode_bytes_tuned[grid](*args, **meta)
        else:
            if cfg["BLOCK_KB"] % PLANE:
                raise ValueError(f"BLOCK_KB must be a multiple of {PLANE}")
            _decode_bytes_kernel[grid(cfg)](*args, **meta, **cfg)
    return out
