"""Perplexity at several exit layers from one forward pass.

Token ids are used as given (DESIGN section 5): the first id is context only and ids 2..n are
scored. Windows: a text that fits the context C is one window. A longer one is scored in windows
of C tokens that advance by C/2: the first window scores all its predictions, each later window
scores only its last C/2 (those not scored before), so every prediction is scored exactly once
and, after the first window, sees at least C/2 tokens of context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .model_runner import ModelRunner, Row


@dataclass
class PerplexityResult:
    tokens: int                 # predictions scored
    nll: dict[int, float]       # exit layer -> mean negative log-likelihood (nats)

    @property
    def perplexity(self) -> dict[int, float]:
        return {k: math.exp(v) for k, v in self.nll.items()}


def windows(num_ids: int, context: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored target index) of each window over ids[0:num_ids]."""
    if num_ids <= context:
        return [(0, num_ids, 1)]
    stride = context // 2
    out = [(0, context, 1)]
    while out[-1][1] < num_ids:
        end = min(out[-1][1] + stride, num_ids)
        out.append((end - context, end, out[-1][1]))
    return out


def perplexity(runner: ModelRunner, ids: list[int], exit_layers: list[int]) -> PerplexityResult:
    """Token-weighted NLL of next-token predictions at each exit layer; each block runs once per
    window and the shared head is applied at every requested exit."""
    layers = sorted(set(exit_layers))
    if len(ids) < 2:
        raise ValueError("perplexity needs at least 2 tokens (the first is context only)")
    total = {k: 0.0 for k in layers}
    scored = 0
    for start, end, first_target in windows(len(ids), runner.config.max_position_embeddings):
        row = Row(ids[start:end], 0, layers[-1], None, {k: "all" for k in layers})
        logits = runner.forward([row])[0].logits
        targets = torch.tensor(ids[first_target:end], device=runner.device)
        # logits at window position p predict ids[start + p + 1]
        first_pred = first_target - 1 - start
        for k in layers:
            logp = torch.log_softmax(logits[k][first_pred:end - start - 1].double(), dim=-1)
            total[k] += float(-logp.gather(1, targets[:, None]).sum())
        scored += len(targets)
    return PerplexityResult(scored, {k: total[k] / scored for k in layers})
