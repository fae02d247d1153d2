"""One error object for every error (issue 14, finding 7 and 4): bad JSON, unknown path, wrong
method, an unhandled exception and a huge invalid value all answer `{"error": {...}}`, short."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from server.app import ServerSettings, create_app
from engine.llm_engine import EngineConfig, LLMEngine

from conftest import reference_model, write_packed
from test_server_api import check_error, run

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_packed(reference_model("v1"), tmp_path_factory.mktemp("errors") / "tiny-v1")


def make_app(ckpt, settings: ServerSettings = ServerSettings()):
    return create_app(LLMEngine(ckpt, EngineConfig()), settings)


@contextlib.asynccontextmanager
async def client(ckpt, settings: ServerSettings = ServerSettings()):
    """Unhandled exceptions reach the client as responses (as over a socket), not as raises."""
    app = make_app(ckpt, settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://test",
            timeout=60) as c:
        yield c


def call(ckpt, method: str, path: str, settings: ServerSettings = ServerSettings(), **kwargs):
    async def body():
        async with client(ckpt, settings) as c:
            return await c.request(method, path, **kwargs)
    return run(body())


def test_unparsable_body_is_400(ckpt):
    r = call(ckpt, "POST", "/generate", content=b'{"prompt": ', headers={"content-type": "application/json"})
    check_error(r, 400, None, "not valid JSON")


def test_unknown_path_is_404(ckpt):
    err = check_error(call(ckpt, "GET", "/nope"), 404, None, "/nope")
    assert err["type"] == "not_found_error"


def test_wrong_method_is_405_with_allow(ckpt):
    r = call(ckpt, "GET", "/generate")
    check_error(r, 405, None, "GET", "/generate")
    assert "POST" in r.headers["allow"]


def test_unhandled_exception_is_500_error_object(ckpt, monkeypatch):
    def boom(self, text, *args):
        raise RuntimeError("injected")
    monkeypatch.setattr(LLMEngine, "encode", boom)
    r = call(ckpt, "POST", "/generate", json={"prompt": "x"})
    err = check_error(r, 500, None, "internal error")
    assert err["type"] == "internal_error"


def test_huge_invalid_value_gets_a_short_error(ckpt):
    """Issue: a 5 MB body earned a 5 MB 422. The message quotes a short prefix."""
    body = {"prompt": "x", "exit_layer": "a" * 5_000_000}
    over_limit = call(ckpt, "POST", "/generate", json=body)
    check_error(over_limit, 413, None, "request body")
    within = call(ckpt, "POST", "/generate", ServerSettings(max_body_bytes=8_000_000), json=body)
    check_error(within, 422, "exit_layer", "exit_layer", "5000002 characters")
    assert len(over_limit.content) < 500 and len(within.content) < 500


def test_invalid_list_item_names_the_field(ckpt):
    err = check_error(call(ckpt, "POST", "/generate", json={"token_ids": [1, "x"]}), 422, "token_ids",
                      "token_ids.1")
    assert err["type"] == "invalid_request_error"


def test_unexpected_error_mid_stream_ends_with_error_event_and_done(ckpt, monkeypatch):
    import json

    import server.app as app_module
    from test_server_api import parse_sse

    def broken(seq):
        raise RuntimeError("injected")
    monkeypatch.setattr(app_module, "generate_result", broken)
    r = call(ckpt, "POST", "/generate", json={"prompt": "x", "max_tokens": 3, "stream": True})
    events = parse_sse(r.text)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "internal_error"
