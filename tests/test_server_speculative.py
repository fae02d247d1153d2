"""The speculative policy over HTTP: full-depth tokens, drafted and accepted counts in responses,
streams and metrics."""

from __future__ import annotations

import json

import pytest

from engine.llm_engine import EngineConfig, LLMEngine
from engine.sequence import SamplingParams
from server.app import create_app
from test_server_api import run, serving
from test_server_confidence import metric_samples
from test_server_confidence import sure as sure_pair  # noqa: F401  (a fixture)

L = 4


@pytest.fixture(scope="module")
def sure(sure_pair):
    """The packed tiny model with a sharpened head: its exits agree often enough to accept drafts."""
    return sure_pair[1]


def test_speculative_generation_equals_full_depth_and_reports_drafts(sure):
    ids = list(range(40, 52))
    body = {"token_ids": ids, "max_tokens": 24, "ignore_eos": True, "policy": "speculative",
            "draft_exit_layer": 2, "num_draft_tokens": 3}

    async def go():
        app = create_app(LLMEngine(sure, EngineConfig()))
        async with serving(app) as client:
            r = await client.post("/generate", json=body)
            s = await client.post("/generate", json={**body, "stream": True})
            c = await client.post("/v1/completions", json={
                "prompt": ids, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
                "policy": "speculative", "draft_exit_layer": 2, "num_draft_tokens": 3})
            m = await client.get("/metrics")
        return r, s, c, m
    r, s, c, m = run(go())
    assert r.status_code == 200 and c.status_code == 200, (r.text, c.text)
    out = r.json()
    engine = LLMEngine(sure, EngineConfig())
    full = engine.add_request(ids, SamplingParams(max_tokens=24, ignore_eos=True), exit_layer=L)
    while engine.has_unfinished():
        engine.step()
    assert out["token_ids"] == full.output_ids and out["exit_layers"] == [L] * 24
    usage = out["usage"]
    assert 0 < usage["accepted_draft_tokens"] < usage["draft_tokens"]
    assert c.json()["usage"] == usage and c.json()["choices"][0]["text"] == out["text"]

    events = [json.loads(line[6:]) for line in s.text.split("\n\n") if line.startswith("data: {")]
    assert [e["token_id"] for e in events if "token_id" in e] == out["token_ids"]
    assert events[-1]["usage"] == usage

    text = m.text
    latency = metric_samples(text, "bitskip_request_latency_seconds_count")
    assert any(x.labels["exit_layer"] == "speculative" and x.value == 3 for x in latency)
    drafted = metric_samples(text, "bitskip_speculative_draft_tokens_total")
    accepted = metric_samples(text, "bitskip_speculative_accepted_tokens_total")
    assert [(x.labels["draft_exit_layer"], x.value) for x in drafted] == [("2", 3 * usage["draft_tokens"])]
    assert [(x.labels["draft_exit_layer"], x.value) for x in accepted] == [
        ("2", 3 * usage["accepted_draft_tokens"])]
    lengths = {x.name: x.value for x in metric_samples(text, "bitskip_speculative_acceptance_length_sum")
               + metric_samples(text, "bitskip_speculative_acceptance_length_count")}
    assert lengths["bitskip_speculative_acceptance_length_sum"] == 3 * usage["accepted_draft_tokens"]
    # One round ends each speculative token's group; at most every token ends one.
    assert 0 < lengths["bitskip_speculative_acceptance_length_count"] <= 3 * 24
