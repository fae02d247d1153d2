"""Picks every row's token in one pass on the logits' device (the GPU backends' sampler).

Greedy, temperature, top-k and top-p as engine/sampler.py, for the whole batch in tensor
operations and one transfer of the chosen ids to the host (no sync per row). The draw is an
exponential race, argmax(p / E) with E ~ Exp(1), which picks token i with probability p_i; the
E's come from a counter-based hash of (request seed, token index, vocabulary index), so a seeded
request gives the same tokens in any batch and after a preemption. (Its tokens are not those of
the CPU sampler's torch.Generator stream: the two samplers agree in distribution, not in draws.)
"""

from __future__ import annotations

import torch

from .sequence import SamplingParams

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    """A 64-bit pattern as the int64 torch holds it."""
    c &= _MASK64
    return c - (1 << 64) if c >> 63 else c


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer: int64 arithmetic wraps modulo 2^64 on CPU and CUDA alike."""
    z = z + _signed(0x9E3779B97F4A7C15)
    z = (z ^ _shr(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _shr(z, 27)) * _signed(0x94D049BB133111EB)
    return z ^ _shr(z, 31)


def uniforms(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """float64 [B, vocab] in (0, 1): a function of (seed, step, index) only."""
    key = _mix(_mix(seeds) + steps)
    z = _mix(key[:, None] + torch.arange(vocab, device=seeds.device)[None, :])
    return _shr(z, 11).double() * 2.0 ** -53 + 2.0 ** -54


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int],
                 steps: list[int]) -> list[int]:
    """logits [B, vocab] (row i for a request with params[i], seed seeds[i], drawing its token
    number steps[i]) -> B token ids."""
    dev = logits.device
    b, vocab = logits.shape
    greedy = logits.argmax(-1)
    if all(p.temperature == 0 for p in params):
        return greedy.tolist()
    temps = torch.tensor([p.temperature or 1.0 for p in params], dtype=torch.float64, device=dev)
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64, device=dev)
    x = logits.double() / temps[:, None]
    ranked, order = torch.sort(x, dim=-1, descending=True)
    kth = ranked.gather(1, (top_k - 1)[:, None])
    ranked = ranked.masked_fill(ranked < kth, float("-inf"))
    probs = torch.softmax(ranked, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
    outside = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p < 1.0)[:, None]
    outside |= ranked == float("-inf")
    drop = torch.zeros_like(outside).scatter(1, order, outside)
    probs = torch.softmax(x.masked_fill(drop, float("-inf")), dim=-1)
    u = uniforms(torch.tensor([_signed(s) for s in seeds], device=dev),
                 torch.tensor(steps, device=dev), vocab)
    drawn = (probs / -torch.log(u)).argmax(-1)
    sampled = torch.tensor([p.temperature > 0 for p in params], device=dev)
    return torch.where(sampled, drawn, greedy).tolist()
