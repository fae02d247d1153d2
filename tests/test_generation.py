"""LLMEngine.generate / step against the reference model: greedy tokens at every exit layer,
per-request depth (no block or KV above a request's exit), continuous batching, chunked prefill,
preemption, sampling, stop conditions, abort and request validation."""

from __future__ import annotations

import collections

import pytest
import torch

from engine.detokenizer import Detokenizer
from engine.llm_engine import EngineConfig, LLMEngine
from engine.sampler import sample
from engine.sequence import SamplingParams, Status
from models.checkpoint import load_checkpoint
from models.default_model import BUNDLED
from models.tokenizer import EOS_ID, byte_level_tokenizer

from conftest import reference_model, write_packed

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


# ---- helpers -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    model = reference_model("v1")
    return model, write_packed(model, tmp_path_factory.mktemp("gen") / "tiny-v1")


@pytest.fixture(scope="module", params=["v1", "v2", "v3"])
def any_variant(request, tmp_path_factory):
    model = reference_model(request.param, seed=1)
    return model, write_packed(model, tmp_path_factory.mktemp("gen") / f"tiny-{request.param}")


def prompts(n: int, lengths, seed: int = 0, vocab: int = 256) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (lengths[i % len(lengths)],), generator=gen).tolist()
            for i in range(n)]


@torch.no_grad()
def ref_greedy(model, prompt: list[int], k: int, max_tokens: int, stop_at_eos: bool = False) -> list[int]:
    """Greedy continuation by the reference model at exit layer k, one full forward per token."""
    ids, out = list(prompt), []
    context = model.config.max_position_embeddings
    while len(out) < max_tokens and len(ids) < context:
        t = int(model(torch.tensor([ids]), [k])[k][0, -1].argmax())
        out.append(t)
        ids.append(t)
        if stop_at_eos and t == EOS_ID:
            break
    return out


def check_kv_invariants(engine: LLMEngine) -> None:
    """Running sequences hold KV for exactly their exit layers; no block is owned twice."""
    owned = []
    for seq in engine.scheduler.running:
        assert seq.status is Status.RUNNING
        assert len(seq.kv.tables) == seq.exit_layer, (seq.exit_layer, len(seq.kv.tables))
        assert seq.kv.capacity >= seq.num_computed
        for table in seq.kv.tables:
            owned += table
    for seq in engine.scheduler.waiting:
        assert seq.kv.tables == []
    assert len(owned) == len(set(owned))
    assert engine.kv_cache.num_free_blocks + len(owned) == engine.kv_cache.num_blocks


def run_to_end(engine: LLMEngine, max_steps: int = 10_000) -> dict:
    """step() until done, checking invariants after every step; returns streamed text per seq."""
    streamed = collections.defaultdict(str)
    for _ in range(max_steps):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            assert not (out.seq.finished and not out.finished)
            streamed[out.seq] += out.text_delta
        check_kv_invariants(engine)
    assert not engine.has_unfinished()
    return streamed


def all_free(engine: LLMEngine) -> bool:
    return engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


# ---- greedy equals the reference, per exit layer --------------------------------------------
def test_greedy_equals_reference_loop_at_every_exit(any_variant):
    model, ckpt = any_variant
    engine = LLMEngine(ckpt, EngineConfig())
    L = model.config.num_hidden_layers
    ps = prompts(2, [5, 9], seed=11)
    for k in range(1, L + 1):
        seqs = engine.generate(ps, GREEDY, exit_layers=k)
        for p, seq in zip(ps, seqs):
            assert seq.output_ids == ref_greedy(model, p, k, 12), (k, p)
            assert seq.exit_layers == [k] * 12
            assert seq.finish_reason == "length"
    assert all_free(engine)


def test_default_exit_layer_is_full_depth(v1):
    model, ckpt = v1
    engine = LLMEngine(ckpt)
    p = prompts(1, [6], seed=5)[0]
    seq = engine.generate([p], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    L = model.config.num_hidden_layers
    assert seq.exit_layer == L and seq.exit_layers == [L] * 6
    assert seq.output_ids == ref_greedy(model, p, L, 6)


def test_mixed_exit_batch_equals_each_request_alone(v1):
    model, ckpt = v1
    ps = prompts(8, [3, 7, 12, 5, 1, 9, 16, 4], seed=21)
    exits = [1, 2, 3, 4, 4, 3, 2, 1]
    engine = LLMEngine(ckpt)
    batched = engine.generate(ps, GREEDY, exit_layers=exits)
    for p, k, seq in zip(ps, exits, batched):
        alone = LLMEngine(ckpt).generate([p], GREEDY, exit_layers=k)[0]
        assert seq.output_ids == alone.output_ids
        assert seq.output_ids == ref_greedy(model, p, k, 12)
        assert seq.exit_layers == [k] * len(seq.output_ids)
    assert all_free(engine)


def test_shallow_requests_never_run_or_cache_deeper_blocks(v1):
    model, ckpt = v1
    ps = prompts(6, [4, 10, 7], seed=3)
    exits = [1, 2, 2, 1, 2, 1]
    engine = LLMEngine(ckpt)
    seqs = [engine.add_request(p, GREEDY, k) for p, k in zip(ps, exits)]
    run_to_end(engine)  # checks len(seq.kv.tables) == seq.exit_layer after every step
    runs = engine.runner.blocks_run
    assert runs[3] == runs[4] == 0
    # Every token but the last sampled one is computed once, at the blocks of its request only.
    computed = [len(p) + 12 - 1 for p in ps]
    assert runs[1] == sum(computed)
    assert runs[2] == sum(n for n, k in zip(computed, exits) if k >= 2)
    for p, k, seq in zip(ps, exits, seqs):
        assert seq.output_ids == ref_greedy(model, p, k, 12)
    assert all_free(engine)


# ---- continuous batching -----------------------------------------------------------------------
def test_request_added_while_running_joins_next_step(v1):
    model, ckpt = v1
    engine = LLMEngine(ckpt)
    pa, pb = prompts(2, [6, 8], seed=7)
    a = engine.add_request(pa, GREEDY, 3)
    for _ in range(3):
        engine.step()
    assert len(a.output_ids) == 3
    b = engine.add_request(pb, GREEDY, 2)
    outs = engine.step()
    assert {o.seq for o in outs} == {a, b}  # b prefilled and sampled in the same step as a's decode
    assert b.status is Status.RUNNING and b.num_computed == len(pb) and len(b.output_ids) == 1
    assert len(a.output_ids) == 4
    run_to_end(engine)
    assert a.output_ids == ref_greedy(model, pa, 3, 12)
    assert b.output_ids == ref_greedy(model, pb, 2, 12)
    assert all_free(engine)


def test_chunked_prefill_gives_same_tokens(v1):
    model, ckpt = v1
    ps = prompts(4, [20, 13, 3, 27], seed=9)
    exits = [4, 2, 3, 1]
    big = LLMEngine(ckpt).generate(ps, GREEDY, exit_layers=exits)
    engine = LLMEngine(ckpt, EngineConfig(max_num_batched_tokens=8))
    seqs = [engine.add_request(p, GREEDY, k) for p, k in zip(ps, exits)]
    original = engine.scheduler.schedule
    sizes = []

    def recording_schedule():
        batch = original()
        sizes.append(sum(n for _, n in batch))
        return batch

    engine.scheduler.schedule = recording_schedule
    run_to_end(engine)
    assert max(sizes) <= 8
    assert sizes[0] == 8  # the 20-token prompt did not fit one step
    for p, k, s, b in zip(ps, exits, seqs, big):
        assert s.output_ids == b.output_ids == ref_greedy(model, p, k, 12)
    assert all_free(engine)


def test_preemption_under_tiny_kv_pool(v1):
    model, ckpt = v1
    ps = prompts(5, [10, 6, 14, 8, 11], seed=13)
    exits = [4, 3, 4, 2, 4]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    # block_size 4: the largest request needs ceil(26 / 4) * 4 = 28 blocks; 5 requests need ~100.
    engine = LLMEngine(ckpt, EngineConfig(block_size=4, num_kv_blocks=32))
    seqs = [engine.add_request(p, params, k) for p, k in zip(ps, exits)]
    run_to_end(engine)
    assert engine.scheduler.num_preemptions > 0
    for p, k, seq in zip(ps, exits, seqs):
        assert seq.output_ids == ref_greedy(model, p, k, 12)
        assert seq.finish_reason == "length"
    assert all_free(engine)


def test_request_larger_than_kv_pool_is_refused(v1):
    _, ckpt = v1
    engine = LLMEngine(ckpt, EngineConfig(block_size=4, num_kv_blocks=8))
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request(list(range(10)), GREEDY, 4)  # 22 positions x 4 layers = 24 blocks
    engine.add_request(list(range(10)), SamplingParams(max_tokens=2), 1)  # 3 blocks: fine


# ---- sampling ---------------------------------------------------------------------------------
def test_same_seed_same_tokens_alone_and_batched(v1):
    _, ckpt = v1
    p = prompts(1, [7], seed=17)[0]
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=1234, ignore_eos=True)
    alone = LLMEngine(ckpt).generate([p], params, 3)[0].output_ids
    engine = LLMEngine(ckpt)
    others = prompts(3, [5, 11, 2], seed=19)
    noise = [engine.add_request(o, SamplingParams(max_tokens=12, temperature=1.0, seed=i, ignore_eos=True), k)
             for i, (o, k) in enumerate(zip(others, [1, 4, 2]))]
    engine.step()
    seq = engine.add_request(p, params, 3)
    run_to_end(engine)
    assert seq.output_ids == alone
    assert all(len(n.output_ids) == 12 for n in noise)
    other_seed = LLMEngine(ckpt).generate([p], SamplingParams(max_tokens=12, temperature=1.0, seed=99,
                                                              ignore_eos=True), 3)[0].output_ids
    assert other_seed != alone  # near-uniform random model: 12 equal draws are (practically) impossible


def test_top_k_1_and_tiny_top_p_equal_greedy(v1):
    model, ckpt = v1
    ps = prompts(3, [4, 9, 6], seed=23)
    engine = LLMEngine(ckpt)
    for params in (SamplingParams(max_tokens=10, temperature=1.0, top_k=1, seed=5, ignore_eos=True),
                   SamplingParams(max_tokens=10, temperature=2.0, top_p=1e-6, seed=6, ignore_eos=True)):
        seqs = engine.generate(ps, params, exit_layers=[1, 3, 4])
        for p, k, seq in zip(ps, [1, 3, 4], seqs):
            assert seq.output_ids == ref_greedy(model, p, k, 10)


def draw(logits, params, n=2500, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return collections.Counter(sample(logits, params, gen) for _ in range(n))


def test_sampler_filters_and_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    n = 2500

    def check(counts, expected):
        assert set(counts) <= {i for i, p in enumerate(expected) if p > 0}
        for i, p in enumerate(expected):
            if p > 0:  # within ~5 standard deviations
                assert abs(counts[i] / n - p) < 5 * (p * (1 - p) / n) ** 0.5 + 1e-9, (i, counts)

    check(draw(logits, SamplingParams(temperature=1.0)), [0.5, 0.3, 0.15, 0.05])
    check(draw(logits, SamplingParams(temperature=1.0, top_k=2)), [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    # top_p keeps the smallest prefix (by probability) whose mass reaches top_p.
    check(draw(logits, SamplingParams(temperature=1.0, top_p=0.4)), [1, 0, 0, 0])
    check(draw(logits, SamplingParams(temperature=1.0, top_p=0.7)), [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    check(draw(logits, SamplingParams(temperature=1.0, top_p=0.85)), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    check(draw(logits, SamplingParams(temperature=1.0, top_p=0.97)), [0.5, 0.3, 0.15, 0.05])
    # The order of the logits does not matter, only their values.
    perm = torch.tensor([2, 0, 3, 1])  # new position i holds old id perm[i]
    counts = draw(logits[perm], SamplingParams(temperature=1.0, top_p=0.7))
    assert set(counts) == {1, 3}
    # temperature 0.5 squares the probabilities before normalizing
    sq = probs ** 2 / (probs ** 2).sum()
    check(draw(logits, SamplingParams(temperature=0.5)), sq.tolist())
    # greedy ignores the generator
    assert sample(logits[perm], SamplingParams(), torch.Generator()) == 1


def test_sampler_top_k_keeps_only_top_k_on_random_logits():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(320, generator=gen)
    top = set(torch.topk(logits, 5).indices.tolist())
    counts = draw(logits, SamplingParams(temperature=3.0, top_k=5), n=2000)
    assert set(counts) <= top and len(counts) == 5


# ---- stop conditions --------------------------------------------------------------------------
def test_max_tokens_and_context_end(v1):
    model, ckpt = v1
    engine = LLMEngine(ckpt)
    p = prompts(1, [5], seed=29)[0]
    for m in (1, 7):
        seq = engine.generate([p], SamplingParams(max_tokens=m, ignore_eos=True), 2)[0]
        assert len(seq.output_ids) == m and seq.finish_reason == "length"
    C = model.config.max_position_embeddings
    long = prompts(1, [C - 3], seed=31)[0]
    seq = engine.generate([long], SamplingParams(max_tokens=50, ignore_eos=True), 4)[0]
    assert seq.finish_reason == "length"
    assert len(seq.output_ids) == 3 and seq.num_tokens == C
    assert seq.output_ids == ref_greedy(model, long, 4, 50)
    one = engine.generate([prompts(1, [C - 1], seed=37)[0]], SamplingParams(max_tokens=50), 1)[0]
    assert len(one.output_ids) == 1 and one.finish_reason == "length"
    assert all_free(engine)


@pytest.fixture(scope="module")
def eos_model(tmp_path_factory):
    """A model whose greedy continuation of `prompt` at exit 4 reaches EOS after a few tokens:
    the head row of EOS is a scaled copy of the row of the token greedy picks third."""
    model = reference_model("v1", seed=2)
    prompt = prompts(1, [6], seed=41)[0]
    plain = ref_greedy(model, prompt, 4, 3)
    with torch.no_grad():
        model.lm_head.weight[EOS_ID] = 1.5 * model.lm_head.weight[plain[2]]
    expected = ref_greedy(model, prompt, 4, 20, stop_at_eos=True)
    assert expected[-1] == EOS_ID and len(expected) >= 2, expected  # precondition of the tests
    return model, write_packed(model, tmp_path_factory.mktemp("eos") / "eos"), prompt, expected


def test_eos_stops_and_is_excluded_from_text(eos_model):
    model, ckpt, prompt, expected = eos_model
    engine = LLMEngine(ckpt)
    seq = engine.add_request(prompt, SamplingParams(max_tokens=20), 4)
    streamed = run_to_end(engine)
    assert seq.output_ids == expected
    assert seq.finish_reason == "stop"
    assert seq.output_ids[-1] == EOS_ID
    assert seq.text == engine.tokenizer.decode(expected[:-1])
    assert "<|eos|>" not in seq.text
    assert streamed[seq] == seq.text
    assert all_free(engine)


def test_ignore_eos_continues(eos_model):
    model, ckpt, prompt, expected = eos_model
    seq = LLMEngine(ckpt).generate([prompt], SamplingParams(max_tokens=20, ignore_eos=True), 4)[0]
    assert len(seq.output_ids) == 20 and seq.finish_reason == "length"
    assert seq.output_ids == ref_greedy(model, prompt, 4, 20)
    assert seq.output_ids[:len(expected)] == expected


def test_stop_string_cuts_text(v1):
    model, ckpt = v1
    tok = byte_level_tokenizer()
    p = prompts(1, [8], seed=43)[0]
    full_ids = ref_greedy(model, p, 3, 24)
    full = tok.decode(full_ids)
    # A two-character stop string made of real characters, starting after the first character.
    i = next(i for i in range(1, len(full) - 1) if "\ufffd" not in full[i:i + 2])
    stop = full[i:i + 2]
    cut = full[:full.find(stop)]
    n_expected = next(j for j in range(1, len(full_ids) + 1) if stop in tok.decode(full_ids[:j]))

    engine = LLMEngine(ckpt)
    seq = engine.add_request(p, SamplingParams(max_tokens=24, stop=[stop], ignore_eos=True), 3)
    other = engine.add_request(p, SamplingParams(max_tokens=24, ignore_eos=True), 3)
    streamed = run_to_end(engine)
    assert seq.finish_reason == "stop"
    assert seq.text == cut and stop not in seq.text
    assert seq.output_ids == full_ids[:n_expected]
    assert streamed[seq] == cut
    assert other.text == full and other.output_ids == full_ids and streamed[other] == full
    assert all_free(engine)


def test_detokenizer_never_releases_partial_utf8():
    tok = byte_level_tokenizer()
    ids = list("aé€b".encode())  # é = C3 A9, € = E2 82 AC
    d = Detokenizer(tok)
    released = []
    for j in range(1, len(ids) + 1):
        text, hit = d.update(ids[:j])
        assert not hit
        released.append(d.release(text, final=False))
    assert released == ["a", "", "é", "", "", "€", "b"]
    assert "".join(released) == "aé€b"
    assert d.release("aé€b", final=True) == ""


def test_detokenizer_holds_back_text_a_stop_string_could_cut():
    tok = byte_level_tokenizer()
    ids = list("xyéabz".encode())
    d = Detokenizer(tok, ("éa", "zz"))
    released, final_text = "", None
    for j in range(1, len(ids) + 1):
        text, hit = d.update(ids[:j])
        released += d.release(text, final=hit)
        assert "\ufffd" not in released
        assert "é" not in released and "a" not in released  # "éa" is cut: never shown
        if hit:
            final_text = text
            break
    assert final_text == "xy" and released == "xy"


def test_detokenizer_cuts_at_earliest_stop_string():
    tok = byte_level_tokenizer()
    ids = list("xab".encode())
    d = Detokenizer(tok, ("b", "ab"))
    for j in range(1, len(ids) + 1):
        text, hit = d.update(ids[:j])
        d.release(text, hit)
    assert hit and text == "x"  # "ab" starts before "b": the text is cut there


def test_detokenizer_release_matches_final_text_on_random_bytes():
    tok = byte_level_tokenizer()
    gen = torch.Generator().manual_seed(0)
    for trial in range(30):
        # mostly valid multi-byte text with some random bytes mixed in
        text = "".join(chr(int(c)) for c in torch.randint(32, 0x2100, (12,), generator=gen))
        ids = list(text.encode())
        if trial % 3 == 0:
            ids.insert(int(torch.randint(0, len(ids), (1,), generator=gen)), 0xC3)
        stop = (tok.decode(ids[5:8]),) if trial % 2 else ()
        stop = tuple(s for s in stop if s and "\ufffd" not in s)
        d = Detokenizer(tok, stop)
        released = ""
        for j in range(1, len(ids) + 1):
            cur, hit = d.update(ids[:j])
            released += d.release(cur, hit or j == len(ids))
            assert cur.startswith(released)
            if hit:
                break
        assert released == cur
        assert all(s not in released for s in stop)


def test_detokenizer_text_equals_decoding_the_whole_output_each_time():
    """It decodes only the tokens after the last one ending in an ASCII byte: the text must be
    the full decode's at every length (multi-byte characters split across tokens, invalid bytes,
    special and added tokens, on the byte tokenizer and the bundled BPE)."""
    from tokenizers import AddedToken

    bpe = load_checkpoint(BUNDLED).tokenizer
    bpe.add_tokens([AddedToken("<x>", special=False)])  # a non-special added token: decoded as text
    gen = torch.Generator().manual_seed(1)
    for tok in (byte_level_tokenizer(), bpe):
        vocab = tok.get_vocab_size()
        for trial in range(20):
            codes = torch.randint(32, 0x2100, (30,), generator=gen)
            text = "".join(chr(int(c) if c > 0x1000 else 32 + int(c) % 95) for c in codes)  # ASCII and not
            ids = tok.encode(text, add_special_tokens=False).ids
            for _ in range(4):  # random ids: invalid UTF-8, special and added tokens
                ids.insert(int(torch.randint(0, len(ids), (1,), generator=gen)), int(torch.randint(0, vocab, (1,), generator=gen)))
            d = Detokenizer(tok)
            for j in range(1, len(ids) + 1):
                assert d.update(ids[:j])[0] == tok.decode(ids[:j], skip_special_tokens=True)
            assert d._fixed > 0, "nothing was kept: the test would not test the incremental decode"


# ---- abort ------------------------------------------------------------------------------------
def test_abort_frees_blocks_and_others_finish(v1):
    model, ckpt = v1
    ps = prompts(3, [5, 9, 7], seed=47)
    exits = [2, 4, 3]
    engine = LLMEngine(ckpt, EngineConfig(block_size=4))
    seqs = [engine.add_request(p, GREEDY, k) for p, k in zip(ps, exits)]
    waiting = engine.add_request(ps[0], GREEDY, 1)
    engine.abort(waiting)  # never scheduled
    assert waiting.finish_reason == "abort" and waiting.finished
    for _ in range(4):
        engine.step()
    victim = seqs[1]
    assert victim.status is Status.RUNNING
    held = victim.kv.num_blocks
    assert held > 0
    free_before = engine.kv_cache.num_free_blocks
    engine.abort(victim)
    assert victim.finish_reason == "abort" and victim.finished
    assert engine.kv_cache.num_free_blocks == free_before + held
    assert victim.kv.tables == []
    n_at_abort = len(victim.output_ids)
    streamed = run_to_end(engine)
    assert victim not in streamed and len(victim.output_ids) == n_at_abort
    assert waiting.output_ids == [] and waiting not in streamed
    engine.abort(victim)  # a second abort changes nothing
    assert victim.finish_reason == "abort"
    for i in (0, 2):
        assert seqs[i].output_ids == ref_greedy(model, ps[i], exits[i], 12)
        assert seqs[i].finish_reason == "length"
    assert all_free(engine)


# ---- validation -------------------------------------------------------------------------------
def test_add_request_validation(v1):
    model, ckpt = v1
    engine = LLMEngine(ckpt)
    L, V, C = (model.config.num_hidden_layers, model.config.vocab_size,
               model.config.max_position_embeddings)
    for k in (0, L + 1, -1):
        with pytest.raises(ValueError, match="exit_layer"):
            engine.add_request([1, 2, 3], GREEDY, k)
    for bad in ([1, V], [-1, 2], [1, 2.0]):
        with pytest.raises(ValueError, match="token ids"):
            engine.add_request(bad, GREEDY, 1)
    with pytest.raises(ValueError, match="prompt"):
        engine.add_request([], GREEDY, 1)
    for n in (C, C + 5):
        with pytest.raises(ValueError, match="context"):
            engine.add_request([1] * n, GREEDY, 1)
    assert not engine.has_unfinished()
    engine.add_request([1] * (C - 1), GREEDY, L)  # the largest prompt that fits
    engine.add_request([V - 1], GREEDY, 1)


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"top_k": -1}, "top_k"), ({"stop": [""]}, "stop"),
])
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_edges_accepted():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=1)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
