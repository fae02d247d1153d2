"""CPU backend: exact int8 x ternary -> int32 products, then the float32 epilogue of BitLinear.

Two ways to the same integers:
- "native": the C kernel of engine/kernels/native on the packed 2-bit weights as loaded (2 bits a
  weight in memory, no copy; AVX2 with a portable fallback, threads over output rows);
- "torch": torch._int_mm on the codes re-laid once at load as int8 [N, K] (4x the bytes), for a
  machine without a C compiler.
"auto" takes the native kernel when it builds.
"""

from __future__ import annotations

from typing import Literal

import torch

from models.packing import unpack_ternary
from models.quant import activation_qmax, hadamard_transform, quantize_activations

from . import native
from .base import PackedWeight

CpuKernel = Literal["auto", "native", "torch"]


class CpuTernaryLinear:
    def __init__(self, parts: list[PackedWeight], activation_bits: int, hadamard: bool,
                 kernel: CpuKernel = "auto"):
        self.bits = activation_bits
        self.qmax = activation_qmax(activation_bits)
        self.hadamard = hadamard
        self.scale = torch.cat([torch.full((p.qweight.shape[0],), p.scale, dtype=torch.float32)
                                for p in parts])
        lib = native.library() if kernel != "torch" else None
        if kernel == "native" and lib is None:
            raise RuntimeError("the native CPU kernel is not available (see the log for why)")
        if lib is not None:
            self.kernel = "native"
            self._matmul = native.PackedMatmul(lib, [p.qweight for p in parts])
            self.in_features = self._matmul.in_features
        else:
            self.kernel = "torch"
            self._weight = torch.cat([unpack_ternary(p.qweight) for p in parts]).contiguous()
            self._matmul = lambda codes: torch._int_mm(codes, self._weight.t())
            self.in_features = self._weight.shape[1]
        self.out_features = self.scale.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        """The ternary weight, int8 [N, K] (unpacked on demand from the native kernel's packed
        parts: for tests and tools, never on the serving path)."""
        if self.kernel == "torch":
            return self._weight
        return torch.cat([unpack_ternary(p) for p in self._matmul.parts])

    def accumulate(self, codes: torch.Tensor) -> torch.Tensor:
        return self._matmul(codes)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard:
            x = hadamard_transform(x, self.in_features)
        q, s = quantize_activations(x, self.bits)
        acc = self.accumulate(q.to(torch.int8))
        # Same float ops, in the same order, as models.model.BitLinear: bit-identical outputs.
        return acc.float() * (s / self.qmax) * self.scale
