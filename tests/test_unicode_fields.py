"""A lone UTF-16 surrogate (`"\\ud800"`, valid JSON, invalid Unicode) in any string of any request
body is a 4xx error object, never a 500 (issue 14, finding 3). The fields are read from the
OpenAPI document, so a new field or route is covered without editing this test: every
top-level property that admits a string, plus the strings nested in chat messages and metadata.
The probe re-run found /tokenize's prompt, `model` on four routes, a chat message's role and
extra fields giving 500s (the tokenizer's TypeError, or the 404 message not encodable)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from engine.llm_engine import EngineConfig, LLMEngine
from server.app import ServerSettings, create_app
from server.chat_template import ChatTemplate

from test_server_errors import ckpt  # noqa: F401 (the module's checkpoint fixture)

pytestmark = pytest.mark.timeout(120)

SURROGATE = "\ud800"
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ m.get('name', '') }}\n{% endfor %}"
# the smallest valid body of each POST route
MINIMAL = {"/generate": {"prompt": "hi"}, "/perplexity": {"text": "hi there"},
           "/v1/completions": {"prompt": "hi"}, "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
           "/tokenize": {"prompt": "hi"}, "/detokenize": {"tokens": [1]}}
NESTED = [("/v1/chat/completions", {"messages": [{"role": SURROGATE, "content": "hi"}]}),
          ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]}),
          ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": SURROGATE}]}),
          ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", SURROGATE: "x"}]}),
          ("/v1/completions", {"prompt": "hi", "metadata": {"k": SURROGATE}}),
          ("/v1/completions", {"prompt": ["hi", SURROGATE]}),
          ("/generate", {"prompt": "hi", "stop": ["a", SURROGATE]})]


def admits_string(schema: dict, schemas: dict) -> bool:
    if "$ref" in schema:
        return admits_string(schemas[schema["$ref"].rsplit("/", 1)[-1]], schemas)
    values = schema.get("enum", []) + ([schema["const"]] if "const" in schema else [])
    if schema.get("type") == "string" or schema == {} or any(isinstance(v, str) for v in values):
        return True
    return any(admits_string(s, schemas) for s in schema.get("anyOf", []) + schema.get("oneOf", []))


def cases(doc: dict) -> list[tuple[str, dict]]:
    schemas, out = doc["components"]["schemas"], []
    posts = {path for path, ops in doc["paths"].items() if "post" in ops}
    assert posts == set(MINIMAL), "a new POST route: give it a minimal body here"
    for path in sorted(posts):
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        for name, prop in schemas[ref.rsplit("/", 1)[-1]]["properties"].items():
            if admits_string(prop, schemas):
                out.append((path, {**MINIMAL[path], name: SURROGATE}))
    return out + NESTED


def test_a_lone_surrogate_in_any_string_is_never_a_500(ckpt):
    engine = LLMEngine(ckpt, EngineConfig())
    app = create_app(engine, ServerSettings(model_name="m"), ChatTemplate(TEMPLATE, engine.special_tokens()))

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t",
                                                                       timeout=60) as c:
            sent = cases(app.openapi())
            answers = []
            for path, body in sent:  # ASCII JSON with the escape: httpx's json= would refuse it
                r = await c.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
                answers.append((path, body, r))
            return answers

    answers = asyncio.run(go())
    assert len(answers) > 20  # the walk found the text fields
    for path, body, r in answers:
        assert r.status_code < 500, (path, body, r.text)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    refused = {(path, next(k for k, v in body.items() if v == SURROGATE)) for path, body, r in answers
               if r.status_code == 422 and SURROGATE in body.values()}
    for field in [("/tokenize", "prompt"), ("/detokenize", "model"), ("/v1/completions", "model"),
                  ("/v1/chat/completions", "model"), ("/generate", "prompt"), ("/perplexity", "text")]:
        assert field in refused, field
