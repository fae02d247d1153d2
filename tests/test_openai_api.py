"""The OpenAI-compatible API in-process (ASGI): logprobs and echo against the reference model,
n and prompt batches, the sampling fields, depth by model name, chat with a checkpoint's
template, stream_options, the tokenizer routes, and the 4xx answers for what is not served."""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest
import torch

from engine.llm_engine import EngineConfig, LLMEngine
from models.tokenizer import BOS_ID, EOS_ID
from server.app import ServerSettings, create_app
from server.chat_template import load_chat_template

pytestmark = pytest.mark.timeout(120)

L = 4
NAME = "tiny"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def chat_ckpt(shared_v1, tmp_path_factory):
    """The shared tiny checkpoint's files plus a tokenizer_config.json with a chat template."""
    import shutil
    from models.checkpoint import load_checkpoint
    path = tmp_path_factory.mktemp("chat") / "tiny-chat"
    shutil.copytree(shared_v1[1].path, path)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return load_checkpoint(path)


def call(ckpt, requests: list[tuple[str, str, dict | None]], chat: bool = False) -> list[httpx.Response]:
    """Run (method, path, json) requests in order against a fresh app on `ckpt`."""
    async def body():
        engine = LLMEngine(ckpt, EngineConfig(max_num_batched_tokens=16))
        template = load_chat_template(ckpt.path, engine.special_tokens()) if chat else None
        app = create_app(engine, ServerSettings(model_name=NAME), template)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(app.router.lifespan_context(app))
            c = await stack.enter_async_context(httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=60))
            return [await c.request(m, p, json=j) for m, p, j in requests]
    return asyncio.run(body())


def post(path: str, body: dict):
    return ("POST", path, body)


def sse(response: httpx.Response) -> list[dict]:
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@torch.no_grad()
def ref_logprobs(model, ids: list[int], k: int) -> torch.Tensor:
    return torch.log_softmax(model(torch.tensor([ids]), [k])[k][0].double(), -1)


@torch.no_grad()
def ref_greedy(model, ids: list[int], k: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(int(model(torch.tensor([ids + out]), [k])[k][0, -1].argmax()))
    return out


def piece(t: int) -> str:
    """The token string OpenAI's logprobs show for byte-level id t (ids past the tokenizer's 258,
    which the tiny test model's vocabulary has, stand for no text)."""
    if t >= 256:
        return {BOS_ID: "<|bos|>", EOS_ID: "<|eos|>"}.get(t, "")
    return chr(t) if t < 128 else f"bytes:\\x{t:02x}"


def text_of(ids: list[int]) -> str:
    return bytes(t for t in ids if t < 256).decode("utf-8", "replace")


def check_error(r: httpx.Response, status: int, param: str, *words: str):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    for w in words:
        assert w in err["message"], err


def test_logprobs_and_echo_are_the_exit_layers(shared_v1):
    model, ckpt = shared_v1
    req = {"prompt": "the cat", "max_tokens": 5, "temperature": 0, "logprobs": 3, "ignore_eos": True}
    prompt = [BOS_ID] + list(b"the cat")
    plain, echo, full, ppl = call(ckpt, [post("/v1/completions", {**req, "model": f"{NAME}@2"}),
                                         post("/v1/completions", {**req, "model": f"{NAME}@2", "echo": True}),
                                         post("/v1/completions", {**req, "model": NAME, "echo": True}),
                                         post("/perplexity", {"token_ids": prompt, "exit_layers": [2]})])
    # The echoed prompt's logprobs are /perplexity's at the same depth.
    scored = echo.json()["choices"][0]["logprobs"]["token_logprobs"][1:len(prompt)]
    assert -sum(scored) / len(scored) == pytest.approx(ppl.json()["nll"]["2"], abs=1e-6)
    for r, k in ((echo, 2), (full, L)):
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        out = ref_greedy(model, prompt, k, 5)
        ids = prompt + out
        assert lp["tokens"] == [piece(t) for t in ids]
        ref = ref_logprobs(model, ids, k)
        assert lp["tokens"][0] == "<|bos|>" and "".join(lp["tokens"][1:len(prompt)]) == "the cat"
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        expect = [float(ref[i, t]) for i, t in enumerate(ids[1:])]
        assert lp["token_logprobs"][1:] == pytest.approx(expect, abs=1e-5)
        for i, top in enumerate(lp["top_logprobs"][1:]):
            best = torch.topk(ref[i], 3)
            # the 3 most likely and the chosen token, by their strings (ids without text share "")
            expect_top = {piece(t): v for t, v in zip(best.indices.tolist(), best.values.tolist())}
            expect_top[piece(ids[i + 1])] = float(ref[i, ids[i + 1]])
            assert top == pytest.approx(expect_top, abs=1e-5)
        assert choice["text"] == "the cat" + text_of(out)
        assert lp["text_offset"] == [len(text_of(ids[:i])) for i in range(len(ids))]
        assert choice["exit_layers"] == [k] * 5
    # Without echo: only the generated tokens, the same values.
    lp = plain.json()["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == pytest.approx(
        echo.json()["choices"][0]["logprobs"]["token_logprobs"][len(prompt):], abs=1e-5)
    out = ref_greedy(model, prompt, 2, 5)
    assert lp["text_offset"] == [len(text_of(out[:i])) for i in range(5)]


def test_n_seeds_and_prompt_batches(shared_v1):
    _, ckpt = shared_v1
    base = {"model": NAME, "max_tokens": 6, "temperature": 1.0, "ignore_eos": True}
    many, *singles = call(ckpt, [post("/v1/completions", {**base, "prompt": ["ab", [BOS_ID, 99]], "n": 3,
                                                           "seed": 7})]
                          + [post("/v1/completions", {**base, "prompt": p, "seed": 7 + j})
                             for p in ("ab", [BOS_ID, 99]) for j in range(3)])
    res = many.json()
    assert [c["index"] for c in res["choices"]] == list(range(6))
    # Choice j of a prompt is the request with seed + j, on its own.
    assert [c["text"] for c in res["choices"]] == [s.json()["choices"][0]["text"] for s in singles]
    assert len({c["text"] for c in res["choices"][:3]}) > 1  # independent samples
    assert res["usage"] == {"prompt_tokens": 3 + 2, "completion_tokens": 36, "total_tokens": 41}
    assert "exit_layers" not in res  # per choice when there are several
    assert all(c["exit_layers"] == [L] * 6 for c in res["choices"])


def test_sampling_fields_over_http(shared_v1):
    _, ckpt = shared_v1
    q = ord("q")
    base = {"model": NAME, "prompt": "hi", "max_tokens": 8, "temperature": 0}
    forced, stopped, held = call(ckpt, [
        post("/v1/completions", {**base, "logit_bias": {str(q): 100}, "ignore_eos": True}),
        post("/v1/completions", {**base, "logit_bias": {str(q): 100}, "stop_token_ids": [q], "min_tokens": 2}),
        post("/v1/completions", {**base, "logit_bias": {str(EOS_ID): 100}, "min_tokens": 3,
                                 "frequency_penalty": 0.5, "presence_penalty": 0.5, "repetition_penalty": 1.2})])
    assert forced.json()["choices"][0]["text"] == "q" * 8
    c = stopped.json()["choices"][0]  # q cannot come before min_tokens, then it stops the request
    assert c["finish_reason"] == "stop" and stopped.json()["usage"]["completion_tokens"] == 3
    assert "q" not in c["text"]
    c = held.json()["choices"][0]
    assert c["finish_reason"] == "stop" and held.json()["usage"]["completion_tokens"] == 4


def test_streams_with_n_usage_and_echo(shared_v1):
    _, ckpt = shared_v1
    req = {"model": f"{NAME}@3", "prompt": "go", "max_tokens": 5, "temperature": 0.8, "seed": 3, "n": 2,
           "logprobs": 1, "echo": True, "ignore_eos": True}
    whole, streamed = call(ckpt, [post("/v1/completions", req),
                                  post("/v1/completions", {**req, "stream": True,
                                                           "stream_options": {"include_usage": True}})])
    chunks = sse(streamed)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole.json()["usage"]
    for choice in whole.json()["choices"]:
        parts = [p for ch in chunks[:-1] for p in ch["choices"] if p["index"] == choice["index"]]
        assert "".join(p["text"] for p in parts) == choice["text"]
        for key in ("tokens", "text_offset"):
            assert [v for p in parts for v in p["logprobs"][key]] == choice["logprobs"][key]
        # Two runs batch differently: equal up to floating-point rounding (DESIGN section 5).
        streamed_lps = [v for p in parts for v in p["logprobs"]["token_logprobs"]]
        assert streamed_lps[0] is None and choice["logprobs"]["token_logprobs"][0] is None
        assert streamed_lps[1:] == pytest.approx(choice["logprobs"]["token_logprobs"][1:], abs=1e-6)
        assert [p["finish_reason"] for p in parts] == [None] * (len(parts) - 1) + ["length"]


def test_models_names_choose_the_depth_and_unknown_names_are_404(shared_v1):
    model, ckpt = shared_v1
    req = {"prompt": [BOS_ID, 104], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    models, at2, body2, *bad = call(ckpt, [
        ("GET", "/v1/models", None),
        post("/v1/completions", {**req, "model": f"{NAME}@2"}),
        post("/v1/completions", {**req, "model": NAME, "exit_layer": 2}),
        post("/v1/completions", {**req, "model": "other"}),
        post("/v1/completions", {**req, "model": f"{NAME}@{L + 1}"}),
        post("/v1/completions", {**req, "model": f"{NAME}@2", "exit_layer": 3}),
        post("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]})])
    ids = [m["id"] for m in models.json()["data"]]
    assert ids == [NAME] + [f"{NAME}@{k}" for k in sorted(set(ckpt.config.exit_points) | {L})]
    assert at2.json()["choices"][0]["text"] == body2.json()["choices"][0]["text"]
    assert at2.json()["exit_layers"] == [2] * 4 and at2.json()["model"] == f"{NAME}@2"
    check_error(bad[0], 404, "model", "'other' does not exist")
    assert bad[0].json()["error"]["code"] == "model_not_found"
    check_error(bad[1], 404, "model", f"{NAME}@{L + 1}")
    check_error(bad[2], 422, "exit_layer", f"{NAME}@2")
    assert bad[3].status_code == 404 or bad[3].status_code == 400  # unknown model or no template


def test_unimplemented_fields_are_422_never_ignored(shared_v1):
    _, ckpt = shared_v1
    base = {"model": NAME, "prompt": "x", "max_tokens": 2}
    cases = [({"best_of": 3}, "best_of"), ({"suffix": "end"}, "suffix"), ({"logprobs": 21}, "logprobs"),
             ({"n": 17}, "n"), ({"frobnicate": 1}, "frobnicate"), ({"presence_penalty": 3}, "presence_penalty"),
             ({"logit_bias": {"100000": 1}}, "logit_bias"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
             ({"min_tokens": 3}, None), ({"stream_options": {"bogus": True}}, "stream_options.bogus")]
    responses = call(ckpt, [post("/v1/completions", {**base, **extra}) for extra, _ in cases])
    for (extra, param), r in zip(cases, responses):
        assert r.status_code == 422, (extra, r.text)
        if param:
            assert r.json()["error"]["param"] == param, (extra, r.json())
    assert "min_tokens" in responses[-2].json()["error"]["message"]


def test_chat_renders_the_template_and_matches_the_reference(shared_v1, chat_ckpt):
    model = shared_v1[0]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    req = {"model": f"{NAME}@2", "messages": messages, "max_tokens": 5, "temperature": 0, "logprobs": True,
           "top_logprobs": 2, "ignore_eos": True}
    whole, streamed, tools, no_template = call(chat_ckpt, [
        post("/v1/chat/completions", req), post("/v1/chat/completions", {**req, "stream": True}),
        post("/v1/chat/completions", {**req, "tools": [{"type": "function", "function": {"name": "f"}}]}),
        ("POST", "/v1/chat/completions", None)], chat=True)
    prompt = [BOS_ID] + list(b"[system] be brief\n[user] hi\n[assistant] ")
    res = whole.json()
    assert res["object"] == "chat.completion" and res["usage"]["prompt_tokens"] == len(prompt)
    msg = res["choices"][0]["message"]
    content = res["choices"][0]["logprobs"]["content"]
    out = ref_greedy(model, prompt, 2, 5)
    ref = ref_logprobs(model, prompt + out, 2)
    assert [e["token"] for e in content] == [piece(t) for t in out]
    for i, e in enumerate(content):
        assert e["logprob"] == pytest.approx(float(ref[len(prompt) - 1 + i, out[i]]), abs=1e-5)
        assert len(e["top_logprobs"]) == 2 and e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"])
    assert msg == {"role": "assistant", "content": text_of(out)}
    chunks = sse(streamed)
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks) == msg["content"]
    streamed = [e for ch in chunks for e in ch["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-6)
    check_error(tools, 422, "tools", "not supported")
    assert no_template.status_code == 422  # no body at all

    [plain, doc] = call(shared_v1[1], [post("/v1/chat/completions", req), ("GET", "/openapi.json", None)])
    check_error(plain, 400, "messages", "no chat template")
    assert "/v1/chat/completions" not in doc.json()["paths"]  # the document only lists what can succeed
    [doc] = call(chat_ckpt, [("GET", "/openapi.json", None)], chat=True)
    assert "/v1/chat/completions" in doc.json()["paths"]


def test_tokenizer_routes(shared_v1):
    _, ckpt = shared_v1
    tok, raw, detok, info = call(ckpt, [post("/tokenize", {"prompt": "hi"}),
                                        post("/tokenize", {"prompt": "hi", "add_special_tokens": False}),
                                        post("/detokenize", {"tokens": [104, 105]}),
                                        ("GET", "/tokenizer_info", None)])
    assert tok.json()["tokens"] == [BOS_ID, 104, 105] and raw.json()["tokens"] == [104, 105]
    assert detok.json()["prompt"] == "hi"
    assert info.json()["eos_token"] == "<|eos|>" and info.json()["bos_token"] == "<|bos|>"
