"""Perplexity as a schedulable request (issue 14, finding 2): its windows run in chunks under the
per-step token budget beside other requests' decodes, give the same result as one forward per
window, have a maximum length (413) and are aborted when their client leaves."""

from __future__ import annotations

import pytest
import torch

from engine.llm_engine import EngineConfig, LLMEngine
from engine.perplexity import perplexity
from engine.sequence import SamplingParams
from server.app import ServerSettings

from conftest import reference_model, write_packed
from test_server_api import check_error, kv_all_free, leave, raw_post, run, wait_until
from test_server_errors import call, make_app

pytestmark = pytest.mark.timeout(120)

BUDGET = 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_packed(reference_model("v1"), tmp_path_factory.mktemp("scoring") / "tiny-v1")


def long_ids(n: int = 400) -> list[int]:
    return torch.randint(0, 320, (n,), generator=torch.Generator().manual_seed(3)).tolist()


def test_chunked_scoring_equals_one_forward_per_window(ckpt):
    """400 ids over a 128-token context: 6 windows, each cut into 32-token chunks."""
    engine = LLMEngine(ckpt, EngineConfig(max_num_batched_tokens=BUDGET))
    ids = long_ids()
    ref = perplexity(engine.runner, ids, [1, 2, 4])
    got = engine.perplexity(ids, [1, 2, 4])
    assert got.tokens == ref.tokens == len(ids) - 1
    for k in (1, 2, 4):
        assert got.nll[k] == pytest.approx(ref.nll[k], rel=1e-9, abs=1e-9)
    assert kv_all_free_engine(engine)


def kv_all_free_engine(engine) -> bool:
    return engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_long_scoring_does_not_hold_up_a_decode(ckpt):
    """A generation that arrives while a long text is scored gets a token every step: each step
    computes at most the budget, with the decode row in it, and the generation finishes long
    before the scoring request (which, run in one go, would have held the engine throughout)."""
    engine = LLMEngine(ckpt, EngineConfig(max_num_batched_tokens=BUDGET))
    scoring = engine.validate_scoring(long_ids(), [2, 4])
    engine.add_sequence(scoring)
    engine.step()
    gen = engine.add_request([1, 2, 3], SamplingParams(max_tokens=8, ignore_eos=True), exit_layer=2)
    steps = 0
    while not gen.finished:
        before = engine.runner.blocks_run[1]
        engine.step()
        steps += 1
        assert engine.runner.blocks_run[1] - before <= BUDGET  # tokens this step computed
        assert gen in engine.last_batch and scoring in engine.last_batch
    assert steps == 8  # the prompt and first token, then one step per token
    assert not scoring.finished
    while engine.has_unfinished():
        engine.step()
    assert scoring.finish_reason == "stop" and kv_all_free_engine(engine)


def test_perplexity_longer_than_the_limit_is_413(ckpt):
    r = call(ckpt, "POST", "/perplexity", ServerSettings(max_perplexity_tokens=300),
             json={"token_ids": long_ids(301)})
    check_error(r, 413, "token_ids", "301", "300")
    ok = call(ckpt, "POST", "/perplexity", ServerSettings(max_perplexity_tokens=300),
              json={"token_ids": long_ids(300)})
    assert ok.status_code == 200 and ok.json()["tokens"] == 299


def test_perplexity_client_disconnect_aborts_scoring(ckpt):
    app = make_app(ckpt, ServerSettings(max_perplexity_tokens=100_000))
    server = app.state.server

    async def body():
        async with app.router.lifespan_context(app):
            task, _, gone = await raw_post(app, "/perplexity", {"token_ids": long_ids(20_000)})
            await wait_until(lambda: server.loop.num_running == 1 and not kv_all_free(app), what="scoring")
            return await leave(app, task, gone)

    seq = run(body())
    assert seq.finish_reason == "abort"
    assert seq.scoring.window < len(seq.scoring.windows) - 1  # it stopped well before the end
