"""The Triton backend: the whole forward in Triton kernels, on a CUDA device (or on CPU tensors
under TRITON_INTERPRET=1, which is how CI checks it).

Projections: 2-bit packed weights (engine/kernels/cuda.py), each group's RMSNorm fused into the
quantize kernel in front of it. Attention: the paged-cache kernel of
engine/kernels/triton_attention.py for decode, prefill and uncached windows alike. Head: the
batch-invariant float32 GEMM of the same file. The element-wise steps between them (RoPE, the
gated activation, residual adds) stay torch operations on the device.
"""

from __future__ import annotations

import torch

from engine.kernels import PackedWeight, TernaryLinear
from engine.kernels.cuda import CudaTernaryLinear
from engine.kv_cache import KVCache
from models.functional import rms_norm


class TritonBackend:
    name = "triton"
    sample_on_device = True  # engine/device_sampler.py for the whole batch
    # Decode steps can run from static buffers without a host sync (engine/decode_graphs.py).
    static_decode = True

    def __init__(self, device: str | torch.device = "cuda"):
        from engine.kernels import triton_attention  # late: Triton reads TRITON_INTERPRET at import

        self._attn = triton_attention
        self.device = torch.device(device)
        if self.device.type == "cuda" and triton_attention.INTERPRETED:
            raise ValueError("TRITON_INTERPRET=1 is set: the Triton backend then runs on device 'cpu'")
        if self.device.type == "cpu" and not triton_attention.INTERPRETED:
            raise ValueError("the Triton backend on device 'cpu' needs TRITON_INTERPRET=1 set before start")

    def describe(self) -> str:
        where = (torch.cuda.get_device_name(self.device) if self.device.type == "cuda"
                 else "cpu, Triton interpreter")
        return f"{self.device.type} ({where}; Triton kernels: 2-bit ternary projections, paged attention)"

    def projection(self, parts: list[PackedWeight], activation_bits: int, hadamard: bool) -> TernaryLinear:
        return CudaTernaryLinear(parts, activation_bits, hadamard, device=self.device)

    def norm_project(self, proj, x, norm, eps):
        if isinstance(proj, CudaTernaryLinear):  # the norm fused into the quantize kernel
            return proj(x, norm_weight=norm, eps=eps)
        return proj(rms_norm(x, norm, eps))      # wrapped projections (engine/projection.py)

    def head(self, h, norm, lm_head, eps, argmax_only=False):  # the full head either way
        return self._attn.head_matmul(rms_norm(h, norm, eps), lm_head)

    def decode_attention(self, q, cache: KVCache, tables, lengths):
        rows = torch.arange(q.shape[0], device=self.device)
        return self._attn.paged_attention(q, cache.k, cache.v, tables, rows, lengths - 1, cache.block_size)

    def prefill_attention(self, q, cache: KVCache, table, start):
        t = q.shape[0]
        positions = torch.arange(start, start + t, device=self.device)
        rows = torch.zeros(t, dtype=torch.long, device=self.device)
        return self._attn.paged_attention(q, cache.k, cache.v, table[None], rows, positions, cache.block_size)

    def causal_attention(self, q, k, v):
        return self._uncached(q, k, v, torch.arange(q.shape[0], device=self.device))

    def full_attention(self, q, k, v):
        return self._uncached(q, k, v, torch.full((q.shape[0],), q.shape[0] - 1, device=self.device))

    def _uncached(self, q, k, v, positions):
        """Attention over the row's own keys, seen as a cache of one block that holds them all;
        token i attends positions 0..positions[i]."""
        t = q.shape[0]
        zeros = torch.zeros(t, dtype=torch.long, device=self.device)
        return self._attn.paged_attention(q, k.contiguous(), v.contiguous(), zeros[None, :1], zeros,
                                          positions, t)
