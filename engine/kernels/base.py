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


def cuda_usable() -> bool:
    """A CUDA device is present and Triton imports (the kernels module itself is imported only
    when a CUDA projection is built, so Triton's interpreter switch is read then)."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends() -> list[str]:
    return ["cpu", "cuda"] if cuda_usable() else ["cpu"]


def resolve_backend(backend: str = "auto") -> str:
    """"auto" -> "cuda" when a GPU and Triton are there, else "cpu"; a named backend is checked."""
    if backend == "auto":
        return "cuda" if cuda_usable() else "cpu"
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"unknown backend {backend!r}; available: {available_backends()}")
    return backend


def ternary_linear(parts: list[PackedWeight], activation_bits: int, hadamard: bool,
                   backend: str = "cpu", device: str | None = None) -> TernaryLinear:
    """Build one (possibly fused) projection on `backend` ("cpu", "cuda" or "auto").

    `device` is for the cuda backend only: default "cuda"; tests pass "cpu" to run the Triton
    kernels under TRITON_INTERPRET=1.
    """
    backend = resolve_backend(backend)
    if backend == "cpu":
        from .cpu import CpuTernaryLinear
        return CpuTernaryLinear(parts, activation_bits, hadamard)
    from .cuda import CudaTernaryLinear
    return CudaTernaryLinear(parts, activation_bits, hadamard, device=device or "cuda")
