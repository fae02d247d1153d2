"""The BitLinear quantizers of DESIGN section 2, shared by the reference model and every backend.

All of them are computed in float32 in the order the design fixes, so independent code picks the
same integer codes. Rounding is torch.round (half to even). Gradients pass straight through.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-5


class _RoundClamp(torch.autograd.Function):
    """clamp(round(x), lo, hi) with a straight-through gradient."""

    @staticmethod
    def forward(ctx, x, lo, hi):
        return torch.clamp(torch.round(x), lo, hi)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def round_clamp(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    if x.requires_grad and torch.is_grad_enabled():
        return _RoundClamp.apply(x, lo, hi)
    return torch.clamp(torch.round(x), lo, hi)  # same values, without autograd's overhead


def activation_qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """gamma = max(mean(|W|), eps) as a float32 scalar.

    The mean is accumulated in float64 and rounded once, so it does not depend on how many
    threads summed it.
    """
    return w.detach().double().abs().mean().float().clamp_min(EPS)


def ternarize(w: torch.Tensor, rule: str = "divide") -> tuple[torch.Tensor, torch.Tensor]:
    """Latent weight -> (ternary codes in {-1, 0, 1} as float32, gamma).

    rule "divide" is DESIGN's round(W / gamma); "reciprocal" is BitNet b1.58's own
    round(W * (1 / gamma)) (its training code and transformers), used for that format. The two
    differ only where W / gamma lands within a rounding error of +-0.5.
    """
    w = w.float()
    gamma = weight_scale(w)
    if rule == "reciprocal":
        return round_clamp(w * (1.0 / gamma), -1.0, 1.0), gamma
    if rule != "divide":
        raise ValueError(f"rule must be 'divide' or 'reciprocal', got {rule!r}")
    return round_clamp(w / gamma, -1.0, 1.0), gamma


def quantize_activations(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax quantization -> (integer codes as float32, scale s of shape [..., 1])."""
    q_max = activation_qmax(bits)
    s = x.detach().abs().amax(dim=-1, keepdim=True).clamp_min(EPS)
    return round_clamp(x * (q_max / s), -q_max, q_max), s


def hadamard_transform(x: torch.Tensor, size: int | None = None, normalized: bool = True) -> torch.Tensor:
    """x @ H_n / sqrt(n): the orthonormal Walsh-Hadamard transform in Sylvester order
    (`normalized` False: x @ H_n, the +-1 transform of the public BitSkip code's first generation).

    The last dimension is zero-padded to `size` (default: the next power of two). A butterfly of
    elementwise adds keeps the result independent of the batch shape, which a matmul would not.
    """
    k = x.shape[-1]
    n = size or 1 << (k - 1).bit_length()
    if n != k:
        x = torch.nn.functional.pad(x, (0, n - k))
    lead = x.shape[:-1]
    h = 1
    while h < n:
        pairs = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x * (1.0 / math.sqrt(n)) if normalized else x
