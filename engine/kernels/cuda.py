"""CUDA backend: packed ternary weights times int8 activations in Triton kernels.

The weights stay packed at 2 bits per weight on the device (re-laid once at load into the grouped
layout of engine.kernels.triton_kernels; no unpacked copy). A call quantizes the activations per
token in one kernel (optionally fused with the RMSNorm before the projection, and with the
Hadamard rotation of V2/V3), then runs one matrix kernel for the whole fused projection (q/k/v or
gate/up side by side): the tensor-core prefill kernel, or the GEMV-shaped decode kernel when the
call has at most `decode_max_m` rows. Both produce the exact int32 accumulators of the CPU
backend's torch._int_mm, and the same float32 epilogue acc * (s / Q) * gamma.

With `device="cpu"` and TRITON_INTERPRET=1 set before the kernels module is imported, the same
code runs under Triton's interpreter (for tests on machines without a GPU).
"""

from __future__ import annotations

import os

import torch

from models.quant import activation_qmax

from .base import PackedWeight

# Rows at or below which a call uses the decode-shaped kernel, and which one. In a running engine
# (paper-1b, batch 1, CUDA graphs, H200; bench/gpu_profile.py) `decode` took 0.345 ms of a step's
# 96 projections, `decode_bytes` 0.505 ms and `prefill` 1.21 ms (standalone timings in
# bench/gpu_kernels.py rank them differently: launch overhead there, not in a graph).
# BITSKIP_DECODE_KERNEL=decode|decode_bytes|prefill and BITSKIP_DECODE_MAX_M override them.
DEFAULT_DECODE_MAX_M = int(os.environ.get("BITSKIP_DECODE_MAX_M", "4"))
DECODE_KERNEL = os.environ.get("BITSKIP_DECODE_KERNEL", "decode")
if DECODE_KERNEL not in ("decode", "decode_bytes", "prefill"):
    raise ValueError(f"BITSKIP_DECODE_KERNEL must be decode, decode_bytes or prefill, got {DECODE_KERNEL!r}")


class CudaTernaryLinear:
    def __init__(self, parts: list[PackedWeight], activation_bits: int, hadamard: bool,
                 device: str | torch.device = "cuda", decode_max_m: int = DEFAULT_DECODE_MAX_M):
        from . import triton_kernels as tk  # imported late: Triton reads TRITON_INTERPRET then

        self._tk = tk
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("backend 'cuda' needs a CUDA device; none is available")
            if tk.INTERPRETED:
                raise RuntimeError("TRITON_INTERPRET=1 is set: the Triton kernels run on CPU tensors only")
        elif not tk.INTERPRETED:
            raise RuntimeError(f"device {self.device} needs Triton's interpreter: set TRITON_INTERPRET=1 "
                               "before engine.kernels.triton_kernels is first imported")
        if not parts:
            raise ValueError("a projection needs at least one PackedWeight")
        widths = {p.qweight.shape[1] for p in parts}
        if len(widths) != 1:
            raise ValueError(f"fused parts disagree on in-features: {sorted(w * 4 for w in widths)}")
        self.bits = activation_bits
        self.qmax = activation_qmax(activation_bits)
        self.hadamard = hadamard
        self.in_features = 4 * widths.pop()
        self.out_features = sum(p.qweight.shape[0] for p in parts)
        if not 1 <= decode_max_m <= tk.DECODE_MAX_M:
            raise ValueError(f"decode_max_m must be in 1..{tk.DECODE_MAX_M}")
        self.decode_max_m = decode_max_m
        if hadamard and self.in_features & (self.in_features - 1):
            raise ValueError(f"Hadamard projections take a power-of-two width, got {self.in_features}")
        # Re-lay part by part on the host, so the only int8 temporary is one part's, in host memory.
        self.qweight = torch.cat([tk.relayout_packed(p.qweight.to("cpu", torch.uint8), self.in_features)
                                  for p in parts]).to(self.device).contiguous()
        self.scale = torch.cat([torch.full((p.qweight.shape[0],), p.scale, dtype=torch.float32)
                                for p in parts]).to(self.device)

    # -- pieces, exposed for tests and the runner ------------------------------------------------
    def quantize(self, x: torch.Tensor, norm_weight: torch.Tensor | None = None,
                 eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 [T, K_logical] -> (int8 codes [T, in_features], float32 scales [T, 1]).

        `norm_weight` fuses rms_norm(x, norm_weight, eps) in front; Hadamard projections rotate
        (zero-padding to in_features) before quantizing.
        """
        return self._tk.quantize_rows(x, self.qmax, self.in_features, self.hadamard,
                                      norm_weight=norm_weight, eps=eps)

    def pick_kernel(self, rows: int) -> str:
        return DECODE_KERNEL if rows <= self.decode_max_m else "prefill"

    def accumulate(self, codes: torch.Tensor, kernel: str = "auto",
                   out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
        """int8 codes [T, K] -> exact int32 dot products with the ternary weight [T, N]."""
        kernel = self.pick_kernel(codes.shape[0]) if kernel == "auto" else kernel
        return self._tk.ternary_matmul(codes, self.qweight, self.in_features, kernel=kernel,
                                       out=out, config=config)

    def matmul(self, codes: torch.Tensor, scales: torch.Tensor, kernel: str = "auto",
               out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
        """int8 codes [T, K] and their scales [T, 1] -> float32 acc * (s / Q) * gamma [T, N]."""
        kernel = self.pick_kernel(codes.shape[0]) if kernel == "auto" else kernel
        return self._tk.ternary_matmul(codes, self.qweight, self.in_features, scales=scales,
                                       gamma=self.scale, qmax=self.qmax, kernel=kernel, out=out,
                                       config=config)

    # -- the TernaryLinear protocol -------------------------------------------------------------
    def __call__(self, x: torch.Tensor, norm_weight: torch.Tensor | None = None,
                 eps: float = 1e-5) -> torch.Tensor:
        codes, scales = self.quantize(x, norm_weight, eps)
        return self.matmul(codes, scales)

    def packed_bytes(self) -> int:
        """Device bytes of the weights (2 bits each, plus the in-feature padding to 128)."""
        return self.qweight.numel() * self.qweight.element_size()
