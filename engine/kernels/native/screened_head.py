"""The float32 head's argmax from an int8 copy (head_screen.c): for rows that use nothing but the
argmax of their logits (greedy, nothing else read), a quarter of the head's bytes per step.

The copy is built once from the float32 head, chunk by chunk; a head that stays in its file
(models/mapped.py) has each chunk's pages released after, so building never holds it whole and a
greedy step afterwards faults in only the rows it computes exactly.
"""

from __future__ import annotations

import ctypes

import torch

from models.mapped import release

from . import head_matmul

BUILD_ROWS = 4096  # head rows per build chunk (32 MiB of float32 at hidden 2048)


class ScreenedHead:
    """logits(x) whose argmax (first index on ties) is always the full head's: the exact float32
    logits (head_matmul's bits) of the rows that could be the largest, -inf for the others."""

    def __init__(self, lib: ctypes.CDLL, weight: torch.Tensor):
        if weight.dtype != torch.float32 or weight.dim() != 2 or not weight.is_contiguous():
            raise ValueError(f"expected a contiguous float32 [vocab, hidden] head, got {weight.dtype} "
                             f"{list(weight.shape)}")
        self.lib, self.weight = lib, weight
        v, k = weight.shape
        self.codes = torch.empty(v, k, dtype=torch.int8)
        self.scale = torch.empty(v, dtype=torch.float32)
        self.bounds = torch.empty(v, 2, dtype=torch.float64)  # per row: see head_screen.c
        norm_max = ctypes.c_double(0.0)
        self.usable = True
        for v0 in range(0, v, BUILD_ROWS):
            chunk = weight[v0:v0 + BUILD_ROWS]
            if self.lib.bitskip_head_screen_build(
                    chunk.data_ptr(), chunk.shape[0], k, self.codes[v0].data_ptr(), self.scale[v0:].data_ptr(),
                    self.bounds[v0].data_ptr(), ctypes.byref(norm_max), torch.get_num_threads()) != 0:
                self.usable = False  # a non-finite weight: nothing can be bounded
            release(chunk)
        self.norm_max = norm_max.value
        self.computed = 0  # exact logits computed so far (candidates, or whole rows not screened)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x float32 [M, hidden] (normed) -> float32 [M, vocab]."""
        x = x.contiguous()
        v, k = self.weight.shape
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k:
            raise ValueError(f"expected float32 [M, {k}], got {x.dtype} {list(x.shape)}")
        if not self.usable:
            self.computed += x.shape[0] * v
            return head_matmul(self.lib, x, self.weight)
        out = torch.empty(x.shape[0], v, dtype=torch.float32)
        n = self.lib.bitskip_head_screened(x.data_ptr(), x.shape[0], k, self.weight.data_ptr(),
                                           self.codes.data_ptr(), self.scale.data_ptr(), self.bounds.data_ptr(),
                                           self.norm_max, v, out.data_ptr(), torch.get_num_threads())
        if n < 0:
            raise MemoryError("screened head: out of memory")
        self.computed += n
        return out
