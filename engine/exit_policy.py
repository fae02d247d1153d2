"""Exit policies. A fixed exit is just a depth; the confidence policy decides per token, at exit
points, from the shared head's logits of the token being generated."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MEASURES = ("probability", "margin")


@dataclass(frozen=True)
class ConfidenceRule:
    """Leave at the first exit point >= min_exit_layer where the measure reaches `threshold`.

    probability: the top softmax probability; margin: top-1 minus top-2 probability.
    """

    threshold: float
    exit_points: tuple[int, ...]
    min_exit_layer: int = 1
    measure: str = "probability"

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")
        if self.measure not in MEASURES:
            raise ValueError(f"confidence_measure must be one of {list(MEASURES)}, got {self.measure!r}")

    def checks(self, layer: int) -> bool:
        return layer >= self.min_exit_layer and layer in self.exit_points

    def first_exit(self, num_layers: int) -> int:
        """The shallowest layer a token can leave at (L when no exit point qualifies)."""
        return next((p for p in self.exit_points if p >= self.min_exit_layer), num_layers)

    def confidence(self, logits: torch.Tensor) -> float:
        probs = torch.softmax(logits.double(), dim=-1)
        if self.measure == "probability":
            return float(probs.max())
        top2 = torch.topk(probs, 2).values
        return float(top2[0] - top2[1])

    def accepts(self, logits: torch.Tensor) -> bool:
        return self.confidence(logits) >= self.threshold
