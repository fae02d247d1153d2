"""Self-speculative decoding: full-depth output, drafted at a shallow exit and verified by the
rest of the model, alone and batched with the other policies."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.exit_policy import ConfidenceRule
from engine.speculative import SpeculativeRule

from conftest import reference_model, write_packed
from test_confidence import full_depth_cache, layer_kv, sure_model

GREEDY = SamplingParams(max_tokens=30, ignore_eos=True)
PROMPT = [256, 5, 6, 7, 8]


def engine_for(ckpt, **kw) -> LLMEngine:
    return LLMEngine(ckpt, EngineConfig(**kw))


def run(engine: LLMEngine) -> None:
    while engine.has_unfinished():
        engine.step()


@pytest.fixture(scope="module")
def sure(tmp_path_factory):
    """A packed tiny model whose exits agree often enough to accept some drafts."""
    return write_packed(sure_model(), tmp_path_factory.mktemp("sure") / "ckpt")


@pytest.mark.parametrize("pipeline", [False, True], ids=["sequential", "pipelined"])
@pytest.mark.parametrize("draft_exit", [1, 2, 3])
def test_greedy_equals_full_depth_for_every_draft_exit_and_length(sure, draft_exit, pipeline):
    engine = engine_for(sure)
    if engine.runner.native_drafts is not None:  # whole native rounds of one sequence: two threads or one
        engine.runner.native_drafts.pipeline = pipeline
    L = engine.model_config.num_hidden_layers
    # logprobs: the full head's argmax (greedy rows that read only argmaxes screen it)
    full = engine.add_request(PROMPT, replace(GREEDY, logprobs=0), exit_layer=L)
    run(engine)
    forward, argmax_only = engine.runner.forward, set()  # (draft or verify, argmax-only head)

    def spy(rows):
        argmax_only.update(("draft" if r.keep_states else "verify", r.argmax_only) for r in rows
                           if r.keep_states or r.pending is not None)
        return forward(rows)
    engine.runner.forward = spy
    native = engine.runner.native_drafts is not None
    if native:  # greedy rounds run natively; where logprobs are recorded, their drafts alone
        drafts, whole = engine.runner.greedy_drafts, engine.runner.greedy_rounds
        engine.runner.greedy_drafts = lambda *a: argmax_only.add(("draft", "native loop")) or drafts(*a)
        engine.runner.greedy_rounds = lambda *a: argmax_only.add(("round", "native")) or whole(*a)
    rejected = accepted = 0
    for k, confidence, logprobs in ((1, 0.0, None), (3, 0.0, None), (8, 0.0, None), (8, 0.9, None), (3, 0.0, 0)):
        params = replace(GREEDY, logprobs=logprobs)
        seq = engine.add_request(PROMPT, params, speculative=SpeculativeRule(draft_exit, k, confidence))
        before = list(engine.runner.blocks_run)
        steps = 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        spec = seq.speculation
        assert seq.output_ids == full.output_ids, f"E={draft_exit} k={k}"
        if logprobs is not None:  # from the verify's logits at L
            assert seq.logprobs == full.logprobs
        assert seq.exit_layers == [L] * len(seq.output_ids) and seq.exit_label == "speculative"
        rejected += spec.drafted - spec.accepted
        accepted += spec.accepted
        # Every token runs every block exactly once: the prompt, then each round's x0 and drafts.
        rounds = len(seq.output_ids) - 1 - spec.accepted
        ran = [b - a for a, b in zip(before, engine.runner.blocks_run)]
        if pipeline and native and logprobs is None:
            # A pipelined round verifies up to its first rejected draft; its threads may have
            # drafted or verified a little past it, never past the round's k drafts.
            kept = len(PROMPT) + spec.accepted + rounds
            assert all(kept <= n <= len(PROMPT) + (k + 1) * rounds for n in ran[1:]), ran
            assert spec.drafted <= spec.accepted + rounds
        else:
            assert ran[1:] == [len(PROMPT) + spec.drafted + rounds] * L
        if pipeline and native and logprobs is None:  # a step's round verifies until its positions are used
            assert steps <= 1 + rounds
        else:
            assert steps == 1 + rounds, "the prompt's step, then one step per round"
        if confidence:  # unsure drafts end their round early
            assert spec.drafted < k * rounds
    assert accepted and rejected, "the test needs both accepted and rejected drafts"
    # Greedy drafts and verifies read only argmaxes, except where draft_confidence reads a draft's
    # distribution or logprobs are recorded: the argmax-only head (the full-depth reference used
    # the full head), or natively the whole round, or the drafts alone.
    both = {("draft", False), ("verify", True), ("verify", False)}
    assert argmax_only == both | ({("round", "native"), ("draft", "native loop")} if native else {("draft", True)})
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


@pytest.mark.parametrize("processors", ["min_tokens", "penalties", "bias"])
def test_greedy_with_logit_processors_equals_full_depth(sure, processors):
    """Drafts and verify positions see the request's processors after the outputs and drafts
    before them; min_tokens changes the logits early, penalties only after a first output."""
    engine = engine_for(sure)
    L = engine.model_config.num_hidden_layers
    plain = engine.add_request(PROMPT, GREEDY, exit_layer=L)
    run(engine)
    params = replace(GREEDY, **{
        "min_tokens": dict(min_tokens=10, stop_token_ids=(plain.output_ids[3],)),
        "penalties": dict(frequency_penalty=0.7, presence_penalty=0.4),
        "bias": dict(repetition_penalty=1.3, logit_bias={plain.output_ids[5]: -3.0}),
    }[processors])
    full = engine.add_request(PROMPT, params, exit_layer=L)
    seqs = [engine.add_request(PROMPT, params, speculative=SpeculativeRule(e, k)) for e, k in ((1, 3), (3, 2))]
    run(engine)
    assert full.output_ids != plain.output_ids, "the processors change the output"
    for seq in seqs:
        assert seq.output_ids == full.output_ids and seq.speculation.accepted > 0


@pytest.mark.parametrize("pipeline", [False, True], ids=["sequential", "pipelined"])
def test_mixed_batch_gives_the_same_tokens_as_requests_alone(sure, pipeline):
    requests = [(list(range(30, 30 + n)), dict(speculative=SpeculativeRule(e, k)))
                for n, e, k in [(3, 1, 4), (9, 2, 2), (5, 3, 6), (2, 1, 1)]]
    requests += [([256, 50], dict(speculative=SpeculativeRule(2, 5, 0.9)))]
    requests += [(list(range(60, 60 + n)), dict(exit_layer=k)) for n, k in [(4, 2), (7, 4)]]
    requests += [([256, 40, 41], dict(confidence=ConfidenceRule(0.6, (1, 2, 3))))]
    engine, alone = engine_for(sure), []
    for ids, kw in requests:  # one at a time
        alone.append(engine.add_request(ids, GREEDY, **kw))
        run(engine)
    # A small step budget staggers the rows: some prefill while others run rounds, and rounds
    # are shortened to what the budget leaves.
    engine = engine_for(sure, max_num_batched_tokens=9)
    if engine.runner.native_drafts is not None:
        engine.runner.native_drafts.pipeline = pipeline
    together = []
    mixed = False
    for ids, kw in requests:
        together.append(engine.add_request(ids, GREEDY, **kw))
        engine.step()
    while engine.has_unfinished():
        drafted = {s: s.speculation.drafted for s in together if s.speculation}
        computed, emitted = engine.runner.blocks_run[1], sum(len(s.output_ids) for s in together)
        engine.step()
        if pipeline:  # a pipelined round also starts drafts it then rejects: its emitted tokens count
            assert sum(len(s.output_ids) for s in together) - emitted <= 9, "a round's tokens count in the budget"
        else:  # every token a step computes runs block 1 once (drafts and verified tokens included)
            assert engine.runner.blocks_run[1] - computed <= 9, "a round's tokens count in the step budget"
        rounds = [s for s in engine.last_batch if s.speculation and s.speculation.drafted > drafted[s]]
        mixed |= bool(rounds) and any(not s.speculation for s in engine.last_batch)
    assert mixed, "rounds never shared a step with other rows"
    for a, b in zip(alone, together):
        assert a.output_ids == b.output_ids
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_rollback_leaves_the_cache_equal_to_full_depth_processing(tmp_path):
    engine = engine_for(write_packed(sure_model("v3"), tmp_path / "ckpt"))
    L = engine.model_config.num_hidden_layers
    seq = engine.add_request(PROMPT, GREEDY, speculative=SpeculativeRule(1, 4))
    while not (any(a < d for d, a in seq.speculation.verifies) and len(seq.output_ids) > 8):  # a rejection
        engine.step()
    assert seq.speculation.length == 0, "the round just verified"
    ids = seq.all_ids[:seq.num_computed]
    ref_cache, ref_kv = full_depth_cache(engine, ids)
    for layer in range(1, L + 1):
        got = layer_kv(engine.kv_cache, seq.kv, layer, len(ids))
        want = layer_kv(ref_cache, ref_kv, layer, len(ids))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"layer {layer}"
    # The sequence holds blocks only for the positions a round may write next.
    bs = engine.config.block_size
    need = -(-(seq.num_computed + 1 + 4) // bs)
    assert all(len(t) <= need for t in seq.kv.tables)


def test_preemption_and_abort_mid_round(sure):
    engine = engine_for(sure)
    refs = [engine.add_request(list(range(20 + i, 30 + i)), GREEDY, exit_layer=4) for i in range(3)]
    run(engine)
    # 12 blocks of 16 positions: three 50-token sequences at 4 layers cannot all fit.
    engine = engine_for(sure, num_kv_blocks=30)
    seqs = [engine.add_request(list(range(20 + i, 30 + i)), GREEDY,
                               speculative=SpeculativeRule(2, 3)) for i in range(3)]
    victim = engine.add_request(PROMPT, GREEDY, speculative=SpeculativeRule(1, 3))
    while not victim.speculation.drafted:  # aborted between two rounds
        engine.step()
    engine.abort(victim)
    run(engine)
    assert engine.scheduler.num_preemptions > 0
    assert [s.output_ids for s in seqs] == [r.output_ids for r in refs]
    assert victim.finish_reason == "abort"
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_rounds_stop_at_max_tokens_and_the_context(sure):
    engine = engine_for(sure)
    ctx = engine.model_config.max_position_embeddings
    short = engine.add_request(PROMPT, SamplingParams(max_tokens=3, ignore_eos=True),
                               speculative=SpeculativeRule(1, 8))
    edge = engine.add_request(list(range(ctx - 6)), SamplingParams(max_tokens=50, ignore_eos=True),
                              speculative=SpeculativeRule(2, 8))
    full = engine.add_request(list(range(ctx - 6)), SamplingParams(max_tokens=50, ignore_eos=True))
    run(engine)
    assert len(short.output_ids) == 3 and short.finish_reason == "length"
    assert edge.output_ids == full.output_ids and edge.num_tokens == ctx


def test_rule_validation(tmp_path):
    engine = engine_for(write_packed(reference_model(), tmp_path / "ckpt"), max_num_batched_tokens=6)
    assert engine.speculative_rule() == SpeculativeRule(1, 4)  # shallowest exit point, k = 4
    with pytest.raises(ValueError, match=r"draft_exit_layer must be in 1\.\.3"):
        engine.speculative_rule(4)
    with pytest.raises(ValueError, match=r"num_draft_tokens must be in 1\.\.5 "):
        engine.speculative_rule(2, 6)
    with pytest.raises(ValueError, match=r"num_draft_tokens must be in 1\.\.16"):
        SpeculativeRule(2, 0)
    # A checkpoint's default k past this engine's budget is served within it; a request's own is refused.
    engine.generation_config = {**engine.generation_config, "num_draft_tokens": 16}
    assert engine.speculative_rule() == SpeculativeRule(1, 5)
    with pytest.raises(ValueError, match="exit_layer applies to the fixed policy only"):
        engine.add_request(PROMPT, GREEDY, exit_layer=2, speculative=SpeculativeRule(1))
