"""The native blocks' numbers do not depend on how they are computed: one thread or two (the team
of engine/kernels/native/team.h), the AVX2 or the portable kernels and attention, a row alone or in
a batch. Every comparison is bit for bit, on the calls a real decode makes (rows of several
prompt tokens, then rows of one cached token each)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import native
from engine.kv_cache import KVCache, SequenceKV
from engine.model_runner import ModelRunner, Row
from engine.weights import ModelWeights
from tests.conftest import reference_model, write_packed

# Wide enough that a call of two rows runs on a team of two threads (decode_block.c
# PARALLEL_WORK), grouped-query attention with four query heads per KV head.
WIDE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2)


@pytest.fixture(params=["v1", "v2"])
def calls(request, tmp_path):
    """The native calls of a prefill (prompts of 5, 9 and 3 tokens) and of two decode steps."""
    ckpt = write_packed(reference_model(request.param, **WIDE), tmp_path / "wide")
    c = ckpt.config
    runner = ModelRunner(ModelWeights.from_checkpoint(ckpt), KVCache(64, 4, c.num_key_value_heads, c.head_dim))
    blocks, seen = runner.native_blocks, []
    assert blocks is not None

    def spy(first, last, h, positions, tables, block_size, cache_k, cache_v, cos, sin):
        seen.append((first, last, h.clone(), positions.clone(), tables.clone(), block_size,
                     cache_k.clone(), cache_v.clone(), cos, sin))
        return blocks(first, last, h, positions, tables, block_size, cache_k, cache_v, cos, sin)

    runner.native_blocks = spy
    L = c.num_hidden_layers
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, c.vocab_size, (n,), generator=gen).tolist() for n in (5, 9, 3)]
    kvs = [SequenceKV() for _ in prompts]
    assert all(runner.kv_cache.reserve(kv, L, len(p) + 2) for kv, p in zip(kvs, prompts))
    runner.forward([Row(p, 0, L, kv) for p, kv in zip(prompts, kvs)])
    for step in range(2):
        runner.forward([Row([7 + step], len(p) + step, L, kv) for p, kv in zip(prompts, kvs)])
    assert [int(call[2].shape[0]) for call in seen] == [17, 3, 3]
    return blocks, seen


def run(blocks, call, threads: int = 1, rows: slice | None = None):
    """One captured call again on fresh copies of its inputs: (h, cache_k, cache_v) after it."""
    first, last, h, positions, tables, block_size, cache_k, cache_v, cos, sin = call
    if rows is not None:
        h, positions, tables = h[rows], positions[rows], tables[:, rows]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        k, v = cache_k.clone(), cache_v.clone()
        out = blocks(first, last, h.clone().contiguous(), positions.contiguous(), tables.contiguous(),
                     block_size, k, v, cos, sin)
    finally:
        torch.set_num_threads(before)
    return out, k, v


def assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_two_threads_compute_the_same_bits_as_one(calls):
    blocks, seen = calls
    for call in seen:
        assert_same(run(blocks, call, threads=2), run(blocks, call, threads=1))


def test_prefetching_while_waiting_changes_no_bits(calls):
    """team.h's waiting members prefetch the next product's weights (team_ahead); off, the same
    numbers."""
    blocks, seen = calls
    lib = native.library()
    want = [run(blocks, call, threads=2) for call in seen]
    lib.bitskip_decode_prefetch(0)
    try:
        got = [run(blocks, call, threads=2) for call in seen]
    finally:
        lib.bitskip_decode_prefetch(1)
    for g, w in zip(got, want):
        assert_same(g, w)


def test_portable_kernels_compute_the_same_bits_as_avx2(calls):
    blocks, seen = calls
    lib = native.library()
    if not lib.bitskip_has_avx2():
        pytest.skip("this CPU has no AVX2")  # never on the project's machines (AVX2)
    want = [run(blocks, call, threads=2) for call in seen]
    lib.bitskip_force_portable(1)
    lib.bitskip_attention_force_portable(1)
    try:
        got = [run(blocks, call, threads=2) for call in seen]
    finally:
        lib.bitskip_force_portable(0)
        lib.bitskip_attention_force_portable(0)
    for g, w in zip(got, want):
        assert_same(g, w)


def test_a_row_alone_computes_the_same_bits_as_in_its_batch(calls):
    blocks, seen = calls
    prefill, step = seen[0], seen[2]
    # The prefill's rows are the prompts' tokens, each prompt's consecutive (5, 9, 3).
    for call, spans in ((prefill, [slice(0, 5), slice(5, 14), slice(14, 17)]),
                        (step, [slice(r, r + 1) for r in range(3)])):
        h, k, v = run(blocks, call, threads=2)
        for rows in spans:
            h1, k1, v1 = run(blocks, call, threads=2, rows=rows)
            assert torch.equal(h1, h[rows])
            # Its KV entries too: the slots other rows wrote hold their values from before.
            written = (k1 != call[6]).any(dim=(1, 2))
            assert written.any() and torch.equal(k1[written], k[written])
            assert torch.equal(v1[written], v[written])


def test_a_sequences_rows_attended_together_equal_one_row_at_a_time(calls):
    """Consecutive tokens of one sequence attend together (attention.c: each cached K/V row read
    once for all of them, in runs of up to 8): the same bits as each token alone, one call after
    another in position order, each seeing the cache its predecessors wrote."""
    blocks, seen = calls
    prefill = seen[0]
    rows = slice(5, 14)  # the 9-token prompt: a run of 8, then 1
    h, k, v = run(blocks, prefill, threads=2, rows=rows)
    first, last, h0, positions, tables, *rest = prefill
    cache_k, cache_v = rest[1].clone(), rest[2].clone()
    for r in range(rows.start, rows.stop):
        call = (first, last, h0[r:r + 1], positions[r:r + 1], tables[:, r:r + 1], rest[0], cache_k, cache_v,
                *rest[3:])
        out, cache_k, cache_v = run(blocks, call, threads=1)
        assert torch.equal(out[0], h[r - rows.start])
    assert torch.equal(cache_k, k) and torch.equal(cache_v, v)
