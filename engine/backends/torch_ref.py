"""The torch backend: the reference float operations of models.functional and exact ternary
projections (the native packed kernel, or torch._int_mm without a compiler), on the CPU."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from engine.kernels import PackedWeight, TernaryLinear, native
from engine.kernels.cpu import CpuTernaryLinear
from engine.kernels.native.screened_head import ScreenedHead
from engine.kv_cache import KVCache
from models.functional import attention, causal_mask, rms_norm


class TorchBackend:
    name = "torch"
    sample_on_device = False  # engine/device_sampler.py for the whole batch

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        if self.device.type != "cpu":
            raise ValueError(f"the torch backend runs on the CPU, not {self.device}; "
                             "use the triton backend on a GPU")
        self._screened: tuple[torch.Tensor, ScreenedHead] | None = None  # (its head, the copy)

    def describe(self) -> str:
        kernel = ("native packed 2-bit projections and decode blocks" if native.library() is not None
                  else "int8 torch._int_mm projections")
        return f"cpu (torch kernels: {kernel}, float64 attention)"

    def projection(self, parts: list[PackedWeight], activation_bits: int, hadamard: bool) -> TernaryLinear:
        return CpuTernaryLinear(parts, activation_bits, hadamard)

    def norm_project(self, proj, x, norm, eps):
        return proj(rms_norm(x, norm, eps))

    def prepare_head(self, lm_head: torch.Tensor) -> None:
        """Build the int8 copy that argmax-only heads screen with (with the native kernel; never
        with BITSKIP_HEAD_SCREEN=0)."""
        lib = native.library()
        if lib is not None and os.environ.get("BITSKIP_HEAD_SCREEN", "1") != "0" \
                and lm_head.dtype == torch.float32 and lm_head.is_contiguous():
            self._screened = (lm_head, ScreenedHead(lib, lm_head))

    def screened_head(self, lm_head: torch.Tensor) -> ScreenedHead | None:
        """The int8 copy prepare_head built for this head, if any."""
        return self._screened[1] if self._screened is not None and self._screened[0] is lm_head else None

    def head(self, h, norm, lm_head, eps, argmax_only=False):
        lib = native.library()  # the native product: the same sums for a row alone or in a batch
        x = rms_norm(h, norm, eps)
        if lib is None:
            return F.linear(x, lm_head)
        if argmax_only and (screened := self.screened_head(lm_head)) is not None:
            return screened(x)
        return native.head_matmul(lib, x, lm_head)

    def decode_attention(self, q, cache: KVCache, tables, lengths):
        # One padded call for every row; positions past a row's length get weight exactly 0.
        slots = cache.flat_slots(tables, int(lengths.max()))
        mask = (torch.arange(slots.shape[1], device=self.device)[None, :] < lengths[:, None])[:, None, :]
        return attention(q[:, None], cache.k[slots], cache.v[slots], mask)[:, 0]

    def prefill_attention(self, q, cache: KVCache, table, start):
        n_keys = start + q.shape[0]
        slots = cache.flat_slots(table[None], n_keys)[0]
        return attention(q[None], cache.k[slots][None], cache.v[slots][None],
                         causal_mask(q.shape[0], n_keys, self.device))[0]

    def causal_attention(self, q, k, v):
        t = q.shape[0]
        return attention(q[None], k[None], v[None], causal_mask(t, t, self.device))[0]

    def full_attention(self, q, k, v):
        t = q.shape[0]
        return attention(q[None], k[None], v[None], torch.ones(1, t, t, dtype=torch.bool, device=self.device))[0]
