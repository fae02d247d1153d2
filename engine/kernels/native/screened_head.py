"""The float32 head's argmax from an 8-bit copy read in two levels (head_screen.c, head_codes.h):
for rows that use nothing but the argmax of their logits (greedy, nothing else read), 3/16 of the
head's bytes per step (the top 6 bits of every code) and the low 2 bits of the few rows that
could still be the argmax.

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
        self.padded = -(-k // 64) * 64
        self.codes = torch.empty(v * self.padded, dtype=torch.uint8)  # both levels: head_codes.h
        self.scale = torch.empty(v, dtype=torch.float32)
        self.bounds = torch.empty(v + 1, 4, dtype=torch.float64)  # per row and level: see head_screen.c
        norm_max = ctypes.c_double(0.0)
        self.usable = True
        for v0 in range(0, v, BUILD_ROWS):
            chunk = weight[v0:v0 + BUILD_ROWS]
            if self.lib.bitskip_head_screen_build(
                    chunk.data_ptr(), v0, chunk.shape[0], k, v, self.codes.data_ptr(), self.scale.data_ptr(),
                    self.bounds.data_ptr(), ctypes.byref(norm_max), torch.get_num_threads()) != 0:
                self.usable = False  # a non-finite weight: nothing can be bounded
            release(chunk)
        self.bounds[v] = self.bounds[:v].max(0).values  # the widest intervals, for a first test
        self.norm_max = norm_max.value
        self.computed = 0  # exact logits computed so far (candidates, or whole rows not screened)

    def levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes c [vocab, hidden] each level approximates the head with (weight ~ scale * c):
        level 1 the top 6 bits of each code with the low 2 at their mean, level 2 the int8 code."""
        v, k = self.weight.shape
        kp = self.padded
        one = self.codes[:v * kp * 3 // 4].view(v, kp // 64, 48).long()
        two = self.codes[v * kp * 3 // 4:].view(v, kp // 64, 16).long()
        fields = lambda b: torch.cat([(b >> (2 * f)) & 3 for f in range(4)], dim=-1)  # noqa: E731
        six, nib = one[..., :32], one[..., 32:]
        top = torch.cat([nib & 15, nib >> 4], dim=-1) * 4 + (six >> 6)
        hi = torch.cat([six & 63, top], dim=-1).reshape(v, kp)[:, :k]
        return (4 * hi - 126.5).double(), (4 * hi + fields(two).reshape(v, kp)[:, :k] - 128).double()

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
