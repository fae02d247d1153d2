"""A whole greedy speculative round in one native call (engine/kernels/native/draft_loop.c,
`ModelRunner.greedy_rounds`) and the drafts' estimated head (draft_head.c): the round's targets
are the reference model's full-depth tokens after each drafted position, its KV is what full-depth
processing writes at every layer, a row's round does not depend on its batch; the estimate mostly
picks the exact head's argmax, and when it picks wrong tokens the output is still full depth's.
A round of one sequence pipelined on two threads (one drafts while the other verifies, ending at
the first rejected draft): the same, up to that draft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.kernels import native
from engine.kernels.native import draft_loop
from engine.kernels.native.screened_head import ScreenedHead
from engine.speculative import SpeculativeRule
from models.checkpoint import load_checkpoint

from test_confidence import full_depth_cache, layer_kv
from test_draft_loop import PROMPTS, model_and_engine, prefilled  # noqa: F401 (a fixture)
from test_generation import ref_greedy

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "default"


def loop_with(engine: LLMEngine, lm_head_copy: torch.Tensor | None = None, estimate: bool = True,
              pipeline: bool = False):
    """The engine's draft loop rebuilt: the screened copy made from `lm_head_copy` (a head the
    drafts' estimate then reads instead of the model's), or the model's own; a round of one
    sequence pipelined on two threads, or not."""
    r, w = engine.runner, engine.weights
    copy = engine.backend.screened_head(w.lm_head) if lm_head_copy is None else \
        ScreenedHead(native.library(), lm_head_copy.contiguous())
    loop = draft_loop.GreedyDrafts(r.native_blocks, w.embed_tokens, w.norm.weight, w.norm.eps, w.lm_head, copy,
                                   estimate=estimate)
    loop.pipeline = pipeline
    return loop


@pytest.mark.parametrize("estimate", [False, True], ids=["exact drafts", "estimated drafts"])
@pytest.mark.parametrize("draft_exit", [1, 3])
def test_round_targets_are_full_depth_tokens_and_kv_is_full_depth(model_and_engine, monkeypatch, estimate,
                                                                    draft_exit):
    model, engine = model_and_engine
    L, m = model.config.num_hidden_layers, 5
    monkeypatch.setattr(engine.runner, "native_drafts", loop_with(engine, estimate=estimate))
    kvs, x0 = [], []
    for p in PROMPTS:
        kvs.append(prefilled(engine, p, m + 1))
        x0.append(ref_greedy(model, p, L, 1)[0])
    before = list(engine.runner.blocks_run)
    drafts, targets = engine.runner.greedy_rounds(kvs, x0, [len(p) for p in PROMPTS], draft_exit, L, m)
    ran = [b - a for a, b in zip(before, engine.runner.blocks_run)]
    assert ran[1:] == [(m + 1) * len(PROMPTS)] * L, "x0 and every draft run every block once"
    for i, (p, kv) in enumerate(zip(PROMPTS, kvs)):
        ids = p + [x0[i]] + drafts[i]
        if not estimate:
            assert drafts[i] == ref_greedy(model, p + [x0[i]], draft_exit, m)
        with torch.no_grad():  # the full model's token after x0, d1, .., d_m
            want = model(torch.tensor([ids]), [L])[L][0, len(p):].argmax(-1)
        assert targets[i] == want.tolist(), f"prompt {i}"
        ref_cache, ref_kv = full_depth_cache(engine, ids)
        for layer in range(1, L + 1):
            got, ref = layer_kv(engine.kv_cache, kv, layer, len(ids)), layer_kv(ref_cache, ref_kv, layer, len(ids))
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), f"prompt {i} layer {layer}"
        engine.kv_cache.release(kv)


def accepted_prefix(drafts: list[int], targets: list[int]) -> int:
    """Drafts kept: those before the first that differs from the full model's token."""
    return next((i for i, (d, t) in enumerate(zip(drafts, targets)) if d != t), len(drafts))


@pytest.mark.parametrize("estimate", [False, True], ids=["exact drafts", "estimated drafts"])
@pytest.mark.parametrize("draft_exit", [1, 3, 4])
def test_pipelined_round_is_full_depth_up_to_the_first_rejected_draft(model_and_engine, monkeypatch, estimate,
                                                                        draft_exit):
    """One sequence pipelined on two threads: its drafts are verified up to the first the full model
    rejects (draft exit 4 = L: the drafts are the full model's own, so all are kept); the targets
    are the reference full-depth tokens after x0 and each kept draft, the KV of the kept positions
    is a full-depth prefill's at every layer, and the drafts and targets are the sequential
    round's (one thread, the same state)."""
    model, engine = model_and_engine
    L, m = model.config.num_hidden_layers, 6
    loop = loop_with(engine, estimate=estimate, pipeline=True)
    monkeypatch.setattr(engine.runner, "native_drafts", loop)
    kept, ends = 0, set()
    for p in PROMPTS:
        x0 = ref_greedy(model, p, L, 1)[0]
        kv = prefilled(engine, p, m + 1)
        before = list(engine.runner.blocks_run)
        (drafts,), (targets,) = engine.runner.greedy_rounds([kv], [x0], [len(p)], draft_exit, L, m)
        ran = [b - a for a, b in zip(before, engine.runner.blocks_run)]
        a = accepted_prefix(drafts, targets)
        assert a == len(drafts) == m or a == len(drafts) - 1, "verified up to the first rejected draft"
        ends.add(a == m)
        kept += a
        ids = p + [x0] + drafts[:a]
        with torch.no_grad():  # the full model's token after x0, d1, .., d_a
            want = model(torch.tensor([ids]), [L])[L][0, len(p):].argmax(-1)
        assert targets[:a + 1] == want.tolist()
        if not estimate:
            assert drafts == ref_greedy(model, p + [x0], draft_exit, len(drafts))
        ref_cache, ref_kv = full_depth_cache(engine, ids)
        for layer in range(1, L + 1):
            got, ref = layer_kv(engine.kv_cache, kv, layer, len(ids)), layer_kv(ref_cache, ref_kv, layer, len(ids))
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), f"layer {layer}"
        # x0 and the kept drafts ran every block; at most x0 and all m drafts ran any.
        assert all(a + 1 <= n <= m + 1 for n in ran[1:]), ran
        engine.kv_cache.release(kv)
        loop.pipeline = False  # the sequential round on the same state
        kv = prefilled(engine, p, m + 1)
        (d1,), (t1,) = engine.runner.greedy_rounds([kv], [x0], [len(p)], draft_exit, L, m)
        assert d1[:len(drafts)] == drafts and t1[:a + 1] == targets[:a + 1]
        engine.kv_cache.release(kv)
        loop.pipeline = True
    if draft_exit == L:
        assert ends == {True}, "exit L drafts the full model's own tokens"
    else:
        assert kept < m * len(PROMPTS), "the test needs a rejected draft"


@pytest.mark.parametrize("pipeline", [False, True], ids=["sequential", "pipelined"])
def test_a_rows_round_does_not_depend_on_its_batch(model_and_engine, monkeypatch, pipeline):
    _, engine = model_and_engine
    monkeypatch.setattr(engine.runner.native_drafts, "pipeline", pipeline)
    L = engine.model_config.num_hidden_layers
    alone = []
    for p in PROMPTS:
        kv = prefilled(engine, p, 5)
        alone.append(engine.runner.greedy_rounds([kv], [9], [len(p)], 2, L, 4))
        engine.kv_cache.release(kv)
    kvs = [prefilled(engine, p, 5) for p in PROMPTS]
    drafts, targets = engine.runner.greedy_rounds(kvs, [9, 9], [len(p) for p in PROMPTS], 2, L, 4)
    for i, (d, t) in enumerate(alone):
        assert drafts[i] == d[0] and targets[i] == t[0]
    for kv in kvs:
        engine.kv_cache.release(kv)


@pytest.mark.parametrize("pipeline", [False, True], ids=["sequential", "pipelined"])
def test_output_is_full_depth_when_the_draft_estimates_are_wrong(model_and_engine, monkeypatch, pipeline):
    """Drafts estimated from a head with its rows shuffled (nearly every draft a wrong token):
    every round rejects, and the output is still the full model's greedy output. (The verify
    takes the float32 head here: the shuffled copy is no screen of the model's head.)"""
    model, engine = model_and_engine
    L = model.config.num_hidden_layers
    w = engine.weights.lm_head
    shuffled = w[torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))]
    monkeypatch.setattr(draft_loop, "SCREEN_ABOVE", 1 << 62)
    monkeypatch.setattr(engine.runner, "native_drafts", loop_with(engine, shuffled, pipeline=pipeline))
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    seqs = []
    for p in PROMPTS:
        for e in (1, 3):  # one at a time: each round is one sequence's (pipelined or not)
            seqs.append(engine.add_request(p, params, speculative=SpeculativeRule(e, 3)))
            while engine.has_unfinished():
                engine.step()
    for seq in seqs:
        assert seq.output_ids == ref_greedy(model, seq.prompt_ids, L, 16)
    drafted, accepted = sum(s.speculation.drafted for s in seqs), sum(s.speculation.accepted for s in seqs)
    assert drafted > 0 and accepted < drafted / 4, "the test needs mostly wrong drafts"
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_the_estimate_is_the_exact_argmax_on_most_rows_of_the_default_model():
    """On the bundled model's own draft states (held-out text, exit 18), the level-1 estimate's
    argmax is the float32 head's on nearly every row; it never fails to give one."""
    engine = LLMEngine(load_checkpoint(DEFAULT_MODEL), EngineConfig(max_num_seqs=4))
    r, w = engine.runner, engine.weights
    if r.native_drafts is None or not r.native_drafts.estimated:
        pytest.fail("the default model's drafts do not take the estimated head")
    lines = [x for x in (DEFAULT_MODEL / "heldout_sample.txt").read_text().splitlines() if len(x) > 200][:4]
    prompts = [engine.encode(x)[:32] for x in lines]
    kvs = [prefilled(engine, p, 33) for p in prompts]
    _, states = r.greedy_drafts(kvs, [p[-1] for p in prompts], [len(p) - 1 for p in prompts], 18, 32)
    x = torch.nn.functional.rms_norm(states.reshape(-1, states.shape[-1]), (states.shape[-1],), w.norm.weight,
                                     w.norm.eps)
    estimated = r.native_drafts.draft_argmax(x)
    exact = native.head_matmul(native.library(), x, w.lm_head).argmax(-1)
    agree = (estimated == exact).float().mean().item()
    assert (estimated >= 0).all() and agree >= 0.95, f"estimate = exact argmax on {agree:.1%} of rows"
    for kv in kvs:
        engine.kv_cache.release(kv)
