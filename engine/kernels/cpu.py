"""CPU backend: exact int8 x int8 -> int32 products through torch._int_mm.

The 2-bit codes are re-laid once at load as int8 [N, K] (DESIGN section 3 allows a backend its
own layout): on a CPU, unpacking every step costs more than the matmul itself.
"""

from __future__ import annotations

import torch

from models.packing import unpack_ternary
from models.quant import activation_qmax, hadamard_transform, quantize_activations

from .base import PackedWeight


class CpuTernaryLinear:
    def __init__(self, parts: list[PackedWeight], activation_bits: int, hadamard: bool):
        self.bits = activation_bits
        self.qmax = activation_qmax(activation_bits)
        self.hadamard = hadamard
        self.weight = torch.cat([unpack_ternary(p.qweight) for p in parts]).contiguous()
        self.scale = torch.cat([torch.full((p.qweight.shape[0],), p.scale, dtype=torch.float32)
                                for p in parts])
        self.out_features, self.in_features = self.weight.shape

    def accumulate(self, codes: torch.Tensor) -> torch.Tensor:
        return torch._int_mm(codes, self.weight.t())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.hadamard:
            x = hadamard_transform(x, self.in_features)
        q, s = quantize_activations(x, self.bits)
        acc = self.accumulate(q.to(torch.int8))
        # Same float ops, in the same order, as models.model.BitLinear: bit-identical outputs.
        return acc.float() * (s / self.qmax) * self.scale
