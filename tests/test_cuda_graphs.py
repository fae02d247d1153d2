"""What only a CUDA device can run: decode steps replayed from CUDA graphs, and seeded sampling
on the device inside a running engine. The only tests allowed to skip (no GPU here)."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
os.environ.setdefault("BITSKIP_TRITON_AUTOTUNE", "0")

from conftest import reference_model, write_packed  # noqa: E402
from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402


@pytest.fixture(scope="module", params=["v1", "v2"])
def ckpt(request, tmp_path_factory):
    return write_packed(reference_model(request.param), tmp_path_factory.mktemp(request.param))


def test_graph_replays_give_the_eager_tokens_with_rows_leaving_at_every_exit(ckpt):
    L = ckpt.config.num_hidden_layers
    prompts = [[3 + i, 17 * i % 300, 40, 41 + i][: 1 + i % 4] for i in range(11)]
    exits = [1 + i % L for i in range(11)]
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    outs = {}
    for eager in (True, False):
        engine = LLMEngine(ckpt, EngineConfig(device="cuda", enforce_eager=eager, max_num_seqs=16))
        outs[eager] = [s.output_ids for s in engine.generate(prompts, params, exits)]
        graphs = engine.runner.decode_graphs
        assert graphs.steps > 0
        assert bool(graphs.graphs) != eager   # captured only without --enforce-eager
    assert outs[True] == outs[False]
    # and the torch backend on the CPU gives the same greedy tokens
    cpu = LLMEngine(ckpt, EngineConfig(device="cpu", max_num_seqs=16))
    assert [s.output_ids for s in cpu.generate(prompts, params, exits)] == outs[False]


def test_a_seeded_request_samples_the_same_tokens_alone_and_in_a_batch(ckpt):
    engine = LLMEngine(ckpt, EngineConfig(device="cuda", max_num_seqs=8))
    seeded = SamplingParams(max_tokens=6, temperature=0.9, top_k=40, top_p=0.95, seed=11, ignore_eos=True)
    alone = engine.generate([[5, 6, 7]], seeded)[0].output_ids
    others = SamplingParams(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    engine2 = LLMEngine(ckpt, EngineConfig(device="cuda", max_num_seqs=8))
    seqs = [engine2.add_request([9, 9], others, 2), engine2.add_request([5, 6, 7], seeded),
            engine2.add_request([1], others, 1)]
    while engine2.has_unfinished():
        engine2.step()
    assert seqs[1].output_ids == alone


def test_warm_up_captures_every_bucket_and_segment_before_the_first_request(ckpt):
    engine = LLMEngine(ckpt, EngineConfig(device="cuda", max_num_seqs=8))
    graphs = engine.runner.decode_graphs
    segments = len(graphs.stops)
    assert engine.warm_up() == len(graphs.buckets) * segments == len(graphs.graphs)
    assert not engine.has_unfinished() and engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
    captured = dict(graphs.graphs)
    prompts, exits = [[4, 5, 6], [7], [8, 9]], [None, 1, 2]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    warm = [s.output_ids for s in engine.generate(prompts, params, exits)]
    assert graphs.graphs == captured          # nothing captured while serving
    cold = LLMEngine(ckpt, EngineConfig(device="cuda", max_num_seqs=8))
    assert [s.output_ids for s in cold.generate(prompts, params, exits)] == warm


def test_warm_up_does_nothing_without_graphs(ckpt):
    engine = LLMEngine(ckpt, EngineConfig(device="cuda", enforce_eager=True, max_num_seqs=8))
    assert engine.warm_up() == 0 and engine.runner.decode_graphs.steps == 0
