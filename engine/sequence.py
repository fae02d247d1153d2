"""Request state: what was asked (SamplingParams, exit layer) and what has happened so far."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .exit_policy import ConfidenceRule
from .logprobs import TokenLogprob
from .kv_cache import SequenceKV

if TYPE_CHECKING:
    from .model_runner import Pending
    from .perplexity import Scoring
    from .speculative import Speculation

_ids = itertools.count()


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off.
    Penalties and logit_bias are applied before sampling (engine.sampler.adjust_logits);
    `logprobs` / `prompt_logprobs` ask for that many top alternatives per generated / prompt
    token (0: the chosen token's logprob only; None: none)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()   # generating one of these ends the request ("stop")
    ignore_eos: bool = False
    min_tokens: int = 0                    # EOS, stop_token_ids and stop strings wait for this many
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias); a dict is accepted
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in bias)))
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
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            problems.append(f"min_tokens must be an integer in 0..max_tokens ({self.max_tokens}), "
                            f"got {self.min_tokens!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                problems.append(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not 0 < self.repetition_penalty <= 2:
            problems.append(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}")
        if any(not -100 <= b <= 100 for _, b in self.logit_bias):
            problems.append(f"logit_bias values must be in [-100, 100], got {dict(self.logit_bias)!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or k < 0):
                problems.append(f"{name} must be None or an integer >= 0, got {k!r}")
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
    exit_layer: int                                       # fixed policy: the depth; otherwise L
    confidence: ConfidenceRule | None = None              # set for the confidence policy
    speculation: Speculation | None = None                # set for the speculative policy
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)  # depth each output token ran at
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per output token, if asked for
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=lambda: [None])  # if asked
    text: str = ""                                        # output text, cut before a stop string
    status: Status = Status.WAITING
    finish_reason: str | None = None                      # "stop", "length" or "abort"
    num_computed: int = 0                                 # leading tokens whose KV is cached
    kv: SequenceKV = field(default_factory=SequenceKV)
    pending: Pending | None = None                        # confidence: tokens whose KV stops below L
    scoring: Scoring | None = None                        # a perplexity request: its windows are the prompt
    stop_ids: frozenset[int] | None = None                # EOS and stop_token_ids (the engine's, once)
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
        """The metrics label: the fixed exit layer, "dynamic" (confidence) or "speculative"."""
        if self.speculation:
            return "speculative"
        return "dynamic" if self.confidence else str(self.exit_layer)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def ids(self, start: int, end: int) -> list[int]:
        """all_ids[start:end], without joining the two lists (a decode step's one token)."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p:end - p]
        return self.prompt_ids[start:end] + self.output_ids[:max(0, end - p)]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked for and not all computed yet."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
