"""Turns one row of logits into a token: greedy, or temperature with top-k and top-p filters,
drawn from the request's own generator so that a seed gives the same tokens in any batch."""

from __future__ import annotations

import torch

from .sequence import SamplingParams


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits [vocab] -> token id."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits.double() / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        outside = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.index_fill(0, order[outside], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
