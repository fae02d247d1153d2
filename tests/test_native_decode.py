"""The lean decode step (one native call per block for rows that each bring one cached token)
computes the general path's numbers: the same KV cache and logits, the same greedy tokens, for
every variant and the BitNet block's options, rows of different depths in one batch."""

from __future__ import annotations

import torch

from engine.kv_cache import KVCache, SequenceKV
from engine.model_runner import ModelRunner, Row
from engine.weights import ModelWeights


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class Counting:
    """Counts the calls of one native block (a spy: the block itself runs)."""

    def __init__(self, block):
        self.block, self.calls = block, 0

    def __call__(self, *args):
        self.calls += 1
        return self.block(*args)


def decode(runner: ModelRunner, prompts: list[list[int]], depths: list[int], steps: int):
    """Prefill every prompt, then `steps` greedy single-token steps of all rows together."""
    c = runner.config
    kvs = [SequenceKV() for _ in prompts]
    for kv, p, d in zip(kvs, prompts, depths):
        assert runner.kv_cache.reserve(kv, d, len(p) + steps)
    outs = runner.forward([Row(p, 0, d, kv, {d: "last"}) for p, kv, d in zip(prompts, kvs, depths)])
    tokens = [[int(o.logits[d][-1].argmax())] for o, d in zip(outs, depths)]
    logits = []
    for step in range(steps):
        rows = [Row([t[-1]], len(p) + step, d, kv, {d: "last"})
                for t, p, kv, d in zip(tokens, prompts, kvs, depths)]
        outs = runner.forward(rows)
        logits.append([o.logits[d][-1] for o, d in zip(outs, depths)])
        for t, o, d in zip(tokens, outs, depths):
            t.append(int(o.logits[d][-1].argmax()))
    assert all(len(kv.tables) <= c.num_hidden_layers for kv in kvs)
    return tokens, logits


def test_native_decode_step_equals_general_path(tiny):
    _, ckpt = tiny
    c = ckpt.config
    weights = ModelWeights.from_checkpoint(ckpt)

    def runner() -> ModelRunner:
        return ModelRunner(weights, KVCache(96, 4, c.num_key_value_heads, c.head_dim))

    fast, general = runner(), runner()
    assert fast.native_blocks is not None
    fast.native_blocks = [Counting(b) for b in fast.native_blocks]
    general.native_blocks = None
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, c.vocab_size, (n,), generator=gen).tolist() for n in (5, 11, 1)]
    depths = [c.num_hidden_layers, 2, 3]
    got_tokens, got = decode(fast, prompts, depths, 12)
    want_tokens, want = decode(general, prompts, depths, 12)
    assert got_tokens == want_tokens
    for g_step, w_step in zip(got, want):
        for g, w in zip(g_step, w_step):
            assert rel_err(g, w) < 1e-5
    assert sum(b.calls for b in fast.native_blocks) == 12 * max(depths)
    # The caches agree too (written by the native blocks on one side, torch on the other).
    assert rel_err(fast.kv_cache.k, general.kv_cache.k) < 1e-6
    assert rel_err(fast.kv_cache.v, general.kv_cache.v) < 1e-6


def test_decode_rows_in_a_batch_equal_each_row_alone(tiny_v1):
    _, ckpt = tiny_v1
    c = ckpt.config
    weights = ModelWeights.from_checkpoint(ckpt)
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, c.vocab_size, (n,), generator=gen).tolist() for n in (3, 8, 6)]
    depths = [4, 4, 1]
    together, _ = decode(ModelRunner(weights, KVCache(96, 4, c.num_key_value_heads, c.head_dim)),
                         prompts, depths, 10)
    for p, d, tokens in zip(prompts, depths, together):
        alone, _ = decode(ModelRunner(weights, KVCache(96, 4, c.num_key_value_heads, c.head_dim)), [p], [d], 10)
        assert alone[0] == tokens
