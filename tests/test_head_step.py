"""The head as a decode step calls it (engine/kernels/native/head_step.c): the final RMSNorm, the
head and each greedy row's argmax in one native call. The logits follow the reference math; the
greedy tokens are torch.argmax of the float32 head's logits (first index on ties, a NaN first of
all), with the float32 head or the screened copy, on the AVX2 and the portable path."""

from __future__ import annotations

import torch

from engine.kernels.native.head_step import NativeHead
from engine.kernels.native.screened_head import ScreenedHead
from models.functional import rms_norm

from test_native_head import lib  # noqa: F401  (the fixture: the AVX2 and the portable path)

INF = float("inf")


def heads(lib, w, norm):
    return {"float32": NativeHead(lib, norm, 1e-5, w, None),
            "screened": NativeHead(lib, norm, 1e-5, w, ScreenedHead(lib, w))}


def test_logits_follow_the_reference_and_tokens_are_their_argmax(lib):
    gen = torch.Generator().manual_seed(3)
    for v, k, m in ((300, 64, 1), (1000, 200, 5), (77, 13, 3)):
        w, norm = torch.randn(v, k, generator=gen), torch.rand(k, generator=gen) + 0.5
        h = torch.randn(m, k, generator=gen) * 3
        want = torch.nn.functional.linear(rms_norm(h.double(), norm.double(), 1e-5), w.double())
        for name, head in heads(lib, w, norm).items():
            logits = head.logits(h)
            assert (logits.double() - want).abs().max() < 1e-4 * want.abs().max(), name
            assert head.greedy(h) == logits.argmax(1).tolist(), name
            assert head.greedy(h[1:]) == logits[1:].argmax(1).tolist(), name  # a row alone or in a batch


def test_ties_nan_and_inf_give_torch_argmax(lib):
    gen = torch.Generator().manual_seed(4)
    w, norm = torch.randn(203, 40, generator=gen), torch.ones(40)  # 203: a tail past the vector body
    w[19] = w[150] = w[17]  # ties with an earlier row, in its vector of 8 and later: the first wins
    w[201] = w[17]  # a tie in the tail
    h = torch.randn(4, 40, generator=gen)
    h[0] = w[17] * 10  # row 17 (and its copies) the largest
    h[1, 3] = float("nan")  # every logit NaN: index 0
    h[3] = -w[17] * 10
    for name, head in heads(lib, w, norm).items():
        tokens, logits = head.greedy(h), head.logits(h)
        assert tokens == logits.argmax(1).tolist(), name
        assert tokens[0] == 17 and tokens[1] == 0, name
    w2 = w.clone()
    w2[190, 5] = float("nan")  # one NaN logit in the tail of every row: torch.argmax takes it
    w2[60, 1] = INF
    for name, head in heads(lib, w2, norm).items():
        tokens, logits = head.greedy(h), head.logits(h)
        assert tokens == logits.argmax(1).tolist(), name
        assert 190 in tokens or 60 in tokens, name
