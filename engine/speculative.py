"""Self-speculative decoding: draft with blocks 1..E and the shared head at E, verify with blocks
E+1..L over every drafted position at once, keep the longest prefix the full model agrees with
and the full model's own next token. The output is the full model's.

A round of a sequence whose last token x0 has no KV yet, drafting m tokens (m <= k), runs
within one engine step (so the step's scheduling, output processing and detokenizing are paid
once per round, not once per drafted token):

- drafts: x0, d1, .., d_{m-1} each run blocks 1..E, one runner call each (the step's drafting
  rows together, before its main call), writing KV at layers 1..E; the head at E proposes
  d1..dm, and the runner returns each token's layer-E hidden state (`Row.keep_states`), which
  the round keeps;
- verify, in the step's main runner call beside every other row: d_m runs blocks 1..E, and at
  block E+1 the kept states of x0..d_{m-1} join it as the runner's pending tokens, so blocks
  E+1..L run once over the m + 1 positions, and the head at L (one call for the step's rows)
  gives the full model's prediction after each of them.

Blocks 1..E never run twice for a token. The KV of layers 1..E does not depend on depth, so the
draft's KV is the full model's; positions past the accepted ones (a rejected draft's KV at every
layer) lie beyond the sequence's computed length and are overwritten by the next round, so
rolling back is moving that length. The scheduler plans the round's length with the step (m + 1
tokens of the step's budget, KV blocks for m + 1 positions), so no round outlives its step.

Acceptance: greedy keeps a draft while it equals the full model's argmax. With temperature > 0
it is the standard speculative sampling rule (draft distribution q from exit E, target p from
exit L, both after the request's temperature, top-k and top-p): accept d with probability
min(1, p(d) / q(d)), on rejection draw from max(0, p - q) renormalised, after m acceptances draw
from p. Each emitted token is then distributed exactly as full-depth sampling would draw it.

A greedy round that reads nothing but argmaxes runs whole in one native call instead
(`ModelRunner.greedy_rounds`, engine/kernels/native/draft_loop.c), pipelined on two cores where
there are two: one drafts while the other verifies, each verify ending at its first rejected
draft and the next drafting from the full model's token, until the round's m + 1 positions are
emitted; the round comes back verified (`take_round`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .model_runner import GreedyRound, Pending, Row, RowResult
from .sampler import changes_logits, distribution, reads_only_argmax

if TYPE_CHECKING:
    from .sequence import Sequence

MAX_DRAFT_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeRule:
    """Draft up to `num_draft_tokens` tokens per round at exit `draft_exit_layer` (E < L); a
    round stops drafting early at a draft whose top probability at E is below
    `draft_confidence` (0: always k). Stopping early never changes the output, only how much of
    the work is spent on drafts that would likely be rejected."""

    draft_exit_layer: int
    num_draft_tokens: int = 4
    draft_confidence: float = 0.0

    def __post_init__(self):
        k = self.num_draft_tokens
        if type(k) is not int or not 1 <= k <= MAX_DRAFT_TOKENS:
            raise ValueError(f"num_draft_tokens must be in 1..{MAX_DRAFT_TOKENS}, got {k!r}")
        if not 0.0 <= self.draft_confidence <= 1.0:
            raise ValueError(f"draft_confidence must be in [0, 1], got {self.draft_confidence!r}")


class Speculation:
    """One sequence's speculative state: its rule, the round in progress and what it has drafted."""

    def __init__(self, rule: SpeculativeRule, context: int):
        self.rule = rule
        self.context = context                    # the model's positions: no round drafts past it
        self.drafted = 0                          # drafted tokens verified so far
        self.accepted = 0                         # ... of which the full model agreed with
        self.verifies: list[tuple[int, int]] = []    # (drafted, accepted) of each verify of the latest round
        self.verified: list[torch.Tensor | None] = []  # the latest verify's logits at L, one a token
        self.reset()

    def reset(self) -> None:
        """Drop the round in progress (its drafts were never emitted), e.g. on preemption."""
        self.length = 0                           # drafts this round; 0 outside a round
        self.drafts: list[int] = []
        self.draft_probs: list[torch.Tensor] = []  # q of each draft (temperature > 0 only)
        self.states: list[Pending] = []           # layer-E states of x0, d1, ..
        self.native: GreedyRound | None = None    # a natively verified round (its tokens and verifies)

    def plan(self, seq: Sequence, room: int) -> int:
        """For the scheduler: start a round in this step, drafting at most `room` tokens (what
        the step's token budget leaves past the sequence's next token). Returns the round's
        drafts m: the step computes and writes m positions past the sequence's tokens. 0: an
        ordinary full-depth step (the prompt, a recompute after preemption, no room to draft)."""
        self.reset()
        if seq.output_ids and seq.num_tokens - seq.num_computed == 1:
            # Never draft past max_tokens or the context: the round emits up to m + 1 tokens.
            self.length = max(0, min(self.rule.num_draft_tokens, room,
                                     seq.params.max_tokens - len(seq.output_ids) - 1,
                                     self.context - seq.num_tokens))
        return self.length

    @property
    def drafting(self) -> bool:
        return self.native is None and len(self.drafts) < self.length

    # ---- the runner's rows -----------------------------------------------------------------
    def next_row(self, seq: Sequence, stop_ids: Collection[int]) -> Row | None:
        """The runner's row for the round's next draft, or for its verify once drafting is done.
        Greedy rows whose logits nothing adjusts (`stop_ids`: what min_tokens masks) read only
        argmaxes: they take the argmax-only head. None: the round is verified already (`take_round`)."""
        if self.native is not None:
            return None
        m, E, L = len(self.drafts), self.rule.draft_exit_layer, seq.exit_layer
        token = self.drafts[-1] if m else seq.all_ids[-1]
        start = seq.num_computed + m
        params, outputs = seq.params, seq.output_ids + self.drafts
        if not self.drafting:
            pending = Pending(torch.cat([p.hidden for p in self.states]), [d for p in self.states for d in p.depths])
            # Position i is read after outputs + drafts[:i]; what adjusts logits (min_tokens
            # masking a short output, penalties on a non-empty one) shows at one end or the other.
            argmax_only = (reads_only_argmax(params, seq.output_ids, stop_ids)
                           and reads_only_argmax(params, outputs, stop_ids))
            return Row([token], start, L, seq.kv, {L: "all"}, pending=pending, argmax_only=argmax_only)
        # A draft is a plain one-token row (the decode fast paths take it); the states of the
        # earlier drafts wait here, since they join only at block E + 1. draft_confidence reads
        # the draft's whole distribution.
        return Row([token], start, E, seq.kv, {E: "last"}, keep_states=True, argmax_only=(
            self.rule.draft_confidence == 0 and reads_only_argmax(params, outputs, stop_ids)))

    def greedy(self, seq: Sequence, stop_ids: Collection[int]) -> bool:
        """Whether every draft of the round is the plain argmax at E (temperature 0, nothing
        adjusts the logits, no confidence read): the runner may draft them all in one native
        loop (`take`). What adjusts logits only stops doing so as outputs grow (min_tokens)."""
        return (seq.params.temperature == 0 and self.rule.draft_confidence == 0
                and not changes_logits(seq.params, seq.output_ids, stop_ids))

    def whole(self, seq: Sequence, stop_ids: Collection[int]) -> bool:
        """Whether the verify too reads nothing but the full model's argmaxes (greedy drafts, no
        logprobs to record): the runner may run the whole round natively (`take_round`)."""
        return self.greedy(seq, stop_ids) and seq.params.logprobs is None

    def take(self, drafts: list[int], states: torch.Tensor) -> None:
        """The round's drafts, from the runner's greedy draft loop, with the layer-E states of
        x0, d1, .., d_{m-1} [m, hidden]."""
        self.drafts = drafts
        self.states = [Pending(states, [self.rule.draft_exit_layer] * len(drafts))]

    def take_round(self, verified: GreedyRound) -> None:
        """A whole round from the runner's native greedy rounds, verified already: its tokens and
        verifies (a pipelined round verifies several times, each from the token the last emitted)."""
        self.native = verified

    def draft(self, seq: Sequence, result: RowResult,
              adjust: Callable[[torch.Tensor, list[int]], torch.Tensor]) -> None:
        """Take a draft step's result: the head at E proposes the next draft. `adjust(logits,
        output_ids)`: the request's penalties and biases after those outputs, applied alike to
        the draft's and the full model's logits at each position."""
        params, generator = seq.params, seq.generator  # the generator lives on the CPU
        logits = adjust(result.logits[self.rule.draft_exit_layer][-1].cpu(), seq.output_ids + self.drafts)
        if params.temperature == 0:
            self.drafts.append(int(torch.argmax(logits)))
        else:
            q = distribution(logits, params)
            self.draft_probs.append(q)
            self.drafts.append(int(torch.multinomial(q, 1, generator=generator)))
        self.states.append(result.pending)
        # An unsure draft is likely rejected, and so is everything drafted after it: verify now.
        if self.rule.draft_confidence > 0 and (
                float(torch.softmax(logits.double(), -1).max()) < self.rule.draft_confidence):
            self.length = len(self.drafts)

    def verify(self, seq: Sequence, result: RowResult | None,
               adjust: Callable[[torch.Tensor, list[int]], torch.Tensor]) -> list[int]:
        """Verify the round from its verify row's result (the head at L after x0, d1, .., d_m,
        computed in the step's one head call at L with the other rows' logits), or take the
        round the runner verified natively (`result` None), and return the tokens to emit, having
        moved the sequence's computed length past the accepted ones."""
        params = seq.params
        if result is None:
            tokens, self.verifies = self.native.tokens, self.native.verifies
            self.verified = [None] * len(tokens)  # no logprobs: nothing reads the logits
        else:
            logits = result.logits[seq.exit_layer].cpu()

            def target(i: int) -> torch.Tensor:  # the full model's adjusted logits after position i
                return adjust(logits[i], seq.output_ids + self.drafts[:i])

            tokens = (_accept_greedy(self.drafts, lambda i: int(torch.argmax(target(i)))) if params.temperature == 0
                      else _accept_sampled(self.drafts, self.draft_probs, target, params, seq.generator))
            self.verified = logits[:len(tokens)]  # each emitted token's logits, for its logprobs
            self.verifies = [(len(self.drafts), len(tokens) - 1)]
        self.drafted += sum(d for d, _ in self.verifies)
        self.accepted += sum(a for _, a in self.verifies)
        seq.num_computed += len(tokens)  # x0 and every emitted token but the last now have KV at every layer
        self.reset()
        return tokens


# An acceptance rule takes the drafts and target(i), the full model's logits after position i
# (asked for in order, only as far as the rule reads), and returns the round's tokens; the greedy
# rule takes choice(i), the full model's token after position i.
Target = Callable[[int], torch.Tensor]


def _accept_greedy(drafts: list[int], choice: Callable[[int], int]) -> list[int]:
    for i, d in enumerate(drafts):
        token = choice(i)
        if d != token:
            return drafts[:i] + [token]
    return drafts + [choice(len(drafts))]


def _accept_sampled(drafts: list[int], draft_probs: list[torch.Tensor], target: Target, params,
                    generator: torch.Generator) -> list[int]:
    for i, (d, q) in enumerate(zip(drafts, draft_probs)):
        p = distribution(target(i), params)
        u = float(torch.rand((), generator=generator, dtype=torch.float64, device=generator.device))
        if u * float(q[d]) >= float(p[d]):  # rejected: P(accept) = min(1, p(d) / q(d))
            residual = torch.clamp(p - q, min=0.0)
            total = float(residual.sum())
            fix = residual / total if total > 0 else p
            return drafts[:i] + [int(torch.multinomial(fix, 1, generator=generator))]
    bonus = distribution(target(len(drafts)), params)
    return drafts + [int(torch.multinomial(bonus, 1, generator=generator))]
