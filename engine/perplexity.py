"""Perplexity at several exit layers.

Token ids are used as given (DESIGN section 5): the first id is context only and ids 2..n are
scored. Windows: a text that fits the context C is one window. A longer one is scored in windows
of C tokens that advance by C/2: the first window scores all its predictions, each later window
scores only its last C/2 (those not scored before), so every prediction is scored exactly once
and, after the first window, sees at least C/2 tokens of context.

`Scoring` is one request's state. The engine runs its windows as prompt chunks through the
scheduler (under the per-step token budget, beside other requests' decodes) and hands it each
chunk's logits; `perplexity()` runs each window in one forward, offline. Either way every
prediction is added once, however the windows are cut into chunks or restarted.
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


class Scoring:
    """Token-weighted NLL of next-token predictions at each exit layer, window by window; each
    block runs once per window position and the shared head is applied at every requested exit."""

    def __init__(self, ids: list[int], exit_layers: list[int], context: int):
        if len(ids) < 2:
            raise ValueError("perplexity needs at least 2 tokens (the first is context only)")
        self.ids = ids
        self.layers = sorted(set(exit_layers))
        self.windows = windows(len(ids), context)
        self.window = 0          # the window running now
        self.next_target = 1     # ids before this index are scored
        self.total = {k: 0.0 for k in self.layers}

    @property
    def depth(self) -> int:
        return self.layers[-1]

    @property
    def heads(self) -> dict[int, str]:
        return {k: "all" for k in self.layers}

    def window_ids(self) -> list[int]:
        start, end, _ = self.windows[self.window]
        return self.ids[start:end]

    def add(self, offset: int, logits: dict[int, torch.Tensor]) -> None:
        """Logits of the current window's positions offset, offset + 1, ... (row i predicts
        window token offset + i + 1). Predictions scored before are skipped."""
        start, end, first = self.windows[self.window]
        n = logits[self.depth].shape[0]
        lo = max(self.next_target, first, start + offset + 1)  # targets, as indices into ids
        hi = min(end, start + offset + n + 1)
        if hi <= lo:
            return
        targets = torch.tensor(self.ids[lo:hi], device=logits[self.depth].device)
        rows = slice(lo - 1 - start - offset, hi - 1 - start - offset)
        for k in self.layers:
            logp = torch.log_softmax(logits[k][rows].double(), dim=-1)
            self.total[k] += float(-logp.gather(1, targets[:, None]).sum())
        self.next_target = hi

    def next_window(self) -> bool:
        """Move on to the next window; False when every window has run."""
        self.window += 1
        return self.window < len(self.windows)

    def result(self) -> PerplexityResult:
        scored = self.next_target - 1
        return PerplexityResult(scored, {k: self.total[k] / scored for k in self.layers})


def perplexity(runner: ModelRunner, ids: list[int], exit_layers: list[int]) -> PerplexityResult:
    """Offline: each window in one forward, without a KV cache."""
    scoring = Scoring(ids, exit_layers, runner.config.max_position_embeddings)
    while True:
        row = Row(scoring.window_ids(), 0, scoring.depth, None, scoring.heads)
        scoring.add(0, runner.forward([row])[0].logits)
        if not scoring.next_window():
            return scoring.result()
