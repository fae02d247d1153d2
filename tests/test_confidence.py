"""The confidence exit policy: per-token exits at exit points, with a KV cache that always equals
full-depth processing of the same tokens."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.exit_policy import ConfidenceRule
from engine.kv_cache import KVCache, SequenceKV
from engine.model_runner import ModelRunner, Row

from conftest import reference_model, write_packed

GREEDY = SamplingParams(max_tokens=40, ignore_eos=True)


def sure_model(variant="v1"):
    """A tiny model with a sharpened head, so that confidence varies from token to token."""
    model = reference_model(variant, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model


def engine_for(model, tmp_path, **kw) -> LLMEngine:
    return LLMEngine(write_packed(model, tmp_path / "ckpt"), EngineConfig(**kw))


def run_until(engine: LLMEngine, seq, n_tokens: int) -> None:
    while len(seq.output_ids) < n_tokens:
        engine.step()


def full_depth_cache(engine: LLMEngine, ids: list[int]):
    """K and V of every layer after a full-depth prefill of `ids` in a fresh cache."""
    c = engine.model_config
    cache = KVCache(64, engine.config.block_size, c.num_key_value_heads, c.head_dim)
    runner = ModelRunner(engine.weights, cache)
    kv = SequenceKV()
    cache.reserve(kv, c.num_hidden_layers, len(ids))
    runner.forward([Row(ids, 0, c.num_hidden_layers, kv)])
    return cache, kv


def layer_kv(cache: KVCache, kv: SequenceKV, layer: int, n: int):
    slots = cache.slots([kv.tables[layer - 1]], n)[0]
    return cache.k[slots], cache.v[slots]


@pytest.mark.parametrize("variant", ["v1", "v3"])
def test_cache_equals_full_depth_prefill_after_confidence_generation(tmp_path, variant):
    engine = engine_for(sure_model(variant), tmp_path)
    L = engine.model_config.num_hidden_layers
    # A threshold in the middle of the model's confidence range mixes early and full-depth exits.
    seq = engine.add_request(list(range(40, 52)), GREEDY, confidence=engine.confidence_rule(0.6))
    run_until(engine, seq, 30)
    exits = set(seq.exit_layers)
    assert len(exits) >= 2 and L in exits and exits - {L}, f"test needs mixed exits, got {seq.exit_layers}"
    assert engine.runner.deferred_fills > 0
    ids = seq.all_ids[:seq.num_computed]
    depths = [L] * len(ids)
    if seq.pending is not None:
        depths[len(ids) - len(seq.pending.depths):] = seq.pending.depths
    assert all(a >= b for a, b in zip(depths, depths[1:])), "depth must not increase along positions"
    ref_cache, ref_kv = full_depth_cache(engine, ids)
    for layer in range(1, L + 1):
        n = sum(d >= layer for d in depths)  # positions holding KV at this layer (a prefix)
        got_k, got_v = layer_kv(engine.kv_cache, seq.kv, layer, n)
        want_k, want_v = layer_kv(ref_cache, ref_kv, layer, n)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v), f"layer {layer}"


def test_threshold_one_runs_every_token_at_full_depth(tmp_path):
    engine = engine_for(reference_model("v1"), tmp_path)  # a random model is never that sure
    L = engine.model_config.num_hidden_layers
    prompt = [256, 10, 20, 30, 40]
    dyn = engine.add_request(prompt, GREEDY, confidence=engine.confidence_rule(1.0))
    fixed = engine.add_request(prompt, GREEDY, exit_layer=L)
    while engine.has_unfinished():
        engine.step()
    assert dyn.exit_layers == [L] * len(dyn.output_ids)
    assert dyn.output_ids == fixed.output_ids
    assert engine.runner.deferred_fills == 0


@pytest.mark.parametrize("min_exit", [1, 2, 3])
def test_threshold_zero_exits_at_the_first_allowed_point(tmp_path, min_exit):
    engine = engine_for(sure_model(), tmp_path)
    prompt = [256, 5, 6, 7, 8, 9]
    dyn = engine.add_request(prompt, GREEDY, confidence=engine.confidence_rule(0.0, min_exit))
    fixed = engine.add_request(prompt, GREEDY, exit_layer=min_exit)
    while engine.has_unfinished():
        engine.step()
    assert dyn.exit_layers == [min_exit] * len(dyn.output_ids)
    assert dyn.output_ids == fixed.output_ids
    # The dynamic request never ran deeper than its exits, so nothing was deferred.
    assert engine.runner.blocks_run[min_exit + 1:] == [0] * (4 - min_exit)


def test_mixed_batches_give_the_same_tokens_as_requests_alone(tmp_path):
    model = sure_model()
    requests = [(list(range(30, 30 + n)), dict(confidence=ConfidenceRule(t, (1, 2, 3), m)))
                for n, t, m in [(3, 0.5, 1), (9, 0.7, 2), (5, 0.9, 1)]]
    requests += [(list(range(60, 60 + n)), dict(exit_layer=k)) for n, k in [(4, 2), (7, 4), (2, 1)]]
    alone = []
    for i, (ids, kw) in enumerate(requests):
        engine = engine_for(model, tmp_path / f"alone{i}")
        alone.append(engine.add_request(ids, GREEDY, **kw))
        while engine.has_unfinished():
            engine.step()
    engine = engine_for(model, tmp_path / "together", max_num_batched_tokens=7)
    together = [engine.add_request(ids, GREEDY, **kw) for ids, kw in requests]
    while engine.has_unfinished():
        engine.step()
    for a, b in zip(alone, together):
        assert a.output_ids == b.output_ids
        assert a.exit_layers == b.exit_layers
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_exits_are_exit_points_or_full_depth(tmp_path):
    engine = engine_for(sure_model(), tmp_path)
    seq = engine.add_request([256, 1, 2, 3], GREEDY, confidence=engine.confidence_rule(0.6, 2))
    while engine.has_unfinished():
        engine.step()
    assert set(seq.exit_layers) <= {2, 3, 4} and seq.exit_label == "dynamic"


def test_confidence_measures():
    logits = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    prob = ConfidenceRule(0.55, (1,), measure="probability")
    margin = ConfidenceRule(0.35, (1,), measure="margin")
    assert abs(prob.confidence(logits) - 0.6) < 1e-6 and prob.accepts(logits)
    assert abs(margin.confidence(logits) - 0.3) < 1e-6 and not margin.accepts(logits)
    assert ConfidenceRule(0.5, (6, 12, 18), min_exit_layer=7).first_exit(24) == 12
    assert ConfidenceRule(0.5, (6, 12, 18), min_exit_layer=19).first_exit(24) == 24
    with pytest.raises(ValueError, match="threshold"):
        ConfidenceRule(1.5, (1,))
    with pytest.raises(ValueError, match="confidence_measure"):
        ConfidenceRule(0.5, (1,), measure="entropy")
