"""The screened head (engine/kernels/native/head_screen.c): its argmax (first index on ties) is the
full float32 head's on random and adversarial inputs, its candidates' logits are the full head's
bits, a row's output does not depend on the batch or the threads, and greedy generation gives the
same tokens with it as without it (BITSKIP_HEAD_SCREEN=0), while rows that read more than the
argmax (logprobs, sampling) still get every logit."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.kernels import native
from engine.kernels.native.screened_head import ScreenedHead
from models.checkpoint import load_checkpoint
from models.default_model import BUNDLED

from conftest import reference_model, write_packed
from test_native_head import lib  # noqa: F401  (the fixture: the AVX2 and the portable path)

INF = float("inf")


def check(lib, w: torch.Tensor, x: torch.Tensor, screen: ScreenedHead | None = None) -> torch.Tensor:
    """The screened logits of x, checked against the full head: same argmax, candidates' exact
    bits, -inf elsewhere. Returns the candidate mask."""
    screen = screen or ScreenedHead(lib, w)
    full, got = native.head_matmul(lib, x, w), screen(x)
    cand = got != -INF
    assert torch.equal(got[cand], full[cand])
    assert torch.equal(got.argmax(1), full.argmax(1)), (got.argmax(1), full.argmax(1))
    # every row that ties with the maximum is there (so is the first of them)
    assert bool(cand[full == full.max(1, keepdim=True).values].all())
    return cand


def test_random_shapes(lib):
    gen = torch.Generator().manual_seed(3)
    for _ in range(60):
        m, k, v = (int(torch.randint(lo, hi, (1,), generator=gen)) for lo, hi in ((1, 6), (1, 300), (1, 2000)))
        w = torch.randn(v, k, generator=gen) * float(torch.rand(1, generator=gen)) * 4
        check(lib, w, torch.randn(m, k, generator=gen) * 10 ** float(torch.randn(1, generator=gen)))


def test_many_rows_and_unscreenable_rows_in_one_batch(lib):
    """More rows than one level-1 pass serves (8), some of which cannot be screened."""
    gen = torch.Generator().manual_seed(8)
    w, x = torch.randn(700, 130, generator=gen), torch.randn(19, 130, generator=gen)
    x[[3, 12], 5] = float("nan")
    x[17, 0] = INF
    got, full = ScreenedHead(lib, w)(x), native.head_matmul(lib, x, w)
    fine = [i for i in range(19) if i not in (3, 12, 17)]
    check(lib, w, x[fine])
    assert torch.equal(got[fine].argmax(1), full[fine].argmax(1))
    assert torch.equal(got[[3, 12, 17]].nan_to_num(), full[[3, 12, 17]].nan_to_num())


def test_it_screens(lib):
    """Not vacuous: on a random head most rows are ruled out, so reading them exactly is skipped."""
    gen = torch.Generator().manual_seed(4)
    w, x = torch.randn(5000, 256, generator=gen), torch.randn(3, 256, generator=gen)
    assert int(check(lib, w, x).sum()) < 3 * 5000 // 20


def test_near_ties(lib):
    """Rows that differ from the best one by an ulp-scale change in one weight (the 8-bit copy
    cannot tell them apart), exact duplicates (the first index wins), and activations along either
    level's error (where the approximation is worst)."""
    gen = torch.Generator().manual_seed(5)
    k = 96
    for trial in range(40):
        base = torch.randn(k, generator=gen)
        rows = [torch.randn(k, generator=gen) for _ in range(50)]
        for j in range(20):
            r = base.clone()
            i = int(torch.randint(0, k, (1,), generator=gen))
            r[i] = torch.nextafter(r[i], torch.tensor(INF if j % 2 else -INF))
            rows.append(r)
        rows += [base.clone(), base.clone()]
        order = torch.randperm(len(rows), generator=gen)
        w = torch.stack(rows)[order].contiguous()
        screen = ScreenedHead(lib, w)
        xs = [base, base + 1e-3 * torch.randn(k, generator=gen)]
        for codes in screen.levels():  # what each level's copy misses
            err = (w.double() - screen.scale[:, None].double() * codes).float()
            xs += [err[int(torch.randint(0, len(rows), (1,), generator=gen))],
                   base / base.norm() + err[order.argsort()[-1]] * 50]
        check(lib, w, torch.stack(xs), screen)
    w = torch.randn(7, 40, generator=gen).repeat(3, 1)  # every row three times
    assert check(lib, w, torch.randn(4, 40, generator=gen)).sum() >= 4


def test_zero_and_tiny_activations(lib):
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(300, 64, generator=gen)
    x = torch.stack([torch.zeros(64), torch.randn(64, generator=gen) * 1e-40, torch.randn(64, generator=gen) * 1e-30])
    cand = check(lib, w, x)
    assert bool(cand[0].all())  # every logit is 0: all tie, the first index wins
    check(lib, w * 1e-30, x)


def test_rows_that_cannot_be_screened_get_the_full_head(lib):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(200, 48, generator=gen)
    x = torch.randn(3, 48, generator=gen)
    x[1, 5] = float("nan")
    x[2, 7] = INF
    got, full = ScreenedHead(lib, w)(x), native.head_matmul(lib, x, w)
    assert torch.equal(got[1:].isnan(), full[1:].isnan()) and torch.equal(got[1:].nan_to_num(), full[1:].nan_to_num())
    w[3, 3] = INF  # nothing can be bounded: every row gets the full head
    screen = ScreenedHead(lib, w)
    assert not screen.usable
    assert torch.equal(screen(x[:1]), native.head_matmul(lib, x[:1], w))


@pytest.mark.parametrize("threads", [1, 2])
def test_a_row_alone_equals_the_row_in_a_batch(lib, threads):
    gen = torch.Generator().manual_seed(threads)
    w, x = torch.randn(3000, 256, generator=gen), torch.randn(6, 256, generator=gen)
    screen = ScreenedHead(lib, w)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batch = screen(x)
        for i in range(6):
            assert torch.equal(screen(x[i:i + 1])[0], batch[i])
    finally:
        torch.set_num_threads(before)


def generate(ckpt, monkeypatch, screen: bool):
    """Greedy rows at several depths beside rows that read every logit (logprobs, sampling)."""
    monkeypatch.setenv("BITSKIP_HEAD_SCREEN", "1" if screen else "0")
    engine = LLMEngine(ckpt, EngineConfig(max_num_seqs=6))
    vocab, L = ckpt.config.vocab_size, ckpt.config.num_hidden_layers
    prompts = [[(31 * i + 7 * j) % vocab for j in range(3 + 2 * i)] for i in range(6)]
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    seqs = [engine.add_request(p, greedy, k) for p, k in zip(prompts[:4], [L, L - 1, 1, L])]
    seqs.append(engine.add_request(prompts[4], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=2)))
    seqs.append(engine.add_request(prompts[5], SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.8, seed=3)))
    while engine.has_unfinished():
        engine.step()
    screened = engine.runner.backend._screened
    return [(s.output_ids, s.logprobs) for s in seqs], screened and screened[1].computed


@pytest.mark.parametrize("model", ["default", "paper-1b-shaped"])
def test_generation_is_the_same_with_the_screened_head(model, tmp_path, monkeypatch):
    if model == "default":
        ckpt = load_checkpoint(BUNDLED)
    else:  # the paper's vocabulary and an untied head, narrow
        ckpt = write_packed(reference_model("v1", vocab_size=50257, hidden_size=64, tie_word_embeddings=False),
                            tmp_path / "p1b-shaped")
    with_screen, computed = generate(ckpt, monkeypatch, True)
    without, none = generate(ckpt, monkeypatch, False)
    assert with_screen == without and none is None
    # the greedy rows' 4 x 12 heads read far fewer exact rows than the vocabulary each
    assert 0 < computed < 48 * ckpt.config.vocab_size // 10
