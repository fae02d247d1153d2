"""The batched device sampler: greedy rows take the argmax, sampled rows follow softmax(logits / T)
restricted by top-k and top-p, and a seeded request draws the same tokens in any batch."""

from __future__ import annotations

import torch

from engine.device_sampler import sample_batch, uniforms
from engine.sequence import SamplingParams

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def frequencies(params: SamplingParams, n: int = 6000) -> torch.Tensor:
    """Empirical distribution of n draws of one seeded request (token numbers 0..n-1)."""
    tokens = sample_batch(LOGITS.expand(n, -1), [params] * n, [7] * n, list(range(n)))
    return torch.bincount(torch.tensor(tokens), minlength=LOGITS.numel()).double() / n


def test_draws_follow_the_temperature_softmax():
    for t in (0.7, 1.5):
        want = torch.softmax(LOGITS.double() / t, -1)
        got = frequencies(SamplingParams(temperature=t))
        # 6000 draws: the standard error of a frequency is at most 0.0065.
        assert (got - want).abs().max() < 0.03, (t, got, want)


def test_top_k_and_top_p_keep_only_their_tokens_in_proportion():
    got = frequencies(SamplingParams(temperature=1.0, top_k=2))
    want = torch.softmax(LOGITS[:2].double(), -1)
    assert got[2:].sum() == 0 and (got[:2] - want).abs().max() < 0.03
    probs = torch.softmax(LOGITS.double(), -1)      # 0.56, 0.21, 0.13, ...: top_p 0.7 keeps 2
    got = frequencies(SamplingParams(temperature=1.0, top_p=0.7))
    assert got[2:].sum() == 0 and (got[:2] - probs[:2] / probs[:2].sum()).abs().max() < 0.03


def test_greedy_rows_and_a_seed_give_the_same_tokens_in_any_batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 50, generator=gen)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.9, seed=1),
              SamplingParams(temperature=1.2, top_k=5, seed=2), SamplingParams(temperature=0.8, top_p=0.5),
              SamplingParams(temperature=0.0)]
    seeds, steps = [1, 1, 2, 2**64 - 5, 3], [0, 4, 9, 2, 0]
    together = sample_batch(logits, params, seeds, steps)
    alone = [sample_batch(logits[i:i + 1], params[i:i + 1], seeds[i:i + 1], steps[i:i + 1])[0] for i in range(5)]
    assert together == alone
    assert together[0] == int(logits[0].argmax()) and together[4] == int(logits[4].argmax())


def test_uniforms_are_in_the_open_unit_interval_and_depend_on_seed_and_step():
    u = uniforms(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 0]), 1000)
    assert bool((u > 0).all() and (u < 1).all())
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert abs(float(u.mean()) - 0.5) < 0.02
