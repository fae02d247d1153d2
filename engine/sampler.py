"""Turns one row of logits into a token: the request's logit changes (min_tokens, logit_bias,
repetition/frequency/presence penalties), then greedy, or temperature with top-k and top-p
filters, drawn from the request's own generator so that a seed gives the same tokens in any batch."""

from __future__ import annotations

from collections.abc import Collection

import torch

from .sequence import SamplingParams


def adjust_logits(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int],
                  output_ids: list[int], stop_ids: Collection[int]) -> torch.Tensor:
    """The logits the request samples from (a new tensor when anything changes).

    - min_tokens: until that many tokens exist, `stop_ids` (EOS and stop_token_ids) cannot be drawn.
    - logit_bias: added to the named tokens' logits.
    - repetition_penalty r (Keskar et al., as in transformers and vLLM): every token of the prompt
      and output so far has its logit divided by r when positive, multiplied by r when negative.
    - frequency_penalty f and presence_penalty p (OpenAI): a token generated c times so far
      loses f * c + p * (c > 0).
    """
    p = params
    masked = len(output_ids) < p.min_tokens and stop_ids
    if not changes_logits(p, output_ids, stop_ids):
        return logits
    logits = logits.double().clone()
    if masked:
        logits[torch.tensor(sorted(stop_ids), device=logits.device)] = float("-inf")
    if p.logit_bias:
        ids, biases = zip(*p.logit_bias)
        logits[torch.tensor(ids, device=logits.device)] += torch.tensor(biases, dtype=logits.dtype, device=logits.device)
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), device=logits.device)
        x = logits[seen]
        # A tiny r (5e-324 is valid) overflows positive logits to inf, and softmax over several
        # infs is NaN: they saturate at the largest double instead (and tie there).
        logits[seen] = torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty).clamp(
            max=torch.finfo(logits.dtype).max)
    if output_ids and (p.frequency_penalty or p.presence_penalty):
        counts = torch.bincount(torch.tensor(output_ids, device=logits.device), minlength=logits.numel()).to(logits.dtype)
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def changes_logits(params: SamplingParams, output_ids: list[int], stop_ids: Collection[int]) -> bool:
    """Whether adjust_logits changes anything for the next token."""
    p = params
    return bool((len(output_ids) < p.min_tokens and stop_ids) or p.logit_bias or p.repetition_penalty != 1.0
                or (output_ids and (p.frequency_penalty or p.presence_penalty)))


def reads_only_argmax(params: SamplingParams, output_ids: list[int], stop_ids: Collection[int]) -> bool:
    """Whether drawing the next token (and recording it) reads nothing of its logits but their
    argmax: greedy, nothing to adjust, no logprobs. Such a row may take a head that computes the
    argmax's logit alone exactly (engine/kernels/native/screened_head.py)."""
    return params.temperature == 0 and params.logprobs is None and not changes_logits(params, output_ids, stop_ids)


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The probabilities (float64 [vocab]) a temperature > 0 sample is drawn from, filters applied."""
    # Shift by the max first: softmax is unchanged, and a tiny temperature (5e-324) then sends
    # every other logit to -inf and the top one to 0 instead of overflowing them all to inf.
    logits = logits.double()
    logits = (logits - logits.max()) / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        outside = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.index_fill(0, order[outside], float("-inf"))
    return torch.softmax(logits, dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits [vocab] -> token id."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(distribution(logits, params), 1, generator=generator))
