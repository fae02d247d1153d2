"""The one interface every ternary-projection backend implements."""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch


class PackedWeight(NamedTuple):
    """One projection as stored: 2-bit codes uint8 [N, K / 4] and its float32 scale gamma."""

    qweight: torch.Tensor
    scale: float


class TernaryLinear(Protocol):
    """float32 activations [T, K_logical] -> float32 outputs [T, N].

    A projection built from several PackedWeights (q/k/v, gate/up) computes them in one call and
    returns their outputs side by side, in order.
    """

    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def accumulate(self, codes: torch.Tensor) -> torch.Tensor:
        """Integer codes int8 [T, K] -> exact int32 dot products with the ternary weight [T, N]."""
        ...


def available_backends() -> list[str]:
    return ["cpu"]


def ternary_linear(parts: list[PackedWeight], activation_bits: int, hadamard: bool,
                   backend: str = "cpu") -> TernaryLinear:
    """Build one (possibly fused) projection on `backend`."""
    if backend == "cpu":
        from .cpu import CpuTernaryLinear
        return CpuTernaryLinear(parts, activation_bits, hadamard)
    raise ValueError(f"unknown backend {backend!r}; available: {available_backends()}")
