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
    """Counts the blocks the native code runs (a spy: the blocks themselves run)."""

    def __init__(self, blocks):
        self.blocks, self.calls, self.blocks_run = blocks, 0, 0

    def __call__(self, first, last, *args):
        self.calls += 1
        self.blocks_run += last - first + 1
        return self.blocks(first, last, *args)


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
    fast.native_blocks = Counting(fast.native_blocks)
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
    # Prefill (short prompts) and 12 steps, each one call per stretch between exits (depths 2, 3
    # and L: blocks 1-2, 3, 4-L), not one per block.
    assert fast.native_blocks.blocks_run == 13 * max(depths)
    assert fast.native_blocks.calls == 13 * 3
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


def test_a_sequence_of_several_new_tokens_equals_the_general_path(tiny_v1):
    """A cached row of several tokens (a verified draft, a short prompt chunk) goes through the
    native blocks in position order: each token sees the ones before it and none after."""
    _, ckpt = tiny_v1
    c = ckpt.config
    weights = ModelWeights.from_checkpoint(ckpt)
    gen = torch.Generator().manual_seed(8)
    prompt, draft = (torch.randint(0, c.vocab_size, (n,), generator=gen).tolist() for n in (7, 5))
    L = c.num_hidden_layers
    results = []
    for native in (True, False):
        runner = ModelRunner(weights, KVCache(96, 4, c.num_key_value_heads, c.head_dim))
        calls = runner.native_blocks = Counting(runner.native_blocks) if native else None
        kv, other = SequenceKV(), SequenceKV()
        assert runner.kv_cache.reserve(kv, L, 12) and runner.kv_cache.reserve(other, L, 5)
        runner.forward([Row(prompt, 0, L, kv), Row(draft[:3], 0, L, other)])
        out = runner.forward([Row(draft, 7, L, kv, {L: "all"}), Row(draft[3:], 3, L, other, {L: "all"})])
        assert not native or calls.calls == 2  # both steps native, one call each
        results.append((out, runner.kv_cache))
    (fast, fast_cache), (general, general_cache) = results
    for f, g in zip(fast, general):
        assert f.logits[L].shape == g.logits[L].shape
        assert rel_err(f.logits[L], g.logits[L]) < 1e-5
        assert torch.equal(f.logits[L].argmax(-1), g.logits[L].argmax(-1))
    assert rel_err(fast_cache.k, general_cache.k) < 1e-6
    assert rel_err(fast_cache.v, general_cache.v) < 1e-6
