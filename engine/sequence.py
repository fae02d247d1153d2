"""Request state: what was asked (SamplingParams, exit layer) and what has happened so far."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .exit_policy import ConfidenceRule
from .kv_cache import SequenceKV

if TYPE_CHECKING:
    from .model_runner import Pending

_ids = itertools.count()


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        problems = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop must be non-empty strings, got {list(self.stop)!r}")
        if problems:
            raise ValueError("; ".join(problems))


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    exit_layer: int                                       # fixed policy: the depth; confidence: L
    confidence: ConfidenceRule | None = None              # set for the confidence policy
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)  # depth each output token ran at
    text: str = ""                                        # output text, cut before a stop string
    status: Status = Status.WAITING
    finish_reason: str | None = None                      # "stop", "length" or "abort"
    num_computed: int = 0                                 # leading tokens whose KV is cached
    kv: SequenceKV = field(default_factory=SequenceKV)
    pending: Pending | None = None                        # confidence: tokens whose KV stops below L
    arrival_time: float = field(default_factory=time.perf_counter)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self):
        self.generator = torch.Generator()
        if self.params.seed is not None:
            self.generator.manual_seed(self.params.seed)
        else:
            self.generator.seed()

    @property
    def exit_label(self) -> str:
        """The metrics label: the fixed exit layer, or "dynamic" for the confidence policy."""
        return "dynamic" if self.confidence else str(self.exit_layer)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
