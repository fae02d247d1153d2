"""2-bit packing of ternary weights (DESIGN section 3): code = t + 1, four codes a byte, element k
of a row at byte k // 4, bits 2*(k % 4) .. 2*(k % 4) + 1."""

from __future__ import annotations

import torch

_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """Ternary values [N, K] (any dtype holding -1, 0, 1; K % 4 == 0) -> uint8 [N, K / 4]."""
    n, k = t.shape
    if k % 4:
        raise ValueError(f"in-features {k} is not a multiple of 4")
    codes = (t.to(torch.int16) + 1).to(torch.uint8).reshape(n, k // 4, 4)
    return (codes << _SHIFTS).sum(dim=-1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 4] -> raw 2-bit codes uint8 [N, K] (3 marks a corrupt byte)."""
    n, kb = packed.shape
    return ((packed.unsqueeze(-1) >> _SHIFTS) & 3).reshape(n, kb * 4)


def unpack_ternary(packed: torch.Tensor, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """uint8 [N, K / 4] -> ternary values [N, K] in `dtype`."""
    return (unpack_codes(packed).to(torch.int8) - 1).to(dtype)


def has_invalid_code(packed: torch.Tensor) -> bool:
    """True when some 2-bit field holds 3, which no ternary value encodes."""
    return bool((unpack_codes(packed) == 3).any())
