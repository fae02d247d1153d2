"""The native greedy draft loop (engine/kernels/native/draft_loop.c): with an exact draft head, a
speculative round's drafts are the reference model's greedy tokens at the draft exit, its KV is
what full-depth processing writes at layers 1..E, and a row's drafts do not depend on the rows
beside it. (The whole round, and the estimated draft head: tests/test_greedy_round.py.)"""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.kernels.native import draft_loop
from engine.kv_cache import SequenceKV
from engine.model_runner import Row
from engine.speculative import SpeculativeRule

from conftest import write_packed
from test_confidence import full_depth_cache, layer_kv, sure_model
from test_generation import ref_greedy

PROMPTS = [[256, 5, 6, 7, 8], list(range(40, 58))]  # the second crosses a cache block mid-round


@pytest.fixture(scope="module")
def model_and_engine(tmp_path_factory):
    model = sure_model("v3")
    engine = LLMEngine(write_packed(model, tmp_path_factory.mktemp("draft") / "ckpt"), EngineConfig())
    if engine.runner.native_drafts is None:
        pytest.fail("the native draft loop is not built (no C compiler?)")
    return model, engine


def prefilled(engine: LLMEngine, prompt: list[int], room: int) -> SequenceKV:
    """A sequence whose prompt has full-depth KV, with room for `room` more positions."""
    L = engine.model_config.num_hidden_layers
    kv = SequenceKV()
    assert engine.kv_cache.reserve(kv, L, len(prompt) + room)
    engine.runner.forward([Row(prompt, 0, L, kv)])
    return kv


@pytest.fixture(params=["float32 head", "screened head"])
def head(request, model_and_engine, monkeypatch):
    """The loop with either exact head: the float32 one (small heads), or the screened one's argmax."""
    _, engine = model_and_engine
    r, w = engine.runner, engine.weights
    monkeypatch.setattr(draft_loop, "SCREEN_ABOVE", 0 if request.param == "screened head" else 1 << 62)
    drafts = draft_loop.GreedyDrafts(r.native_blocks, w.embed_tokens, w.norm.weight, w.norm.eps, w.lm_head,
                                     engine.backend.screened_head(w.lm_head), estimate=False)
    assert (drafts._screened is not None) == (request.param == "screened head")
    monkeypatch.setattr(r, "native_drafts", drafts)
    return request.param


@pytest.mark.parametrize("draft_exit", [1, 2, 3])
def test_drafts_are_the_reference_greedy_at_the_draft_exit_and_kv_is_full_depth(model_and_engine, head, draft_exit):
    model, engine = model_and_engine
    m = 6
    kvs, x0 = [], []
    for p in PROMPTS:
        kvs.append(prefilled(engine, p, m + 1))
        x0.append(ref_greedy(model, p, model.config.num_hidden_layers, 1)[0])
    before = list(engine.runner.blocks_run)
    drafts, states = engine.runner.greedy_drafts(kvs, x0, [len(p) for p in PROMPTS], draft_exit, m)
    ran = [b - a for a, b in zip(before, engine.runner.blocks_run)]
    assert ran[1:] == [m * len(PROMPTS)] * draft_exit + [0] * (len(ran) - 1 - draft_exit)
    for i, (p, kv) in enumerate(zip(PROMPTS, kvs)):
        ids = p + [x0[i]]
        want = ref_greedy(model, ids, draft_exit, m)
        assert drafts[i].tolist() == want, f"prompt {i}"
        with torch.no_grad():  # the layer-E state of the token each draft came from
            ref_states = model.hidden_states(torch.tensor([ids + want[:-1]]), draft_exit)[draft_exit][0]
        torch.testing.assert_close(states[i], ref_states[len(p):], rtol=1e-5, atol=1e-5)
        # The KV the drafts wrote at layers 1..E is what a full-depth prefill of the same tokens writes.
        n = len(ids) + m - 1
        ref_cache, ref_kv = full_depth_cache(engine, ids + want[:-1])
        for layer in range(1, draft_exit + 1):
            got, ref = layer_kv(engine.kv_cache, kv, layer, n), layer_kv(ref_cache, ref_kv, layer, n)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), f"prompt {i} layer {layer}"
        engine.kv_cache.release(kv)


def test_a_rows_drafts_do_not_depend_on_its_batch(model_and_engine):
    _, engine = model_and_engine
    assert engine.runner.native_drafts.estimated, "the engine's drafts take the estimated head"
    alone = []
    for p in PROMPTS:
        kv = prefilled(engine, p, 5)
        alone.append(engine.runner.greedy_drafts([kv], [9], [len(p)], 2, 4))
        engine.kv_cache.release(kv)
    kvs = [prefilled(engine, p, 5) for p in PROMPTS]
    drafts, states = engine.runner.greedy_drafts(kvs, [9, 9], [len(p) for p in PROMPTS], 2, 4)
    for i, (d, s) in enumerate(alone):
        assert torch.equal(drafts[i], d[0]) and torch.equal(states[i], s[0])
    for kv in kvs:
        engine.kv_cache.release(kv)


@pytest.mark.parametrize("logprobs", [None, 0])
def test_engine_drafts_greedy_rounds_in_the_native_loop(model_and_engine, logprobs):
    """Greedy rounds of different E and k in one batch take the loop (one call per (E, m)), and
    still emit the full model's tokens: whole rounds natively, or, where logprobs are recorded,
    the drafts alone (the runner's verify row gives the logits)."""
    model, engine = model_and_engine
    L = model.config.num_hidden_layers
    runner, calls = engine.runner, []
    drafted, whole = runner.greedy_drafts, runner.greedy_rounds

    def spy(fn):
        def call(kvs, tokens, starts, depth, *rest):
            calls.append((fn.__name__, len(kvs), depth, rest[-1]))
            return fn(kvs, tokens, starts, depth, *rest)
        return call
    runner.greedy_drafts, runner.greedy_rounds = spy(drafted), spy(whole)
    try:
        params = SamplingParams(max_tokens=20, ignore_eos=True, logprobs=logprobs)
        seqs = [engine.add_request(p, params, speculative=SpeculativeRule(e, k))
                for p in PROMPTS for e, k in ((1, 3), (2, 2), (2, 2))]
        while engine.has_unfinished():
            engine.step()
    finally:
        runner.greedy_drafts, runner.greedy_rounds = drafted, whole
    for seq in seqs:
        assert seq.output_ids == ref_greedy(model, seq.prompt_ids, L, 20)
    assert {name for name, *_ in calls} == {"greedy_rounds" if logprobs is None else "greedy_drafts"}
    assert any(n > 1 for _, n, _, _ in calls), "rounds of one (E, m) share a call"
    assert {depth for _, _, depth, _ in calls} == {1, 2}
    assert sum(seq.speculation.drafted for seq in seqs) > 0
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
