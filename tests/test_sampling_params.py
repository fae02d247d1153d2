"""The engine's sampling fields against the reference model: penalties, logit_bias, min_tokens,
stop_token_ids, and logprobs of generated and prompt tokens at the exit that produced them."""

from __future__ import annotations

import pytest
import torch

from engine.llm_engine import EngineConfig, LLMEngine
from engine.sequence import SamplingParams
from models.tokenizer import BOS_ID, EOS_ID

pytestmark = pytest.mark.timeout(120)

PROMPT = [BOS_ID] + list(b"the cat sat on the mat. the cat")


@pytest.fixture
def v1(shared_v1):
    return shared_v1


@pytest.fixture(scope="module")
def engine(shared_v1):
    # A small token budget: prompts are prefilled in several chunks.
    return LLMEngine(shared_v1[1], EngineConfig(max_num_batched_tokens=8))


def ref_logits(model, ids: list[int], k: int) -> torch.Tensor:
    """Reference logits at exit k for every position of `ids` (row i predicts ids[i + 1])."""
    with torch.no_grad():
        return model(torch.tensor([ids]), [k])[k][0].double()


def ref_greedy(model, prompt, k, n, adjust) -> list[int]:
    """Greedy decoding where `adjust(logits, output_ids)` is the reference logit change."""
    out = []
    for _ in range(n):
        out.append(int(adjust(ref_logits(model, prompt + out, k)[-1].clone(), out).argmax()))
    return out


def run(engine, params: SamplingParams, k: int = 4, prompt=PROMPT):
    [seq] = engine.generate([prompt], params, k)
    return seq


def test_penalties_and_bias_match_their_formulas(v1, engine):
    model = v1[0]
    bias = {ord("x"): 3.0, ord("t"): -100.0}
    params = SamplingParams(max_tokens=8, ignore_eos=True, presence_penalty=0.7, frequency_penalty=1.3,
                            repetition_penalty=1.4, logit_bias=bias)

    def adjust(x, out):
        for t, b in bias.items():
            x[t] += b
        for t in set(PROMPT) | set(out):  # repetition: prompt and output
            x[t] = x[t] / 1.4 if x[t] > 0 else x[t] * 1.4
        for t in set(out):
            x[t] -= 1.3 * out.count(t) + 0.7
        return x

    seq = run(engine, params, 3)
    assert seq.output_ids == ref_greedy(model, PROMPT, 3, 8, adjust)
    assert ord("t") not in seq.output_ids
    plain = run(engine, SamplingParams(max_tokens=8, ignore_eos=True), 3)
    assert plain.output_ids == ref_greedy(model, PROMPT, 3, 8, lambda x, out: x)
    assert plain.output_ids != seq.output_ids  # the fields change something


def test_subnormal_repetition_penalty_draws_a_seen_token(v1, engine):
    """repetition_penalty 5e-324 is valid (> 0): it divides every seen positive logit by a
    subnormal, which used to overflow them to inf and softmax to NaN (a 500, found by
    schemathesis). Now they saturate and tie: each token drawn is a seen one whose logit at
    that step is positive (any other is (almost) infinitely less likely)."""
    model = v1[0]
    seq = run(engine, SamplingParams(max_tokens=6, ignore_eos=True, temperature=1.0, seed=3,
                                     repetition_penalty=5e-324), 3)
    assert len(seq.output_ids) == 6
    logits = ref_logits(model, PROMPT + seq.output_ids, 3)[len(PROMPT) - 1:]
    for i, t in enumerate(seq.output_ids):
        seen = set(PROMPT) | set(seq.output_ids[:i])
        assert any(logits[i, s] > 0 for s in seen)  # else the test would not test the saturation
        assert t in seen and logits[i, t] > 0


def test_min_tokens_holds_back_eos_and_stop_token_ids(engine):
    eos_first = SamplingParams(max_tokens=10, logit_bias={EOS_ID: 100.0})
    assert run(engine, eos_first).output_ids == [EOS_ID]
    seq = run(engine, SamplingParams(max_tokens=10, min_tokens=3, logit_bias={EOS_ID: 100.0}))
    assert len(seq.output_ids) == 4 and seq.output_ids[-1] == EOS_ID and EOS_ID not in seq.output_ids[:3]
    assert seq.finish_reason == "stop"
    # A stop token id ends the request and its text is left out of the output.
    stop = ord("q")
    seq = run(engine, SamplingParams(max_tokens=10, min_tokens=2, stop_token_ids=(stop,),
                                     logit_bias={stop: 100.0}))
    assert seq.output_ids[-1] == stop and len(seq.output_ids) == 3 and seq.finish_reason == "stop"
    assert seq.text == bytes(seq.output_ids[:-1]).decode("utf-8", "replace") and "q" not in seq.text
    # min_tokens also holds back stop strings: the first one in token min_tokens or later ends it.
    seq = run(engine, SamplingParams(max_tokens=6, min_tokens=3, stop=("q",), logit_bias={stop: 100.0}))
    assert seq.output_ids == [stop] * 3 and seq.finish_reason == "stop" and seq.text == "qq"


@pytest.mark.parametrize("k", [2, 4])
def test_logprobs_of_generated_and_prompt_tokens_are_the_exit_layers(v1, engine, k):
    model = v1[0]
    seq = run(engine, SamplingParams(max_tokens=5, ignore_eos=True, logprobs=3, prompt_logprobs=2), k)
    ids = PROMPT + seq.output_ids
    ref = torch.log_softmax(ref_logits(model, ids, k), -1)
    assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(PROMPT)
    scored = seq.prompt_logprobs[1:] + seq.logprobs
    assert [lp.token for lp in scored] == ids[1:]
    for i, lp in enumerate(scored):
        assert lp.exit_layer == k
        assert lp.logprob == pytest.approx(float(ref[i, ids[i + 1]]), abs=1e-5)
        top = torch.topk(ref[i], len(lp.top))
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert all(len(lp.top) == 2 for lp in seq.prompt_logprobs[1:])
    assert all(len(lp.top) == 3 for lp in seq.logprobs)


def test_confidence_logprobs_come_from_the_chosen_exit(v1, engine):
    model = v1[0]
    rule = engine.confidence_rule(0.0)  # every token leaves at the first exit point
    first = engine.model_config.exit_points[0]
    [seq] = [engine.add_request(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True, logprobs=0,
                                                       prompt_logprobs=0), confidence=rule)]
    while engine.has_unfinished():
        engine.step()
    L = engine.model_config.num_hidden_layers
    # The prompt is scored at full depth, so its last chunk produces the first token there too.
    assert seq.exit_layers == [L] + [first] * 3
    assert [lp.exit_layer for lp in seq.logprobs] == seq.exit_layers
    for lp, i in zip(seq.logprobs, range(len(PROMPT) - 1, len(PROMPT) + 3)):
        ref = torch.log_softmax(ref_logits(model, PROMPT + seq.output_ids, lp.exit_layer)[i], -1)
        assert lp.logprob == pytest.approx(float(ref[lp.token]), abs=1e-5)
    ref = torch.log_softmax(ref_logits(model, PROMPT, L), -1)
    assert [lp.logprob for lp in seq.prompt_logprobs[1:]] == pytest.approx(
        [float(ref[i, t]) for i, t in enumerate(PROMPT[1:])], abs=1e-5)


def test_bad_sampling_fields_name_the_field(engine):
    for kwargs, field in [({"presence_penalty": 2.5}, "presence_penalty"),
                          ({"repetition_penalty": 0.0}, "repetition_penalty"),
                          ({"logit_bias": {1: 101.0}}, "logit_bias"),
                          ({"min_tokens": 20, "max_tokens": 10}, "min_tokens")]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
    for kwargs in [{"stop_token_ids": (10**6,)}, {"logit_bias": {-1: 1.0}}]:
        with pytest.raises(ValueError, match="stop_token_ids and logit_bias"):
            engine.validate_request(PROMPT, SamplingParams(**kwargs))
