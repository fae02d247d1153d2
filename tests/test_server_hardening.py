"""Issue 14's probes, each sent exactly as the issue describes it: large bodies, lone surrogates,
non-UTF-8 header bytes with an API key, a subnormal temperature, huge stop lists, loosely typed
ids and integers, and /metrics behind the key. Each must give a 2xx or a clear 4xx, and the
server must go on serving."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from engine.llm_engine import LLMEngine
from server.app import ServerSettings
from server.fields import MAX_STOP

from test_server_api import check_error, parse_sse, run
from test_server_errors import call, ckpt, client  # noqa: F401 (ckpt: the module's fixture)

pytestmark = pytest.mark.timeout(120)

SURROGATE = "\ud800"  # a lone UTF-16 surrogate
KEY = ServerSettings(api_key="k")


# ---- finding 1: one large body -------------------------------------------------------------------
def test_50_mib_prompt_is_413_before_parsing(ckpt):
    body = json.dumps({"prompt": "x" * (50 * 1024 * 1024)}).encode()

    async def go():
        async with client(ckpt) as c:
            sized = await c.post("/generate", content=body, headers={"content-type": "application/json"})

            async def chunks():  # no Content-Length: the limit applies while reading
                for i in range(0, len(body), 1 << 20):
                    yield body[i:i + (1 << 20)]
            chunked = await c.post("/generate", content=chunks(), headers={"content-type": "application/json"})
            health = await c.get("/health")
            return sized, chunked, health

    sized, chunked, health = run(go())
    for r in (sized, chunked):
        err = check_error(r, 413, None, "request body", str(2 * 1024 * 1024))
        assert err["type"] == "invalid_request_error"
    assert health.status_code == 200


def test_tokenizing_runs_off_the_event_loop(ckpt, monkeypatch):
    """While a prompt is being tokenized, /health and another request are answered: encode is
    held on a gate, so if it ran on the event loop nothing else could answer and this would hang."""
    gate, entered = threading.Event(), threading.Event()
    real = LLMEngine.encode

    def held(self, text, *args):
        if text == "held":
            entered.set()
            assert gate.wait(30)
        return real(self, text, *args)
    monkeypatch.setattr(LLMEngine, "encode", held)

    async def go():
        async with client(ckpt) as c:
            slow = asyncio.create_task(c.post("/generate", json={"prompt": "held", "max_tokens": 2}))
            while not entered.is_set():
                await asyncio.sleep(0.005)
            health = await c.get("/health")
            other = await c.post("/generate", json={"prompt": "other", "max_tokens": 2})
            done_before = slow.done()
            gate.set()
            return health, other, done_before, await slow

    health, other, done_before, slow = run(go())
    assert health.status_code == 200 and other.status_code == 200
    assert not done_before
    assert slow.status_code == 200


# ---- finding 3: 500s from bad input --------------------------------------------------------------
@pytest.mark.parametrize("path,body,param", [
    ("/generate", {"prompt": SURROGATE}, "prompt"),
    ("/generate", {"prompt": "x", "stop": [SURROGATE]}, "stop"),
    ("/v1/completions", {"prompt": SURROGATE}, "prompt"),
    ("/perplexity", {"text": SURROGATE}, "text"),
], ids=["generate", "stop", "completions", "perplexity"])
def test_lone_surrogate_is_422(ckpt, path, body, param):
    raw = json.dumps(body).encode()  # ASCII, with the escape "\ud800" (httpx's json= refuses it)
    r = call(ckpt, "POST", path, content=raw, headers={"content-type": "application/json"})
    err = check_error(r, 422, param, "surrogate")
    assert err["type"] == "invalid_request_error"


def test_non_utf8_header_bytes_with_api_key(ckpt):
    """Any non-UTF-8 byte in any header: the right key still works, a wrong one is a 401."""
    async def go():
        async with client(ckpt, KEY) as c:
            junk = {"X-Junk": b"\xff\xfe\x80"}
            ok = await c.post("/generate", json={"prompt": "x", "max_tokens": 1},
                              headers={**junk, "Authorization": "Bearer k"})
            models = await c.get("/v1/models", headers={**junk, "Authorization": "Bearer k"})
            missing = await c.get("/v1/models", headers=junk)
            bad_key = await c.get("/v1/models", headers={"Authorization": b"Bearer \xff"})
            return ok, models, missing, bad_key

    ok, models, missing, bad_key = run(go())
    assert ok.status_code == 200 and models.status_code == 200
    for r in (missing, bad_key):
        check_error(r, 401, None, "API key")


@pytest.mark.parametrize("stream", [False, True])
def test_subnormal_temperature_samples_the_top_token(ckpt, stream):
    """temperature 5e-324 is valid and acts as (almost) greedy; it used to overflow to NaN."""
    req = {"prompt": "hello", "max_tokens": 6, "ignore_eos": True}

    async def go():
        async with client(ckpt) as c:
            greedy = await c.post("/generate", json={**req, "temperature": 0})
            tiny = await c.post("/generate", json={**req, "temperature": 5e-324, "seed": 1, "stream": stream})
            return greedy, tiny

    greedy, tiny = run(go())
    assert tiny.status_code == 200, tiny.text
    result = json.loads(parse_sse(tiny.text)[-2]) if stream else tiny.json()
    assert "error" not in result
    assert result["token_ids"] == greedy.json()["token_ids"]


def test_subnormal_repetition_penalty_is_not_a_500(ckpt):
    """The case schemathesis found (its exact body): a repetition_penalty of 5e-324 overflowed
    the seen tokens' logits to inf and the sampler to NaN (500)."""
    body = {"repetition_penalty": 5e-324, "presence_penalty": 2.2231975296384335e-297,
            "prompt": [0.0, 180, 74, 210.0, 106, 192, 73], "stop": None, "top_k": 629.0, "max_tokens": 4,
            "echo": False, "exit_layer": 3.0}
    r = call(ckpt, "POST", "/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


# ---- finding 4: amplification --------------------------------------------------------------------
def test_million_item_stop_list_is_refused_fast(ckpt):
    r = call(ckpt, "POST", "/generate", json={"prompt": "x", "stop": ["a"] * 1_000_000})
    check_error(r, 413, None, "request body")


def test_200000_valid_stop_strings_are_refused(ckpt):
    r = call(ckpt, "POST", "/generate", json={"prompt": "x", "stop": ["zq"] * 200_000})
    check_error(r, 422, "stop", f"at most {MAX_STOP}")
    assert len(r.content) < 500


# ---- finding 7: strict types ----------------------------------------------------------------------
@pytest.mark.parametrize("query,body,param", [
    ("", {"token_ids": [True]}, "token_ids"),
    ("", {"token_ids": ["7"]}, "token_ids"),
    ("", {"token_ids": [7.5]}, "token_ids"),
    ("?exit_layer=18.0", {"prompt": "x"}, "exit_layer"),
    ("?exit_layer=1e1", {"prompt": "x"}, "exit_layer"),
    ("", {"prompt": "x", "max_tokens": "3"}, "max_tokens"),
    ("", {"prompt": "x", "stream": 1}, "stream"),
], ids=["true", "string", "float", "query-float", "query-exp", "max_tokens-string", "stream-int"])
def test_loose_types_are_refused(ckpt, query, body, param):
    check_error(call(ckpt, "POST", f"/generate{query}", json=body), 422, param, param)


def test_perplexity_ids_are_strict(ckpt):
    check_error(call(ckpt, "POST", "/perplexity", json={"token_ids": [1, True]}), 422, "token_ids")
    check_error(call(ckpt, "POST", "/perplexity", json={"token_ids": [1, 2], "exit_layers": ["2"]}), 422,
                "exit_layers")


# ---- /metrics behind the key -----------------------------------------------------------------------
def test_metrics_auth(ckpt):
    async def go(settings):
        async with client(ckpt, settings) as c:
            return await c.get("/metrics"), await c.get("/metrics", headers={"Authorization": "Bearer k"})

    open_, _ = run(go(KEY))
    assert open_.status_code == 200
    closed, keyed = run(go(ServerSettings(api_key="k", metrics_auth=True)))
    check_error(closed, 401, None, "API key")
    assert keyed.status_code == 200 and "bitskip_requests_total" in keyed.text


# ---- finding 5: shutdown past the drain timeout ---------------------------------------------------
def test_shutdown_past_drain_timeout_answers_with_error_objects(ckpt):
    """In-process (the app's own lifespan): requests still running when the drain timeout ends
    get a 503 error object, and streams an error event then [DONE]."""
    from test_server_errors import make_app
    app = make_app(ckpt, ServerSettings(drain_timeout=0.0))
    req = {"prompt": "go", "max_tokens": 100, "ignore_eos": True, "exit_layer": 1}

    async def go():
        import httpx
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                                     timeout=60) as c:
            async with app.router.lifespan_context(app):
                plain = asyncio.create_task(c.post("/generate", json=req))
                streamed = asyncio.create_task(c.post("/generate", json={**req, "stream": True}))
                while app.state.server.loop.num_running < 2:
                    await asyncio.sleep(0.002)
            return await plain, await streamed

    plain, streamed = run(go())
    err = check_error(plain, 503, None, "shut down", "drain timeout")
    assert err["type"] == "unavailable" and plain.headers["retry-after"]
    events = parse_sse(streamed.text)
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "unavailable"


def test_sigterm_past_drain_timeout_over_http(tmp_path):
    """A real `bitskip serve`: SIGTERM with --drain-timeout 0 while a plain request and a stream
    run. The plain one gets the 503 error object, the stream an error event and [DONE]; the
    process exits 0 with no traceback in its log."""
    import signal

    import httpx

    from conftest import reference_model, write_packed
    from test_server_live import bitskip_serve

    path = tmp_path / "long-ctx"
    write_packed(reference_model("v1", max_position_embeddings=512), path)
    req = {"prompt": "go", "max_tokens": 500, "ignore_eos": True}
    log = tmp_path / "server.log"
    with bitskip_serve(path, log, "--max-batch", "2", "--drain-timeout", "0") as (proc, port):
        url = f"http://127.0.0.1:{port}"
        results = {}

        def send(name, body):
            results[name] = httpx.post(f"{url}/generate", json=body, timeout=60)
        threads = [threading.Thread(target=send, args=("plain", req)),
                   threading.Thread(target=send, args=("stream", {**req, "stream": True}))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while "bitskip_requests_running 2.0" not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline, "the two requests never ran together"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert proc.wait(30) == 0
    check_error(results["plain"], 503, None, "shut down")
    events = parse_sse(results["stream"].text)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["type"] == "unavailable"
    assert "Traceback" not in log.read_text()


# ---- finding 6: a config with max_position_embeddings 10^12 ----------------------------------------
@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["generate", "hello"]])
def test_huge_context_in_config_is_one_message_and_exit_2(tmp_path, command):
    import subprocess
    import sys

    from conftest import reference_model, write_packed
    from test_server_live import REPO

    path = tmp_path / "huge-ctx"
    write_packed(reference_model("v1"), path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 10**12
    (path / "config.json").write_text(json.dumps(config))
    cmd, rest = command[0], command[1:]
    p = subprocess.run([sys.executable, "-m", "server.cli", cmd, "--model", str(path), *rest],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert "KV cache" in lines[0] and "max_position_embeddings" in lines[0]
