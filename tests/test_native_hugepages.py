"""The native blocks' packed weights in huge pages (engine/kernels/native/hugepages.py): copies
with the same bytes, every holder rebound to them, a 2 MiB-aligned arena; and when madvise is
refused, the tensors left exactly as they were and decoding unchanged."""

from __future__ import annotations

import errno

import pytest
import torch

from engine.kernels.native import hugepages
from engine.kv_cache import KVCache
from engine.model_runner import ModelRunner
from engine.weights import ModelWeights
from tests.test_native_decode import decode, rel_err


def packed(sizes: list[int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(len(sizes))
    return [torch.randint(0, 256, (n, 12), generator=gen, dtype=torch.uint8) for n in sizes]


def test_move_copies_the_bytes_and_rebinds_every_holder():
    tensors = packed([1, 7, 300, 5])
    want = [t.clone() for t in tensors]
    holders = dict(enumerate(tensors))  # e.g. the checkpoint's dict of tensors
    assert hugepages.move_to_huge_pages(tensors), "madvise(MADV_HUGEPAGE) is there on Linux"
    assert tensors[0].data_ptr() % hugepages.HUGE_PAGE == 0  # the arena's start
    spans = [(t.data_ptr(), t.data_ptr() + t.numel()) for t in tensors]
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # in order, no overlap
    for i, (t, w) in enumerate(zip(tensors, want)):
        assert holders[i] is t and torch.equal(t, w) and t.shape == w.shape
        assert t.data_ptr() % hugepages.ALIGN == 0
    tensors[1][0, 0] ^= 1  # the copies are the tensors' memory now, writable
    assert holders[1][0, 0] == want[1][0, 0] ^ 1
    # Moved once: a second call (weights shared by a second model) leaves them where they are.
    assert hugepages.move_to_huge_pages(tensors + packed([2])) and spans[0][0] == tensors[0].data_ptr()


def refuse(mm, offset, length):
    """madvise as a kernel without transparent huge pages answers it."""
    raise OSError(errno.EINVAL, "Invalid argument")


def test_refused_madvise_leaves_the_tensors_as_they_were(monkeypatch):
    monkeypatch.setattr(hugepages, "_advise", refuse)
    tensors = packed([3, 4])
    ptrs, want = [t.data_ptr() for t in tensors], [t.clone() for t in tensors]
    assert not hugepages.move_to_huge_pages(tensors)
    assert [t.data_ptr() for t in tensors] == ptrs
    assert all(torch.equal(t, w) for t, w in zip(tensors, want))


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("BITSKIP_HUGEPAGES", "0")
    tensors = packed([2])
    ptr = tensors[0].data_ptr()
    assert not hugepages.move_to_huge_pages(tensors) and tensors[0].data_ptr() == ptr


def test_other_tensors_are_refused():
    with pytest.raises(ValueError, match="contiguous uint8"):
        hugepages.move_to_huge_pages([torch.zeros(4, 4, dtype=torch.uint8).t()])
    with pytest.raises(ValueError, match="contiguous uint8"):
        hugepages.move_to_huge_pages([torch.zeros(4, dtype=torch.int32)])


@pytest.mark.parametrize("refused", [False, True], ids=["huge-pages", "madvise-refused"])
def test_native_blocks_decode_the_general_paths_numbers_either_way(tiny_v1, monkeypatch, refused):
    """The weights are shared by both models (one checkpoint): the general path's projections,
    made before the move, still read them where they are now."""
    _, ckpt = tiny_v1
    c = ckpt.config
    if refused:
        monkeypatch.setattr(hugepages, "_advise", refuse)
    fast_weights, general_weights = ModelWeights.from_checkpoint(ckpt), ModelWeights.from_checkpoint(ckpt)
    before = fast_weights.layers[0].qkv_proj._matmul.parts[0].data_ptr()
    fast = ModelRunner(fast_weights, KVCache(96, 4, c.num_key_value_heads, c.head_dim))
    general = ModelRunner(general_weights, KVCache(96, 4, c.num_key_value_heads, c.head_dim))
    general.native_blocks = None
    assert fast.native_blocks.huge_pages is not refused
    moved = fast_weights.layers[0].qkv_proj._matmul.parts[0].data_ptr() != before
    assert moved is not refused
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, c.vocab_size, (n,), generator=gen).tolist() for n in (6, 2)]
    depths = [c.num_hidden_layers, 2]
    got_tokens, got = decode(fast, prompts, depths, 6)
    want_tokens, want = decode(general, prompts, depths, 6)
    assert got_tokens == want_tokens
    assert all(rel_err(g, w) < 1e-5 for gs, ws in zip(got, want) for g, w in zip(gs, ws))
