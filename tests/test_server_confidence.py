"""The confidence policy over HTTP: per-token exits reported in responses, streams and metrics."""

from __future__ import annotations

import json

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from engine.llm_engine import EngineConfig, LLMEngine
from server.app import create_app
from test_server_api import run, serving

from conftest import reference_model, write_packed

L = 4


@pytest.fixture(scope="module")
def sure(tmp_path_factory):
    """A tiny model with a sharpened head, so that confidence varies from token to token."""
    model = reference_model("v1", seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return model, write_packed(model, tmp_path_factory.mktemp("conf") / "ckpt")


def metric_samples(text: str, name: str) -> list:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]


def test_confidence_generation_reports_each_tokens_exit_and_equals_the_engine(sure):
    model, ckpt = sure
    body = {"token_ids": list(range(40, 52)), "max_tokens": 24, "ignore_eos": True,
            "policy": "confidence", "threshold": 0.7}

    async def go():
        app = create_app(LLMEngine(ckpt, EngineConfig()))
        async with serving(app) as client:
            r = await client.post("/generate", json=body)
            s = await client.post("/generate", json={**body, "stream": True})
            m = await client.get("/metrics")
        return r, s, m
    r, s, m = run(go())
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["exit_layers"]) == len(out["token_ids"]) == 24
    assert set(out["exit_layers"]) <= {1, 2, 3, 4} and len(set(out["exit_layers"])) >= 2

    # The same request straight through the engine gives the same tokens and exits.
    engine = LLMEngine(ckpt, EngineConfig())
    from engine.sequence import SamplingParams
    seq = engine.add_request(body["token_ids"], SamplingParams(max_tokens=24, ignore_eos=True),
                             confidence=engine.confidence_rule(0.7))
    while engine.has_unfinished():
        engine.step()
    assert out["token_ids"] == seq.output_ids and out["exit_layers"] == seq.exit_layers

    events = [json.loads(line[6:]) for line in s.text.split("\n\n") if line.startswith("data: {")]
    tokens = [e for e in events if "token_id" in e]
    assert [e["exit_layer"] for e in tokens] == out["exit_layers"]

    text = m.text
    latency = metric_samples(text, "bitskip_request_latency_seconds_count")
    assert any(s.labels["exit_layer"] == "dynamic" and s.value == 2 for s in latency)
    generated = metric_samples(text, "bitskip_generated_tokens_total")
    assert any(s.labels["exit_layer"] == "dynamic" and s.value == 48 for s in generated)
    buckets = {s.labels["le"]: s.value for s in metric_samples(text, "bitskip_token_exit_layer_bucket")}
    for k in (1, 2, 3):
        assert buckets[f"{float(k)}"] == 2 * sum(e <= k for e in out["exit_layers"])
    fills = metric_samples(text, "bitskip_deferred_kv_fills_total")
    assert fills and fills[0].value > 0


@pytest.mark.parametrize("body, param", [
    ({"policy": "confidence", "exit_layer": 2}, "exit_layer"),
    ({"policy": "confidence", "min_exit_layer": 0}, "min_exit_layer"),
    ({"policy": "confidence", "min_exit_layer": L + 1}, "min_exit_layer"),
    ({"policy": "confidence", "threshold": 1.5}, "threshold"),
    ({"policy": "confidence", "confidence_measure": "entropy"}, "confidence_measure"),
    ({"policy": "sometimes"}, "policy"),
    ({"policy": "speculative", "exit_layer": 2}, "exit_layer"),
    ({"policy": "speculative", "draft_exit_layer": 0}, "draft_exit_layer"),
    ({"policy": "speculative", "draft_exit_layer": L}, "draft_exit_layer"),
    ({"policy": "speculative", "num_draft_tokens": 0}, "num_draft_tokens"),
    ({"policy": "speculative", "num_draft_tokens": 17}, "num_draft_tokens"),
    ({"policy": "fixed", "draft_exit_layer": 2}, "draft_exit_layer"),
    ({"policy": "confidence", "num_draft_tokens": 2}, "num_draft_tokens"),
    ({"policy": "speculative", "draft_confidence": 1.5}, "draft_confidence"),
])
def test_bad_policy_fields_are_422_naming_the_field(sure, body, param):
    async def go():
        app = create_app(LLMEngine(sure[1], EngineConfig()))
        async with serving(app) as client:
            return await client.post("/generate", json={"prompt": "hi", **body})
    r = run(go())
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == param and param in err["message"]


def test_margin_measure_and_openai_extra_fields(sure):
    async def go():
        app = create_app(LLMEngine(sure[1], EngineConfig()))
        async with serving(app) as client:
            return await client.post("/v1/completions", json={
                "prompt": "abc", "max_tokens": 8, "temperature": 0, "policy": "confidence",
                "threshold": 0.0, "min_exit_layer": 2, "confidence_measure": "margin"})
    r = run(go())
    assert r.status_code == 200, r.text
    assert r.json()["exit_layers"] == [2] * len(r.json()["exit_layers"])
