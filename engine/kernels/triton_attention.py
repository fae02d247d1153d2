"""Triton kernels for attention over the paged KV cache, and the shared head's GEMM.

Both are batch-invariant: a row's numbers never depend on which other rows share the launch, so
a request gives the same tokens alone and in a batch of 32 (as on the CPU).

* `_paged_attention_kernel`: one program per (query token, KV head). The program reads the
  token's keys 0..pos through its block table, in BLOCK_K chunks, in a fixed order, with an
  online softmax, for the whole query group of that KV head at once. Decode rows (one token each,
  different lengths and depths: each row brings its own layer's table) and prefill or chunked
  prefill rows (many tokens sharing one table, keys cached before plus the new ones) are the same
  launch: only the per-token (table row, position) differ. No split over keys, so the reduction
  order of a token is fixed. The arithmetic is float64, as models.functional.attention's, and is
  rounded to float32 once: the result equals the CPU reference's except where a float32
  rounding boundary lies within float64 noise.
* `_head_kernel`: float32 x [M, K] times W [N, K]^T, one fixed tile config for every M, so each
  logit is the same chain of float32 operations whatever M is (cuBLAS picks algorithms by M).

Under TRITON_INTERPRET=1 both run on CPU tensors (how CI checks them).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .triton_kernels import INTERPRETED, plain

_sum, _max = plain(tl.sum), plain(tl.max)


@triton.jit
def _paged_attention_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, rows_ptr, pos_ptr, out_ptr,
                            stride_qt, stride_qh, stride_kt, stride_kh, stride_tab, stride_ot,
                            block_size, scale,
                            GROUP: tl.constexpr, GROUP_P2: tl.constexpr, D: tl.constexpr,
                            D_P2: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    pos = tl.load(pos_ptr + t)                 # attends keys 0..pos; pos < 0: a padding row
    row = tl.load(rows_ptr + t)
    offs_g = tl.arange(0, GROUP_P2)
    offs_d = tl.arange(0, D_P2)
    g_mask = offs_g < GROUP
    d_mask = offs_d < D
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + t * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float64)   # [G, D]

    m = tl.full((GROUP_P2,), float("-inf"), dtype=tl.float64)
    l = tl.zeros((GROUP_P2,), dtype=tl.float64)
    acc = tl.zeros((GROUP_P2, D_P2), dtype=tl.float64)
    offs_k = tl.arange(0, BLOCK_K)
    table = tables_ptr + row * stride_tab
    for k0 in range(0, pos + 1, BLOCK_K):
        kpos = k0 + offs_k
        valid = kpos <= pos
        block = tl.load(table + kpos // block_size, mask=valid, other=0).to(tl.int64)
        slot = block * block_size + kpos % block_size
        kv_off = slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :]
        kv_mask = valid[:, None] & d_mask[None, :]
        keys = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float64)    # [BLOCK_K, D]
        values = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float64)
        s = _sum(q[:, None, :] * keys[None, :, :], axis=2) * scale              # [G, BLOCK_K]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, _max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l = l * alpha + _sum(p, axis=1)
        acc = acc * alpha[:, None] + _sum(p[:, :, None] * values[None, :, :], axis=1)
        m = m_new
    l = tl.where(l > 0, l, 1.0)                # padding rows: zeros, not 0 / 0
    out = (acc / l[:, None]).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + heads[:, None] * D + offs_d[None, :], out,
             mask=g_mask[:, None] & d_mask[None, :])


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    tables: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                    block_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [T, H, D]; caches [slots, Hkv, D]; tables [R, W] (block ids); token t reads table
    rows[t] and attends its positions 0..positions[t] (< 0: a padding token, output zeros).
    Returns float32 [T, H * D]."""
    t, h, d = q.shape
    hkv = k_cache.shape[1]
    if out is None:
        out = torch.empty((t, h * d), dtype=torch.float32, device=q.device)
    if t == 0:
        return out
    if q.stride(2) != 1 or k_cache.stride(2) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("attention operands need a contiguous head dimension and equal cache strides")
    group = h // hkv
    tables = tables if tables.stride(1) == 1 else tables.contiguous()
    # Interpreter: cost is per Triton op, so big chunks; GPU: float64 partial products in registers.
    block_k = 64 if INTERPRETED else 16
    _paged_attention_kernel[(t, hkv)](
        q, k_cache, v_cache, tables, rows, positions, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), tables.stride(0), out.stride(0),
        block_size, 1.0 / math.sqrt(d),
        GROUP=group, GROUP_P2=triton.next_power_of_2(group), D=d, D_P2=triton.next_power_of_2(d),
        BLOCK_K=block_k, num_warps=4)
    return out


@triton.jit
def _head_kernel(x_ptr, w_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Row tiles of one column tile are neighbours in launch order, so W is read from HBM once.
    pid = tl.program_id(0)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    pid_m = pid % num_m
    pid_n = pid // num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                    mask=m_mask[:, None] & (k[None, :] < K), other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + k[:, None],
                    mask=n_mask[None, :] & (k[:, None] < K), other=0.0)
        # IEEE float32 (no TF32): the same FMA chain for every row.
        acc = tl.dot(x, w, acc, input_precision="ieee")
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc,
             mask=m_mask[:, None] & n_mask[None, :])


# One config for every M: a per-M choice would change each row's arithmetic.
HEAD_CONFIG = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=3)
if INTERPRETED:
    HEAD_CONFIG = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=1)


def head_matmul(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 x [M, K] @ weight [N, K]^T -> [M, N], batch-invariant."""
    m, k = x.shape
    n = weight.shape[0]
    x = x if x.stride(1) == 1 else x.contiguous()
    if out is None:
        out = torch.empty((m, n), dtype=torch.float32, device=x.device)
    if m == 0:
        return out
    cfg = HEAD_CONFIG
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _head_kernel[grid](x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0), **cfg)
    return out
