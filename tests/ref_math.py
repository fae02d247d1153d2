"""An independent float32 evaluation of the math in CHECKPOINTS.md (public BitSkip training code),
written from that page alone. It shares no code with models/ or engine/, so a test comparing
the engine with it checks our reading of the page, not the implementation against itself.

Works on a state dict in that code's own tensor names (no `model.` prefix).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ternary(w: torch.Tensor) -> torch.Tensor:
    """gamma * T, with gamma = max(mean|W|, 1e-6) and the half-gamma thresholds, computed in the
    stored dtype of W."""
    gamma = w.abs().mean().clamp_min(1e-6)
    t = (w > 0.5 * gamma).float() - (w < -0.5 * gamma).float()
    return gamma.float() * t


def quant(x: torch.Tensor, bits: int) -> torch.Tensor:
    q = 2 ** (bits - 1) - 1
    s = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)
    return torch.clamp(torch.round(x * q / s), -q, q) * s / q


def hadamard_matrix(n: int) -> torch.Tensor:
    """Sylvester's +-1 matrix (unnormalized), built by doubling."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x) ** 2


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """x [T, heads, hd], rotate-half layout, positions 0..T-1."""
    t, _, hd = x.shape
    freq = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.arange(t).float()[:, None] * freq[None]
    cos, sin = torch.cat([ang, ang], -1).cos()[:, None], torch.cat([ang, ang], -1).sin()[:, None]
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def attention(q, k, v, causal: bool) -> torch.Tensor:
    """q [T, H, hd]; k, v [T, Hkv, hd]; query head j reads KV head j // (H / Hkv)."""
    t, heads, hd = q.shape
    group = heads // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
    if causal:
        scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, heads * hd)


class RefModel:
    """cfg: family ("bitlinear"/"hadamard"), generation (1/2), heads, kv_heads, bits, eps, theta."""

    def __init__(self, sd: dict[str, torch.Tensor], cfg: dict):
        self.sd, self.cfg = sd, cfg

    def w(self, name: str) -> torch.Tensor:
        return self.sd[name].float()

    def proj(self, x: torch.Tensor, name: str, attn: bool) -> torch.Tensor:
        c = self.cfg
        weight = ternary(self.sd[f"{name}.weight"])
        if c["family"] == "bitlinear":
            return relu2(quant(x, c["bits"]) @ weight.T)
        x = F.layer_norm(x, x.shape[-1:], self.w(f"{name}.layer_norm.weight"),
                         self.w(f"{name}.layer_norm.bias"), c["eps"])
        if c["generation"] == 1:
            bits = 4 if attn else c["bits"]
            hk, hn = hadamard_matrix(weight.shape[1]), hadamard_matrix(weight.shape[0])
            return ((quant(x, bits) @ hk) @ weight.T) @ hn
        k = weight.shape[1]
        x = F.pad(x, (0, k - x.shape[-1])) @ hadamard_matrix(k) / math.sqrt(k)
        return relu2(quant(x, c["bits"]) @ weight.T)

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.w(f"{name}.weight"), self.w(f"{name}.bias"), self.cfg["eps"])

    def block(self, h: torch.Tensor, i: int) -> torch.Tensor:
        c, p = self.cfg, f"layers.{i}"
        causal = c["generation"] == 2
        a = F.layer_norm(h, h.shape[-1:], eps=1e-5) if c["family"] == "bitlinear" else h
        t, hd = h.shape[0], h.shape[1] // c["heads"]
        q = self.proj(a, f"{p}.self_attn.q_proj", True).view(t, c["heads"], hd)
        k = self.proj(a, f"{p}.self_attn.k_proj", True).view(t, c["kv_heads"], hd)
        v = self.proj(a, f"{p}.self_attn.v_proj", True).view(t, c["kv_heads"], hd)
        if c["family"] == "bitlinear":
            q, k = rope(q, c["theta"]), rope(k, c["theta"])
        o = self.proj(attention(q, k, v, causal), f"{p}.self_attn.o_proj", True)
        h = self.norm(h + o, f"{p}.self_attn_norm.norm")
        up = self.proj(h, f"{p}.feed_forward.up_proj", False)
        f = self.proj(relu2(up), f"{p}.feed_forward.down_proj", False)
        return self.norm(h + f, f"{p}.feed_forward_norm.norm")

    def logits(self, ids: list[int], exit_layers: list[int]) -> dict[int, torch.Tensor]:
        """Logits [T, V] at each exit k (blocks 1..k, our 1-based numbering)."""
        ids_t = torch.tensor(ids)
        h = self.w("embed_tokens.weight")[ids_t] + self.w("embed_positions.weight")[: len(ids)]
        out = {}
        for i in range(max(exit_layers)):
            h = self.block(h, i)
            if i + 1 in exit_layers:
                out[i + 1] = self.norm(h, "layer_norm") @ self.w("lm_head.weight").T
        return out

    def greedy(self, prompt: list[int], n: int, exit_layer: int) -> list[int]:
        """Greedy tokens, recomputing the whole sequence for each one (no cache)."""
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(self.logits(ids, [exit_layer])[exit_layer][-1].argmax()))
        return ids[len(prompt):]

    def perplexity(self, ids: list[int], exit_layer: int) -> float:
        logits = self.logits(ids, [exit_layer])[exit_layer][:-1].double()
        nll = -logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None]).mean()
        return math.exp(float(nll))
