"""A whole greedy speculative round in one native call (engine/kernels/native/draft_loop.c,
`ModelRunner.greedy_rounds`) and the drafts' estimated head (draft_head.c): the round's targets
are the reference model's full-depth tokens after each drafted position, its KV is what full-depth
processing writes at every layer, a row's round does not depend on its batch; the estimate mostly
picks the exact head's argmax, and when it picks wrong tokens the output is still full depth's.
A pipelined round (on two threads, one drafts while the other verifies; each verify ends at its
first rejected draft and the next drafts from there) emits the same tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.kernels import native
from engine.kernels.native import draft_loop
from engine.kernels.native.draft_loop import GreedyRound
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


def reference_round(model, prompt: list[int], x0: int, draft_exit: int, m: int,
                    pipelined: bool) -> GreedyRound:
    """The round the reference model makes with exact drafts: verify after verify (one, or with
    `pipelined` as many as the round's m + 1 positions hold), each drafting greedily at the draft
    exit as far as the positions left reach, keeping the drafts the full model's argmax agrees
    with up to the first it rejects, then the full model's own token."""
    L = model.config.num_hidden_layers
    ids, tokens, verifies = prompt + [x0], [], []
    while len(tokens) < m + 1:
        room = m - len(tokens)  # drafts this verify may write KV for
        drafts = ref_greedy(model, ids, draft_exit, room)
        with torch.no_grad():  # the full model's token after the last emitted and each draft
            targets = model(torch.tensor([ids + drafts]), [L])[L][0, len(ids) - 1:].argmax(-1).tolist()
        a = next((i for i, (d, t) in enumerate(zip(drafts, targets)) if d != t), room)
        verifies.append((a + 1 if a < room else room, a))
        tokens += drafts[:a] + [targets[a]]
        ids += drafts[:a] + [targets[a]]
        if not pipelined:
            verifies[-1] = (room, a)  # one verify reads every draft
            break
    return GreedyRound(tokens, verifies)


@pytest.mark.parametrize("pipeline", [False, True], ids=["sequential", "pipelined"])
@pytest.mark.parametrize("estimate", [False, True], ids=["exact drafts", "estimated drafts"])
@pytest.mark.parametrize("draft_exit", [1, 3, 4])
def test_round_emits_full_depth_tokens_and_kv_is_full_depth(model_and_engine, monkeypatch, pipeline, estimate,
                                                             draft_exit):
    """Both rounds of two sequences (together; the pipelined one a sequence at a time): the tokens
    are the reference model's full-depth greedy continuation, the KV of x0 and every emitted token
    but the last is a full-depth prefill's at every layer; with exact drafts, the tokens and
    verifies are the reference round's (draft exit 4 = L drafts the full model's own tokens: one
    verify keeps them all). Sequential: x0 and every draft run every block once; pipelined: the
    round's m + 1 positions are all emitted, each run by every block at least once."""
    model, engine = model_and_engine
    L, m = model.config.num_hidden_layers, 6
    monkeypatch.setattr(engine.runner, "native_drafts", loop_with(engine, estimate=estimate, pipeline=pipeline))
    kvs, x0 = [], []
    for p in PROMPTS:
        kvs.append(prefilled(engine, p, m + 1))
        x0.append(ref_greedy(model, p, L, 1)[0])
    before = list(engine.runner.blocks_run)
    rounds = engine.runner.greedy_rounds(kvs, x0, [len(p) for p in PROMPTS], draft_exit, L, m)
    ran = [b - a for a, b in zip(before, engine.runner.blocks_run)]
    if pipeline:
        assert all((m + 1) * len(PROMPTS) <= n for n in ran[1:]), ran
    else:
        assert ran[1:] == [(m + 1) * len(PROMPTS)] * L, "x0 and every draft run every block once"
    for i, (p, kv, got) in enumerate(zip(PROMPTS, kvs, rounds)):
        assert got.tokens == ref_greedy(model, p + [x0[i]], L, len(got.tokens)), f"prompt {i}"
        assert len(got.tokens) == sum(a + 1 for _, a in got.verifies)
        assert len(got.tokens) == m + 1 if pipeline else len(got.verifies) == 1
        if not estimate:
            assert got == reference_round(model, p, x0[i], draft_exit, m, pipeline), f"prompt {i}"
        if draft_exit == L:
            assert got.verifies == [(m, m)]
        ids = p + [x0[i]] + got.tokens[:-1]
        ref_cache, ref_kv = full_depth_cache(engine, ids)
        for layer in range(1, L + 1):
            have, ref = layer_kv(engine.kv_cache, kv, layer, len(ids)), layer_kv(ref_cache, ref_kv, layer, len(ids))
            assert torch.equal(have[0], ref[0]) and torch.equal(have[1], ref[1]), f"prompt {i} layer {layer}"
        engine.kv_cache.release(kv)
    if draft_exit < L and pipeline:
        assert any(d > a for r in rounds for d, a in r.verifies), "the test needs a rejected draft"


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
    together = engine.runner.greedy_rounds(kvs, [9, 9], [len(p) for p in PROMPTS], 2, L, 4)
    assert together == [r[0] for r in alone]
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
