"""Float operations of the BitSkip block, shared by the reference model and the engine.

Quantized projections make tiny float differences visible: one flipped rounding changes an
integer code. So every reduction here accumulates in float64 and rounds once to float32. The
result then does not depend on the batch shape, the thread count or a KV cache, and the engine
reproduces the reference bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, in float32 (the mean accumulated in float64)."""
    mean_sq = x.double().square().mean(dim=-1, keepdim=True).float()
    # sqrt of a float32 taken in float64 and rounded once is the correctly rounded float32 sqrt,
    # which some CPU builds' vectorized float32 sqrt is not (GPUs and our kernels are).
    return x / torch.sqrt((mean_sq + eps).double()).float() * weight


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) * weight + bias (no affine when weight is None), in float64
    rounded once to float32."""
    xd = x.double()
    centred = xd - xd.mean(dim=-1, keepdim=True)
    y = centred / torch.sqrt(centred.square().mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.double() + bias.double()
    return y.float()


# Activations by config name (models.config.HIDDEN_ACTS, PROJECTION_ACTS), on float64 inputs.
ACTIVATIONS = {
    "none": lambda x: x,
    "silu": F.silu,
    "relu2": lambda x: F.relu(x).square(),  # ReLU squared (BitNet b1.58, the public BitSkip code)
}


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """ACTIVATIONS[name](x) in float64, rounded once to float32."""
    return x if name == "none" else ACTIVATIONS[name](x.double()).float()


def gated_activation(gate: torch.Tensor, up: torch.Tensor, hidden_act: str = "silu") -> torch.Tensor:
    """act(gate) * up (silu: SwiGLU), evaluated in float64 so vectorized and scalar paths agree."""
    return (ACTIVATIONS[hidden_act](gate.double()) * up.double()).float()


def rope_tables(num_positions: int, head_dim: int, theta: float,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [num_positions, head_dim] for the rotate-half layout (computed in float64)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    angles = torch.arange(num_positions, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, heads, head_dim]; cos, sin [T, head_dim] for the positions of x."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention in float64, rounded to float32 once.

    q [B, Tq, H, D]; k, v [B, Tk, Hkv, D]; mask [B or 1, Tq, Tk] bool, True where a query may
    attend. Query head j reads KV head j // (H / Hkv). Returns [B, Tq, H * D].
    """
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    group = h // hkv
    # The queries of a KV head's group share its keys: fold them into the query axis
    # ([B, Hkv, group * Tq, D]) instead of copying K and V once per query head.
    qd = q.double().view(b, tq, hkv, group, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, group * tq, d)
    kd = k.double().transpose(1, 2)                                   # [B, Hkv, Tk, D]
    vd = v.double().transpose(1, 2)
    scores = (qd @ kd.transpose(-1, -2)) * (d ** -0.5)                # [B, Hkv, group * Tq, Tk]
    allowed = mask[:, None, None].expand(mask.shape[0], 1, group, tq, mask.shape[-1])
    scores = scores.masked_fill(~allowed.reshape(mask.shape[0], 1, group * tq, -1), float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vd                          # [B, Hkv, group * Tq, D]
    return out.view(b, hkv, group, tq, d).permute(0, 3, 1, 2, 4).reshape(b, tq, h * d).float()


def causal_attention_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Float32 causal GQA attention for training (fast, not batch-invariant); same layout as
    `attention`."""
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(group, dim=2).transpose(1, 2),
        v.repeat_interleave(group, dim=2).transpose(1, 2), is_causal=True)
    return out.transpose(1, 2).reshape(b, t, h * d)


def causal_mask(num_queries: int, num_keys: int, device: torch.device | str | None = None) -> torch.Tensor:
    """[1, Tq, Tk] mask for queries that are the last Tq of Tk positions."""
    offset = num_keys - num_queries
    q_pos = torch.arange(num_queries, device=device)[:, None] + offset
    return (torch.arange(num_keys, device=device)[None, :] <= q_pos)[None]
