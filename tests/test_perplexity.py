"""engine.perplexity against the reference model: NLL of next-token predictions at several exits
from one forward, the first id unscored, long texts in overlapping windows per the documented rule."""

from __future__ import annotations

import math

import pytest
import torch

from engine.model_runner import ModelRunner
from engine.perplexity import perplexity, windows
from engine.weights import ModelWeights

from conftest import reference_model, write_packed


@pytest.fixture(scope="module", params=["v1", "v3"])
def model_and_weights(request, tmp_path_factory):
    model = reference_model(request.param, seed=3)
    ckpt = write_packed(model, tmp_path_factory.mktemp("ppl") / request.param)
    return model, ModelWeights.from_checkpoint(ckpt)


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def ref_nll_sums(model, ids: list[int], layers, first_pred: int = 0) -> dict[int, float]:
    """Sum over positions p >= first_pred of -log softmax(ref logits at p)[ids[p + 1]]."""
    logits = model(torch.tensor([ids]), layers)
    targets = torch.tensor(ids[first_pred + 1:])
    out = {}
    for k in layers:
        logp = torch.log_softmax(logits[k][0, first_pred:-1].double(), dim=-1)
        out[k] = float(-logp[torch.arange(len(targets)), targets].sum())
    return out


def close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * abs(b)


def test_perplexity_equals_reference_nll_at_several_exits(model_and_weights):
    model, weights = model_and_weights
    c = model.config
    ids = random_ids(40, c.vocab_size, seed=1)
    layers = [4, 1, 3]
    runner = ModelRunner(weights)
    res = perplexity(runner, ids, layers)
    assert res.tokens == len(ids) - 1
    assert sorted(res.nll) == [1, 3, 4]
    expected = ref_nll_sums(model, ids, layers)
    for k in layers:
        assert close(res.nll[k], expected[k] / (len(ids) - 1)), (k, res.nll[k], expected[k])
        assert close(res.perplexity[k], math.exp(expected[k] / (len(ids) - 1)))
    # exits differ (else this test could not tell one layer's logits from another's)
    assert len({round(v, 6) for v in res.nll.values()}) == 3
    # one forward: blocks 1..4 each processed the 40 tokens once
    assert runner.blocks_run[1:] == [40, 40, 40, 40]


def test_first_id_is_not_scored(model_and_weights):
    model, weights = model_and_weights
    ids = random_ids(2, model.config.vocab_size, seed=2)
    res = perplexity(ModelRunner(weights), ids, [2])
    assert res.tokens == 1
    assert close(res.nll[2], ref_nll_sums(model, ids, [2])[2])
    # Changing the first id changes the context, not what is scored: still one prediction.
    other = [(ids[0] + 1) % model.config.vocab_size, ids[1]]
    res2 = perplexity(ModelRunner(weights), other, [2])
    assert res2.tokens == 1 and close(res2.nll[2], ref_nll_sums(model, other, [2])[2])


def test_shallow_exits_run_no_deeper_blocks(model_and_weights):
    model, weights = model_and_weights
    runner = ModelRunner(weights)
    perplexity(runner, random_ids(20, model.config.vocab_size, seed=3), [2, 1])
    assert runner.blocks_run[1:] == [20, 20, 0, 0]


def test_too_short_raises(model_and_weights):
    _, weights = model_and_weights
    for ids in ([], [5]):
        with pytest.raises(ValueError, match="2 tokens"):
            perplexity(ModelRunner(weights), ids, [1])


def expected_windows(n: int, C: int) -> list[tuple[int, int, int]]:
    """The rule of the module docstring, written out independently: windows of C ids advancing by
    C/2; the first scores all its predictions, each later one only the targets not scored yet."""
    if n <= C:
        return [(0, n, 1)]
    out, scored_to = [(0, C, 1)], C  # targets 1..C-1 scored
    while scored_to < n:
        end = min(scored_to + C // 2, n)
        out.append((end - C, end, scored_to))
        scored_to = end
    return out


def test_windows_follow_the_documented_rule():
    assert windows(300, 128) == [(0, 128, 1), (64, 192, 128), (128, 256, 192), (172, 300, 256)]
    assert windows(128, 128) == [(0, 128, 1)]
    assert windows(129, 128) == [(0, 128, 1), (1, 129, 128)]
    assert windows(5, 128) == [(0, 5, 1)]
    for C in (8, 9, 128):
        for n in range(2, 5 * C):
            ws = windows(n, C)
            assert ws == expected_windows(n, C), (n, C)
            scored = [t for _, end, first in ws for t in range(first, end)]
            assert scored == list(range(1, n)), (n, C)  # every prediction once, in order
            for start, end, first in ws:
                assert 0 <= start < first <= end <= n and end - start <= C
                if start > 0:  # later windows are full and give each target >= C/2 context
                    assert end - start == C and first - start >= C // 2


def test_long_text_scored_in_windows(model_and_weights):
    model, weights = model_and_weights
    C = model.config.max_position_embeddings
    ids = random_ids(300, model.config.vocab_size, seed=4)
    layers = [1, 3]
    runner = ModelRunner(weights)
    calls = [0] * (model.config.num_hidden_layers + 1)
    block = runner._block

    def counting_block(layer, *args):
        calls[layer] += 1
        return block(layer, *args)

    runner._block = counting_block
    res = perplexity(runner, ids, layers)
    ws = expected_windows(len(ids), C)
    assert len(ws) == 4
    assert res.tokens == len(ids) - 1
    totals = {k: 0.0 for k in layers}
    for start, end, first in ws:
        # the reference sees only the window (positions restart at 0) and scores targets >= first
        sums = ref_nll_sums(model, ids[start:end], layers, first_pred=first - 1 - start)
        for k in layers:
            totals[k] += sums[k]
    for k in layers:
        assert close(res.nll[k], totals[k] / (len(ids) - 1)), (k, res.nll[k], totals[k])
    # each block up to the deepest requested exit ran once per window, none deeper
    assert calls[1:] == [4, 4, 4, 0]
    assert runner.blocks_run[1:] == [4 * C] * 3 + [0]
    # and it is not simply the whole text truncated or scored without windows
    head_only = ref_nll_sums(model, ids[:C], layers)
    assert not close(res.nll[1], head_only[1] / (C - 1), rel=1e-9)


def test_text_of_exactly_the_context_is_one_window(model_and_weights):
    model, weights = model_and_weights
    C = model.config.max_position_embeddings
    ids = random_ids(C, model.config.vocab_size, seed=5)
    runner = ModelRunner(weights)
    res = perplexity(runner, ids, [4])
    assert res.tokens == C - 1
    assert close(res.nll[4], ref_nll_sums(model, ids, [4])[4] / (C - 1))
    assert runner.blocks_run[4] == C
