"""The one interface between the model runner and the hardware it runs on.

The runner holds the model's control flow (rows, exits, deferred KV fills, the paged cache's
addressing) once; a backend decides where tensors live and which kernels compute: the ternary
projections (with the RMSNorm before them), attention over the paged cache, the shared head.
Every backend computes DESIGN section 2's numbers; tests hold each to the torch reference.
"""

from __future__ import annotations

from typing import Protocol

import torch

from engine.kernels import PackedWeight, TernaryLinear
from engine.kv_cache import KVCache


class Backend(Protocol):
    name: str               # "torch" or "triton"
    device: torch.device    # where weights, activations and the KV cache live
    sample_on_device: bool  # the engine samples the batch there (engine/device_sampler.py)

    def describe(self) -> str:
        """One line for the startup log and /v1/models: device and kernels."""
        ...

    def projection(self, parts: list[PackedWeight], activation_bits: int, hadamard: bool) -> TernaryLinear:
        """One (possibly fused) ternary projection, its weights on this backend's device."""
        ...

    def norm_project(self, proj: TernaryLinear, x: torch.Tensor, norm: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """proj(rms_norm(x, norm, eps)): float32 [T, K] -> [T, N]."""
        ...

    def head(self, h: torch.Tensor, norm: torch.Tensor, lm_head: torch.Tensor, eps: float,
             argmax_only: bool = False) -> torch.Tensor:
        """lm_head(rms_norm(h)) [T, vocab]; each row's numbers do not depend on the other rows.
        `argmax_only`: the caller reads nothing but each row's argmax; a backend may then return
        that argmax's exact logit with -inf for rows that cannot be the largest (first index on
        ties stays the same: engine/kernels/native/head_screen.c)."""
        ...

    def decode_attention(self, q: torch.Tensor, cache: KVCache, tables: torch.Tensor,
                         lengths: torch.Tensor) -> torch.Tensor:
        """Single-token rows: q [n, H, D] attends positions 0..lengths[i]-1 of the blocks
        `tables[i]` (long [n, W]); the row's own key is already in the cache. -> [n, H * D]."""
        ...

    def prefill_attention(self, q: torch.Tensor, cache: KVCache, table: torch.Tensor,
                          start: int) -> torch.Tensor:
        """One row's tokens at positions start.. (q [t, H, D]), causally over the cached keys
        0..start+t-1 of the blocks `table` (long [W]), its own keys already written. -> [t, H * D]."""
        ...

    def causal_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention within one row's tokens, nothing cached (perplexity windows)."""
        ...

    def full_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Every token of one row attends to every other, nothing cached: models without a
        causal mask (first generation of the public BitSkip code), recomputed each step."""
        ...
