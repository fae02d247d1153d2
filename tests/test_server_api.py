"""The HTTP API (DESIGN section 5) and its metrics (section 6), in-process against the ASGI app:
every endpoint and field, greedy outputs against the reference model, SSE framing, the bad-input
table, queue limits, API keys, a failing request, concurrency and client disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import time

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import engine.llm_engine as llm_engine_module
from engine.llm_engine import EngineConfig, LLMEngine
from models.tokenizer import BOS_ID, EOS_ID
from server.app import ServerSettings, create_app
from server.schemas import MAX_TOKENS_LIMIT

from conftest import reference_model, write_packed

pytestmark = pytest.mark.timeout(120)

L = 4          # tiny-test layers
VOCAB = 320
CONTEXT = 128


# ---- fixtures and helpers ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    model = reference_model("v1")
    return model, write_packed(model, tmp_path_factory.mktemp("api") / "tiny-v1")


@pytest.fixture(scope="module")
def model(v1):
    return v1[0]


@pytest.fixture(scope="module")
def ckpt(v1):
    return v1[1]


def make_app(ckpt, settings: ServerSettings = ServerSettings(), **engine_config):
    return create_app(LLMEngine(ckpt, EngineConfig(**engine_config)), settings)


@contextlib.asynccontextmanager
async def serving(app, lifespan: bool = True):
    """An httpx client on the app, with the app's lifespan (engine loop) running around it."""
    async with contextlib.AsyncExitStack() as stack:
        if lifespan:
            await stack.enter_async_context(app.router.lifespan_context(app))
        client = await stack.enter_async_context(httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60))
        yield client


def run(coro):
    return asyncio.run(coro)


def encode(text: str) -> list[int]:
    """What the server's tokenizer gives for `text`, BOS prepended (byte-level: byte b is id b)."""
    return [BOS_ID] + list(text.encode())


@functools.lru_cache(maxsize=None)
def _ref_greedy(model, prompt: tuple[int, ...], k: int, max_tokens: int) -> tuple[int, ...]:
    ids, out = list(prompt), []
    with torch.no_grad():
        while len(out) < max_tokens and len(ids) < CONTEXT:
            t = int(model(torch.tensor([ids]), [k])[k][0, -1].argmax())
            out.append(t)
            ids.append(t)
    return tuple(out)


def ref_greedy(model, prompt: list[int], k: int, max_tokens: int) -> list[int]:
    """The reference model's greedy continuation at exit layer k (EOS ignored)."""
    return list(_ref_greedy(model, tuple(prompt), k, max_tokens))


def decode(ids: list[int]) -> str:
    """Byte-level decode, special and unknown ids skipped (what the tokenizer does)."""
    return bytes(t for t in ids if t < 256).decode("utf-8", errors="replace")


def parse_sse(text: str) -> list[str]:
    """The data payloads of an SSE body; asserts every event is one `data: ` line and a blank line."""
    assert text.endswith("\n\n"), repr(text[-80:])
    blocks = text.split("\n\n")
    assert blocks[-1] == ""
    payloads = []
    for block in blocks[:-1]:
        lines = block.split("\n")
        assert len(lines) == 1 and lines[0].startswith("data: "), repr(block)
        payloads.append(lines[0][len("data: "):])
    assert payloads and payloads[-1] == "[DONE]", payloads[-3:]
    assert "[DONE]" not in payloads[:-1]
    return payloads


def families(exposition: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(exposition)}


def sample_value(fams: dict, family: str, sample: str, **labels) -> float | None:
    for s in fams[family].samples:
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def check_error(r: httpx.Response, status: int, param: str | None, *needles: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and isinstance(err["type"], str)
    assert err["param"] == param, err
    for needle in needles:
        assert needle in err["message"], (needle, err["message"])
    return err


async def wait_until(predicate, deadline_s: float = 10.0, what: str = "condition"):
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def kv_all_free(app) -> bool:
    kv = app.state.server.engine.kv_cache
    return kv.num_free_blocks == kv.num_blocks


def idle(app) -> bool:
    server = app.state.server
    return kv_all_free(app) and server.loop.num_running == 0 and server.loop.num_waiting == 0


# ---- /generate -----------------------------------------------------------------------------------
def test_generate_prompt_fields_and_greedy_equals_reference(model, ckpt):
    async def body():
        async with serving(make_app(ckpt)) as c:
            results = {}
            for k in (2, L, None):
                req = {"prompt": "hello", "max_tokens": 10, "ignore_eos": True}
                if k is not None:
                    req["exit_layer"] = k
                r = await c.post("/generate", json=req)
                assert r.status_code == 200, r.text
                results[k] = r.json()
            return results

    results = run(body())
    prompt = encode("hello")
    for k, res in results.items():
        depth = L if k is None else k
        assert {"text", "token_ids", "exit_layers", "finish_reason", "usage", "timing"} <= set(res)
        assert res["token_ids"] == ref_greedy(model, prompt, depth, 10), k
        assert res["exit_layers"] == [depth] * 10
        assert res["finish_reason"] == "length"
        assert res["text"] == decode(res["token_ids"])
        assert res["usage"]["prompt_tokens"] == len(prompt) == 6
        assert res["usage"]["completion_tokens"] == 10
        t = res["timing"]
        assert set(t) >= {"queue", "first_token", "total"}
        assert 0 <= t["queue"] <= t["first_token"] <= t["total"] < 30, t
    # the depth matters: exit 2 and the full model disagree on this prompt
    assert results[2]["token_ids"] != results[L]["token_ids"]
    assert results[None]["token_ids"] == results[L]["token_ids"]


def test_generate_token_ids_are_used_as_given_without_bos(model, ckpt):
    ids = list("hello".encode())

    async def body():
        async with serving(make_app(ckpt)) as c:
            r = await c.post("/generate", json={"token_ids": ids, "max_tokens": 8, "ignore_eos": True,
                                                "exit_layer": 3})
            assert r.status_code == 200, r.text
            return r.json()

    res = run(body())
    assert res["token_ids"] == ref_greedy(model, ids, 3, 8)
    assert res["token_ids"] != ref_greedy(model, [BOS_ID] + ids, 3, 8)  # so BOS would be noticed
    assert res["usage"]["prompt_tokens"] == len(ids) and res["usage"]["completion_tokens"] == 8
    assert res["exit_layers"] == [3] * 8


def test_query_exit_layer_overrides_body(model, ckpt):
    async def body():
        async with serving(make_app(ckpt)) as c:
            r = await c.post("/generate?exit_layer=2", json={"prompt": "hello", "exit_layer": L,
                                                              "max_tokens": 6, "ignore_eos": True})
            assert r.status_code == 200, r.text
            r1 = await c.post("/generate?exit_layer=1", json={"prompt": "hello", "max_tokens": 6,
                                                               "ignore_eos": True})
            assert r1.status_code == 200, r1.text
            return r.json(), r1.json()

    res, res1 = run(body())
    assert res["exit_layers"] == [2] * 6
    assert res["token_ids"] == ref_greedy(model, encode("hello"), 2, 6)
    assert res1["exit_layers"] == [1] * 6
    assert res1["token_ids"] == ref_greedy(model, encode("hello"), 1, 6)


def test_stop_strings_max_tokens_and_eos(model, ckpt):
    prompt = "hello"
    full = ref_greedy(model, encode(prompt), L, 24)
    text = decode(full)
    # a stop string: the first ASCII character that appears after the start of the text
    j = next(i for i in range(1, len(text)) if text[i].isascii() and text[i] not in text[:i])
    stop = text[j]
    # a prompt whose greedy continuation at some depth emits EOS
    eos_case = next(((p, k) for p in ("abc", "hello", "1 2 3", "Once upon a time") for k in range(1, L + 1)
                     if EOS_ID in ref_greedy(model, encode(p), k, 16)), None)
    assert eos_case is not None

    async def body():
        async with serving(make_app(ckpt)) as c:
            r_stop = await c.post("/generate", json={"prompt": prompt, "max_tokens": 24, "ignore_eos": True,
                                                     "stop": [stop, "\x01never\x02"]})
            r_stop_str = await c.post("/generate", json={"prompt": prompt, "max_tokens": 24,
                                                         "ignore_eos": True, "stop": stop})
            r_len = await c.post("/generate", json={"prompt": prompt, "max_tokens": 3, "ignore_eos": True})
            p, k = eos_case
            r_eos = await c.post("/generate", json={"prompt": p, "max_tokens": 16, "exit_layer": k})
            r_no_eos = await c.post("/generate", json={"prompt": p, "max_tokens": 16, "exit_layer": k,
                                                       "ignore_eos": True})
            return [r.json() for r in (r_stop, r_stop_str, r_len, r_eos, r_no_eos)]

    s, s2, length, eos, no_eos = run(body())
    for res in (s, s2):
        assert res["finish_reason"] == "stop", res
        assert res["text"] == text[:j], (res["text"], text[:j])
        assert stop not in res["text"]
        n = len(res["token_ids"])
        assert 0 < n < 24 and res["token_ids"] == full[:n]
        assert decode(res["token_ids"]).endswith(stop)  # the token that completed the stop string ran
    assert length["finish_reason"] == "length" and length["token_ids"] == full[:3]
    assert length["usage"]["completion_tokens"] == 3
    p, k = eos_case
    ref = ref_greedy(model, encode(p), k, 16)
    cut = ref.index(EOS_ID) + 1
    assert eos["finish_reason"] == "stop" and eos["token_ids"] == ref[:cut]
    assert no_eos["finish_reason"] == "length" and no_eos["token_ids"] == ref


def test_seeded_sampling_is_reproducible_in_any_batch(ckpt):
    req = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.9, "top_k": 50,
           "top_p": 0.95, "ignore_eos": True}

    async def body():
        async with serving(make_app(ckpt)) as c:
            alone = (await c.post("/generate", json={**req, "seed": 11})).json()
            # the same seed again while other requests share the batch
            others = [c.post("/generate", json={"prompt": f"other {i}", "max_tokens": 16, "ignore_eos": True,
                                                "temperature": 1.0, "exit_layer": 1 + i % L})
                      for i in range(6)]
            batched, *_ = await asyncio.gather(c.post("/generate", json={**req, "seed": 11}), *others)
            other_seed = (await c.post("/generate", json={**req, "seed": 12})).json()
            hot = (await c.post("/generate", json={**req, "temperature": 2.0, "seed": 11})).json()
            return alone, batched.json(), other_seed, hot

    alone, batched, other_seed, hot = run(body())
    assert len(alone["token_ids"]) == 16
    assert batched["token_ids"] == alone["token_ids"]
    assert batched["text"] == alone["text"]
    assert other_seed["token_ids"] != alone["token_ids"]
    assert hot["token_ids"] != alone["token_ids"]


# ---- streaming -----------------------------------------------------------------------------------
def test_generate_stream_sse_format_and_equals_non_streaming(model, ckpt):
    prompt = "The quick brown fox"
    stop_text = decode(ref_greedy(model, encode(prompt), 2, 20))
    # a two-character stop string from inside the continuation (exercises the hold-back of text)
    j = next(i for i in range(2, len(stop_text) - 1)
             if "\ufffd" not in stop_text[i:i + 2] and stop_text[i:i + 2] not in stop_text[:i + 1])
    stop = stop_text[j:j + 2]

    async def body():
        async with serving(make_app(ckpt)) as c:
            out = {}
            for name, req in {"plain": {"max_tokens": 12}, "stop": {"max_tokens": 20, "stop": [stop]}}.items():
                req = {"prompt": prompt, "ignore_eos": True, **req}
                r = await c.post("/generate?exit_layer=2", json={**req, "stream": True})
                assert r.status_code == 200, r.text
                assert r.headers["content-type"].startswith("text/event-stream")
                plain = await c.post("/generate?exit_layer=2", json=req)
                out[name] = (r.text, plain.json())
            return out

    results = run(body())
    for name, (sse_text, plain) in results.items():
        payloads = parse_sse(sse_text)
        events = [json.loads(p) for p in payloads[:-1]]
        final = events[-1]
        tokens = [e for e in events[:-1] if "token_id" in e]
        assert all(set(e) == {"token_id", "text", "exit_layer"} for e in tokens), events[:-1]
        assert all(set(e) in ({"token_id", "text", "exit_layer"}, {"text"}) for e in events[:-1])
        assert {"finish_reason", "usage", "token_ids", "text", "exit_layers", "timing"} <= set(final)
        assert [e["token_id"] for e in tokens] == final["token_ids"] == plain["token_ids"], name
        assert all(e["exit_layer"] == 2 for e in tokens)
        assert "".join(e["text"] for e in events[:-1]) == final["text"] == plain["text"]
        assert final["finish_reason"] == plain["finish_reason"]
        assert final["usage"]["completion_tokens"] == len(tokens)
    # the stop case really stopped (the stop string occurs in the continuation) and cut the text
    plain = results["stop"][1]
    assert plain["finish_reason"] == "stop"
    assert plain["text"] == stop_text[:j]


# ---- OpenAI-compatible ------------------------------------------------------------------------
def test_completions_non_stream_stream_and_models(model, ckpt):
    async def body():
        async with serving(make_app(ckpt, ServerSettings(model_name="tiny-v1"))) as c:
            models = (await c.get("/v1/models")).json()
            req = {"model": "tiny-v1", "prompt": "hello", "max_tokens": 7, "temperature": 0,
                   "exit_layer": 2, "policy": "fixed", "ignore_eos": True}
            plain = await c.post("/v1/completions", json=req)
            streamed = await c.post("/v1/completions", json={**req, "stream": True})
            ids = await c.post("/v1/completions", json={**req, "prompt": [104, 105], "exit_layer": 3})
            gen = await c.post("/generate", json={"prompt": "hello", "max_tokens": 7, "exit_layer": 2,
                                                  "ignore_eos": True})
            bad = await c.post("/v1/completions", json={**req, "exit_layer": L + 1})
            bad_policy = await c.post("/v1/completions", json={**req, "policy": "bogus"})
            bad_id = await c.post("/v1/completions", json={**req, "prompt": [5, VOCAB]})
            too_long = await c.post("/v1/completions", json={**req, "prompt": [5] * CONTEXT})
            return models, plain, streamed, ids, gen.json(), bad, bad_policy, bad_id, too_long

    models, plain, streamed, ids, gen, bad, bad_policy, bad_id, too_long = run(body())
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny-v1"] + [f"tiny-v1@{k}" for k in range(1, L + 1)]
    assert models["data"][0]["object"] == "model"

    assert plain.status_code == 200, plain.text
    res = plain.json()
    assert res["object"] == "text_completion" and res["model"] == "tiny-v1"
    assert len(res["choices"]) == 1
    choice = res["choices"][0]
    assert choice["text"] == gen["text"] == decode(ref_greedy(model, encode("hello"), 2, 7))
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert res["usage"]["prompt_tokens"] == 6 and res["usage"]["completion_tokens"] == 7
    assert res["exit_layers"] == [2] * 7

    assert streamed.status_code == 200, streamed.text
    payloads = parse_sse(streamed.text)
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(ch["object"] == "text_completion" for ch in chunks)
    assert len({ch["id"] for ch in chunks}) == 1
    assert [ch["choices"][0]["finish_reason"] for ch in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == choice["text"]

    assert ids.status_code == 200, ids.text
    assert ids.json()["choices"][0]["text"] == decode(ref_greedy(model, [104, 105], 3, 7))
    assert ids.json()["exit_layers"] == [3] * 7

    check_error(bad, 422, "exit_layer", "exit_layer", str(L + 1), f"1..{L}")
    check_error(bad_policy, 422, "policy", "policy", "bogus")
    check_error(bad_id, 422, "prompt", "prompt", str(VOCAB), f"0..{VOCAB - 1}")
    check_error(too_long, 413, "prompt", "prompt", str(CONTEXT), str(CONTEXT - 1))


# ---- /perplexity ---------------------------------------------------------------------------------
@torch.no_grad()
def ref_nll(model, ids: list[int], layers) -> dict[int, float]:
    logits = model(torch.tensor([ids]), layers)
    targets = torch.tensor(ids[1:])
    out = {}
    for k in layers:
        logp = torch.log_softmax(logits[k][0, :-1].double(), dim=-1)
        out[k] = float(-logp[torch.arange(len(targets)), targets].mean())
    return out


def test_perplexity_text_and_token_ids_equal_reference(model, ckpt):
    text = "the cat sat on the mat"
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(5)).tolist()

    async def body():
        async with serving(make_app(ckpt)) as c:
            a = await c.post("/perplexity", json={"text": text})
            b = await c.post("/perplexity", json={"token_ids": ids})
            sub = await c.post("/perplexity", json={"token_ids": ids, "exit_layers": [3, 1]})
            bad = await c.post("/perplexity", json={"token_ids": ids, "exit_layers": [0]})
            short = await c.post("/perplexity", json={"token_ids": [5]})
            both = await c.post("/perplexity", json={"token_ids": ids, "text": text})
            return a, b, sub, bad, short, both

    a, b, sub, bad, short, both = run(body())
    default_layers = sorted(set(model.config.exit_points) | {L})
    assert default_layers == [1, 2, 3, 4]
    for r, scored in ((a, encode(text)), (b, ids)):
        assert r.status_code == 200, r.text
        res = r.json()
        assert res["tokens"] == len(scored) - 1
        assert sorted(res["nll"]) == sorted(res["perplexity"]) == [str(k) for k in default_layers]
        ref = ref_nll(model, scored, default_layers)
        for k in default_layers:
            assert math.isclose(res["nll"][str(k)], ref[k], rel_tol=1e-5), (k, res["nll"][str(k)], ref[k])
            assert math.isclose(res["perplexity"][str(k)], math.exp(ref[k]), rel_tol=1e-5)
    res = sub.json()
    assert sorted(res["nll"]) == ["1", "3"]
    ref = ref_nll(model, ids, [1, 3])
    assert all(math.isclose(res["nll"][str(k)], ref[k], rel_tol=1e-5) for k in (1, 3))
    check_error(bad, 422, "exit_layers", "exit_layers", "0", f"1..{L}")
    check_error(short, 422, "token_ids", "token_ids", "1 token", "2")
    check_error(both, 422, "text", "text", "token_ids")


# ---- /health, /ready, /metrics -------------------------------------------------------------------
def test_health_and_ready_follow_the_engine_loop(ckpt):
    app = make_app(ckpt)

    async def body():
        async with serving(app, lifespan=False) as c:
            before = await c.get("/ready")
            health_before = await c.get("/health")
        async with serving(app) as c:
            during = await c.get("/ready")
            health = await c.get("/health")
            ok = await c.post("/generate", json={"prompt": "x", "max_tokens": 2})
        async with serving(app, lifespan=False) as c:  # after shutdown
            after = await c.get("/ready")
            refused = await c.post("/generate", json={"prompt": "x", "max_tokens": 2})
        return before, health_before, during, health, ok, after, refused

    before, health_before, during, health, ok, after, refused = run(body())
    assert health_before.status_code == 200 and health.status_code == 200
    assert health.json()["status"] == "ok"
    assert before.status_code == 503 and "Retry-After" in before.headers
    assert during.status_code == 200 and during.json()["status"] == "ready"
    assert ok.status_code == 200
    assert after.status_code == 503
    check_error(refused, 503, None)
    assert "Retry-After" in refused.headers


def test_metrics_exposition_after_traffic(ckpt):
    app = make_app(ckpt)

    async def body():
        async with serving(app) as c:
            runs = [(2, 5), (2, 3), (L, 4)]
            for k, n in runs:
                r = await c.post(f"/generate?exit_layer={k}", json={"prompt": "metrics", "max_tokens": n,
                                                                      "ignore_eos": True})
                assert r.status_code == 200
            r = await c.post("/generate", json={"prompt": "s", "max_tokens": 3, "ignore_eos": True,
                                                "exit_layer": 2, "stream": True})
            assert r.status_code == 200
            bad = await c.post("/generate", json={"prompt": "x", "exit_layer": 0})
            assert bad.status_code == 422
            # while a long request runs, the gauges show it
            long = asyncio.create_task(c.post("/generate", json={"prompt": "y", "max_tokens": 120,
                                                                 "ignore_eos": True, "exit_layer": 1}))
            seen_running = False
            while not long.done() and not seen_running:
                f = families((await c.get("/metrics")).text)
                running = sample_value(f, "bitskip_requests_running", "bitskip_requests_running")
                usage = sample_value(f, "bitskip_kv_cache_usage_ratio", "bitskip_kv_cache_usage_ratio")
                if running == 1:
                    assert 0 < usage <= 1
                    seen_running = True
                await asyncio.sleep(0.002)
            assert (await long).status_code == 200
            assert seen_running, "never saw the long request running in bitskip_requests_running"
            await wait_until(lambda: idle(app), what="idle engine")
            return (await c.get("/metrics"))

    r = run(body())
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'bitskip_request_latency_seconds_bucket{exit_layer="2"' in text
    assert 'bitskip_request_latency_seconds_bucket{exit_layer="4"' in text
    f = families(text)
    for name in ("bitskip_request_latency_seconds", "bitskip_time_to_first_token_seconds",
                 "bitskip_inter_token_latency_seconds", "bitskip_token_exit_layer"):
        assert f[name].type == "histogram", name
    # per exit layer: requests (3 at exit 2 counting the stream, 1 at 4, 1 at 1), tokens, gaps
    per_layer = {"2": [5, 3, 3], "4": [4], "1": [120]}
    for label, ns in per_layer.items():
        for hist in ("bitskip_request_latency_seconds", "bitskip_time_to_first_token_seconds"):
            assert sample_value(f, hist, hist + "_count", exit_layer=label) == len(ns), (hist, label)
            assert sample_value(f, hist, hist + "_bucket", exit_layer=label, le="+Inf") == len(ns)
        assert sample_value(f, "bitskip_inter_token_latency_seconds", "bitskip_inter_token_latency_seconds_count",
                            exit_layer=label) == sum(n - 1 for n in ns)
        assert sample_value(f, "bitskip_generated_tokens", "bitskip_generated_tokens_total",
                            exit_layer=label) == sum(ns)
    # buckets start near 0.5 ms
    les = sorted(float(s.labels["le"]) for s in f["bitskip_request_latency_seconds"].samples
                 if s.name.endswith("_bucket") and s.labels["exit_layer"] == "2")
    assert les[0] <= 0.001
    # per-token exit depth: one bucket per layer, cumulative
    tel = {s.labels["le"]: s.value for s in f["bitskip_token_exit_layer"].samples if s.name.endswith("_bucket")}
    assert tel["1.0"] == 120 and tel["2.0"] == 131 and tel["3.0"] == 131 and tel["4.0"] == 135
    assert tel["+Inf"] == 135
    # gauges, idle now
    assert sample_value(f, "bitskip_requests_running", "bitskip_requests_running") == 0
    assert sample_value(f, "bitskip_requests_waiting", "bitskip_requests_waiting") == 0
    assert sample_value(f, "bitskip_kv_cache_usage_ratio", "bitskip_kv_cache_usage_ratio") == 0
    # counters by endpoint/status and rejection reason
    assert sample_value(f, "bitskip_requests", "bitskip_requests_total", endpoint="/generate",
                        status="200") == 5  # 3 plain, 1 streamed, 1 long
    assert sample_value(f, "bitskip_requests", "bitskip_requests_total", endpoint="/generate",
                        status="422") == 1
    assert sample_value(f, "bitskip_rejected_requests", "bitskip_rejected_requests_total",
                        reason="validation") == 1


# ---- bad input -----------------------------------------------------------------------------------
BAD = [
    # (id, query, body, status, param, words the message must contain)
    ("exit_layer-0", "", {"prompt": "x", "exit_layer": 0}, 422, "exit_layer", ["exit_layer", "0", f"1..{L}"]),
    ("exit_layer-L+1", "", {"prompt": "x", "exit_layer": L + 1}, 422, "exit_layer",
     ["exit_layer", str(L + 1), f"1..{L}"]),
    ("query-exit_layer-0", "?exit_layer=0", {"prompt": "x"}, 422, "exit_layer", ["exit_layer", "0", f"1..{L}"]),
    ("query-exit_layer-L+1", f"?exit_layer={L + 1}", {"prompt": "x", "exit_layer": 2}, 422, "exit_layer",
     ["exit_layer", str(L + 1), f"1..{L}"]),
    ("max_tokens-over", "", {"prompt": "x", "max_tokens": MAX_TOKENS_LIMIT + 1}, 422, "max_tokens",
     ["max_tokens", str(MAX_TOKENS_LIMIT + 1), str(MAX_TOKENS_LIMIT)]),
    ("max_tokens-0", "", {"prompt": "x", "max_tokens": 0}, 422, "max_tokens", ["max_tokens", "0", "1"]),
    ("temperature-negative", "", {"prompt": "x", "temperature": -0.5}, 422, "temperature",
     ["temperature", "-0.5", "0"]),
    ("top_p-0", "", {"prompt": "x", "top_p": 0}, 422, "top_p", ["top_p", "0", "greater than 0"]),
    ("top_p-1.5", "", {"prompt": "x", "top_p": 1.5}, 422, "top_p", ["top_p", "1.5", "1"]),
    ("both-inputs", "", {"prompt": "x", "token_ids": [1, 2]}, 422, "prompt", ["prompt", "token_ids"]),
    ("neither-input", "", {"max_tokens": 3}, 422, "prompt", ["prompt", "token_ids"]),
    ("token-negative", "", {"token_ids": [5, -1]}, 422, "token_ids", ["token_ids", "-1", f"0..{VOCAB - 1}"]),
    ("token-vocab", "", {"token_ids": [VOCAB]}, 422, "token_ids", ["token_ids", str(VOCAB), f"0..{VOCAB - 1}"]),
    ("policy-bogus", "", {"prompt": "x", "policy": "bogus"}, 422, "policy", ["policy", "bogus", "fixed"]),
    ("prompt-too-long", "", {"prompt": "x" * 200}, 413, "prompt", ["prompt", "201", str(CONTEXT - 1)]),
    ("token_ids-too-long", "", {"token_ids": [7] * CONTEXT}, 413, "token_ids",
     ["token_ids", str(CONTEXT), str(CONTEXT - 1)]),
    ("exit_layer-type", "", {"prompt": "x", "exit_layer": "abc"}, 422, "exit_layer",
     ["exit_layer", "abc", "integer"]),
    ("query-exit_layer-type", "?exit_layer=abc", {"prompt": "x"}, 422, "exit_layer",
     ["exit_layer", "abc", "integer"]),
    ("unknown-field", "", {"prompt": "x", "bogus_field": 1}, 422, "bogus_field", ["bogus_field"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gives_documented_error(ckpt, case):
    _, query, req, status, param, needles = case

    async def body():
        async with serving(make_app(ckpt)) as c:
            return await c.post(f"/generate{query}", json=req)

    check_error(run(body()), status, param, *needles)


def test_good_request_still_succeeds_after_all_bad_ones(model, ckpt):
    app = make_app(ckpt)

    async def body():
        async with serving(app) as c:
            statuses = [(await c.post(f"/generate{q}", json=req)).status_code for _, q, req, *_ in BAD]
            good = await c.post("/generate", json={"prompt": "hello", "max_tokens": 5, "ignore_eos": True})
            return statuses, good, (await c.get("/metrics")).text

    statuses, good, text = run(body())
    assert statuses == [case[3] for case in BAD]
    assert good.status_code == 200
    assert good.json()["token_ids"] == ref_greedy(model, encode("hello"), L, 5)
    assert kv_all_free(app)
    f = families(text)
    assert sample_value(f, "bitskip_requests", "bitskip_requests_total", endpoint="/generate",
                        status="422") == statuses.count(422)
    assert sample_value(f, "bitskip_rejected_requests", "bitskip_rejected_requests_total",
                        reason="prompt_too_long") == statuses.count(413)
    assert sample_value(f, "bitskip_rejected_requests", "bitskip_rejected_requests_total",
                        reason="validation") == statuses.count(422)


def test_full_queue_gives_429_with_retry_after(ckpt):
    app = make_app(ckpt, ServerSettings(max_queue=1), max_num_seqs=1)

    async def body():
        async with serving(app) as c:
            flood = [c.post("/generate", json={"prompt": f"flood {i}", "max_tokens": 40, "ignore_eos": True,
                                               "exit_layer": 1}) for i in range(12)]
            responses = await asyncio.gather(*flood)
            after = await c.post("/generate", json={"prompt": "after", "max_tokens": 2})
            return responses, after, (await c.get("/metrics")).text

    responses, after, text = run(body())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 1 and statuses.count(429) >= 1, statuses
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            err = check_error(r, 429, None, "limit 1")
            assert err["type"] == "rate_limit_error"
        else:
            assert len(r.json()["token_ids"]) == 40
    assert after.status_code == 200  # the queue drained
    f = families(text)
    assert sample_value(f, "bitskip_rejected_requests", "bitskip_rejected_requests_total",
                        reason="queue_full") == statuses.count(429)
    assert sample_value(f, "bitskip_requests", "bitskip_requests_total", endpoint="/generate",
                        status="429") == statuses.count(429)


def test_api_key(ckpt):
    async def body():
        async with serving(make_app(ckpt, ServerSettings(api_key="k"))) as c:
            req = {"prompt": "x", "max_tokens": 2}
            missing = await c.post("/generate", json=req)
            wrong = await c.post("/generate", json=req, headers={"Authorization": "Bearer nope"})
            models = await c.get("/v1/models")
            health = await c.get("/health")
            ok = await c.post("/generate", json=req, headers={"Authorization": "Bearer k"})
            ok_models = await c.get("/v1/models", headers={"Authorization": "Bearer k"})
            metrics = (await c.get("/metrics")).text
            return missing, wrong, models, health, ok, ok_models, metrics

    missing, wrong, models, health, ok, ok_models, metrics = run(body())
    for r in (missing, wrong, models):
        err = check_error(r, 401, None, "API key")
        assert err["type"] == "authentication_error"
    assert health.status_code == 200
    assert ok.status_code == 200 and len(ok.json()["token_ids"]) >= 1
    assert ok_models.status_code == 200
    f = families(metrics)
    assert sample_value(f, "bitskip_rejected_requests", "bitskip_rejected_requests_total",
                        reason="unauthorized") == 3
    assert sample_value(f, "bitskip_requests", "bitskip_requests_total", endpoint="/generate",
                        status="401") == 2


# ---- failures, concurrency, disconnects ----------------------------------------------------------
def test_exception_in_one_request_gives_500_and_others_are_served(model, ckpt, monkeypatch):
    real_sample = llm_engine_module.sample
    calls = {"boom": 0}

    def sample(logits, params, generator):
        if params.seed == 666:
            calls["boom"] += 1
            raise RuntimeError("injected failure")
        return real_sample(logits, params, generator)

    monkeypatch.setattr(llm_engine_module, "sample", sample)
    app = make_app(ckpt)
    prompts = [f"request {i}" for i in range(5)]

    async def body():
        async with serving(app) as c:
            good = [c.post("/generate", json={"prompt": p, "max_tokens": 10, "ignore_eos": True,
                                              "exit_layer": 1 + i % L}) for i, p in enumerate(prompts)]
            bad = c.post("/generate", json={"prompt": "bad", "max_tokens": 10, "seed": 666, "ignore_eos": True})
            bad_stream = c.post("/generate", json={"prompt": "bad", "max_tokens": 10, "seed": 666,
                                                   "stream": True})
            results = await asyncio.gather(bad, *good, bad_stream)
            await wait_until(lambda: idle(app), what="KV freed")
            later = await c.post("/generate", json={"prompt": "later", "max_tokens": 4, "ignore_eos": True})
            return results, later

    (bad, *good, bad_stream), later = run(body())
    assert calls["boom"] == 2
    err = check_error(bad, 500, None, "injected failure")
    assert err["type"] == "internal_error"
    # a streaming request has sent its 200 already: the error arrives as an event before [DONE]
    assert bad_stream.status_code == 200
    payloads = parse_sse(bad_stream.text)
    assert json.loads(payloads[-2])["error"]["type"] == "internal_error"
    for i, (p, r) in enumerate(zip(prompts, good)):
        assert r.status_code == 200, r.text
        assert r.json()["token_ids"] == ref_greedy(model, encode(p), 1 + i % L, 10)
    assert later.status_code == 200
    assert kv_all_free(app)


def test_32_concurrent_requests_equal_sequential(model, ckpt):
    gen = torch.Generator().manual_seed(7)
    reqs = []
    for i in range(32):
        n = 2 + (i * 5) % 37
        ids = torch.randint(0, 256, (n,), generator=gen).tolist()
        req = {"max_tokens": 8, "ignore_eos": True, "exit_layer": 1 + i % L}
        req.update({"token_ids": ids} if i % 2 else {"prompt": decode(ids) or "z"})
        reqs.append(req)
    app = make_app(ckpt)

    async def steps(c) -> float:
        f = families((await c.get("/metrics")).text)
        return sample_value(f, "bitskip_engine_step_seconds", "bitskip_engine_step_seconds_count")

    async def body():
        async with serving(app) as c:
            one_at_a_time = [(await c.post("/generate", json=req)).json() for req in reqs]
            s0 = await steps(c)
            together = await asyncio.gather(*[c.post("/generate", json=req) for req in reqs])
            s1 = await steps(c)
            return one_at_a_time, together, s1 - s0

    seq, together, concurrent_steps = run(body())
    assert all(r.status_code == 200 for r in together), [r.text for r in together if r.status_code != 200]
    for i, (a, b) in enumerate(zip(seq, together)):
        b = b.json()
        assert b["exit_layers"] == [1 + i % L] * 8
        assert b["token_ids"] == a["token_ids"], i
        assert b["text"] == a["text"]
    # and both equal the reference model (spot-check one request per depth)
    for i in range(4):
        prompt = reqs[i].get("token_ids") or encode(reqs[i]["prompt"])
        assert seq[i]["token_ids"] == ref_greedy(model, prompt, 1 + i % L, 8)
    # they really ran batched: far fewer steps than 32 requests x 8 tokens
    assert concurrent_steps < 32 * 8 / 2, concurrent_steps
    assert kv_all_free(app)


async def raw_post(app, path: str, body: dict):
    """Drive the ASGI app directly so the client can go away mid-response (httpx's ASGI transport
    buffers whole responses). Returns (app task, queue of sent messages, event that disconnects)."""
    payload = json.dumps(body).encode()
    sent = asyncio.Queue()
    gone = asyncio.Event()
    state = {"body_sent": False}

    async def receive():
        if not state["body_sent"]:
            state["body_sent"] = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await sent.put(message)

    path, _, query = path.partition("?")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
             "root_path": "", "server": ("test", 80), "client": ("127.0.0.1", 1234),
             "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(payload)).encode())]}
    return asyncio.create_task(app(scope, receive, send)), sent, gone


async def leave(app, task, gone):
    """The client of the one running request goes away; returns its sequence once freed."""
    server = app.state.server
    (seq,) = list(server.engine.scheduler.running)
    gone.set()
    await wait_until(lambda: kv_all_free(app) and server.loop.num_running == 0, 10, "KV freed")
    await asyncio.wait_for(task, 10)
    return seq


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_client_disconnect_frees_kv(ckpt, stream):
    app = make_app(ckpt)
    server = app.state.server
    prompt_len = len(encode("long"))

    async def body():
        async with app.router.lifespan_context(app):
            task, sent, gone = await raw_post(app, "/generate?exit_layer=4", {
                "prompt": "long", "max_tokens": 4000, "ignore_eos": True, "stream": stream})
            if stream:
                start = await asyncio.wait_for(sent.get(), 10)
                assert start["type"] == "http.response.start" and start["status"] == 200
                while True:  # one token event
                    msg = await asyncio.wait_for(sent.get(), 10)
                    if b"token_id" in msg.get("body", b""):
                        break
            else:
                await wait_until(lambda: server.loop.num_running == 1 and not kv_all_free(app),
                                 what="request running")
            assert server.loop.num_running == 1 and not kv_all_free(app)
            return await leave(app, task, gone)

    seq = run(body())
    # aborted: it did not run on to the end of the context
    assert seq.finish_reason == "abort"
    assert len(seq.output_ids) < CONTEXT - prompt_len - 10, len(seq.output_ids)
