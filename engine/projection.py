"""What some model families put around the ternary product of a projection: an affine LayerNorm
of each projection's own input, an activation on its output, and the first-generation Hadamard
"sandwich" of the public BitSkip code (CHECKPOINTS.md). The runner calls a Projection exactly as
it calls a backend's TernaryLinear, so the block code does not change with the family."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.functional import activation, layer_norm
from models.packing import unpack_ternary
from models.quant import activation_qmax, hadamard_transform, quantize_activations

from .kernels import PackedWeight, TernaryLinear


class Projection:
    """`parts` side by side (q/k/v), each on its own LayerNorm of x when `norms` are given (then
    they cannot share one quantization, so each part is its own product); `act` on the output."""

    def __init__(self, parts: list[TernaryLinear], norms: list[tuple[torch.Tensor, torch.Tensor]] | None,
                 eps: float, act: str):
        self.parts, self.norms, self.eps, self.act = parts, norms, eps, act
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.norms is None:
            y = self.parts[0](x)
        else:
            y = torch.cat([p(layer_norm(x, w, b, self.eps)) for p, (w, b) in zip(self.parts, self.norms)], -1)
        return activation(y, self.act)


class SandwichTernaryLinear:
    """y = FWHT_N(gamma T FWHT_K(quant(x))) with the unnormalized +-1 transforms (first-generation
    HBitLinear). FWHT_K of the integer codes is integer-valued but outgrows int8, so the product
    runs as a float32 matmul on exact integers rather than through an int8 backend."""

    def __init__(self, part: PackedWeight, activation_bits: int, device: torch.device | str = "cpu"):
        self.bits, self.qmax = activation_bits, activation_qmax(activation_bits)
        self.weight = unpack_ternary(part.qweight, torch.float32).to(device)
        self.scale = part.scale
        self.out_features, self.in_features = self.weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        q, s = quantize_activations(x, self.bits)
        acc = F.linear(hadamard_transform(q, normalized=False), self.weight)
        return hadamard_transform(acc * (s / self.qmax) * self.scale, normalized=False)
