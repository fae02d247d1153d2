"""Log-probabilities reported with tokens: the chosen token's and the top alternatives'.

They are the log-softmax of the exit layer's logits, the very logits the sampler drew the token
from (before penalties, logit_bias and temperature change them), so a generated token's logprob
and a scored prompt token's agree with `/perplexity` at the same depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first
    exit_layer: int | None = None            # the depth whose logits these are


def logprobs_of(logits: torch.Tensor, tokens: list[int], k: int,
                exit_layer: int | None = None) -> list[TokenLogprob]:
    """logits [n, vocab] (row i predicts tokens[i]) -> the logprob of each token and its row's
    `k` most likely tokens."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    if k > 0:
        values, ids = torch.topk(logp, min(k, logp.shape[1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(tokens)
    return [TokenLogprob(t, lp, top, exit_layer) for t, lp, top in zip(tokens, chosen, tops)]


def record_prompt_logprobs(prompt_logprobs: list[TokenLogprob | None], prompt_ids: list[int],
                           start: int, logits: torch.Tensor, k: int, exit_layer: int) -> None:
    """Append what a prefill chunk's logits (positions start.., one row each) say about the
    prompt tokens after them that have none yet. The list starts as [None]: the first prompt
    token has no context to be predicted from."""
    first = len(prompt_logprobs)                  # the next prompt token without a logprob
    end = min(start + logits.shape[0] + 1, len(prompt_ids))  # row p predicts token p + 1
    if first >= end or first <= start:
        return
    rows = logits[first - 1 - start:end - 1 - start]
    prompt_logprobs.extend(logprobs_of(rows, prompt_ids[first:end], k, exit_layer))
