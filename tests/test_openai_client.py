"""The official `openai` client against `bitskip serve` on loopback: depth by model name,
logprobs, echo, n, chat (streaming and not), and OpenAI's errors for unknown models."""

from __future__ import annotations

import json
import shutil

import openai
import pytest

from models.tokenizer import BOS_ID

from test_openai_api import TEMPLATE, piece, ref_greedy, ref_logprobs, text_of
from test_server_live import bitskip_serve

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def client(shared_v1, tmp_path_factory):
    path = tmp_path_factory.mktemp("client") / "tiny"
    shutil.copytree(shared_v1[1].path, path)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    with bitskip_serve(path, tmp_path_factory.mktemp("client-log") / "server.log") as (proc, port):
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60)
        assert proc.poll() is None, "the server died during the tests"


def test_depth_by_model_name_logprobs_echo_and_n(shared_v1, client):
    model = shared_v1[0]
    names = [m.id for m in client.models.list().data]
    assert names[0] == "tiny" and {"tiny@1", "tiny@2", "tiny@4"} <= set(names)
    prompt = [BOS_ID] + list(b"hello")
    for k in (2, 4):
        r = client.completions.create(model=f"tiny@{k}", prompt="hello", max_tokens=4, temperature=0,
                                      logprobs=2, echo=True, extra_body={"ignore_eos": True})
        out = ref_greedy(model, prompt, k, 4)
        ids = prompt + out
        lp = r.choices[0].logprobs
        assert r.choices[0].text == "hello" + text_of(out)
        assert lp.tokens == [piece(t) for t in ids]
        assert lp.token_logprobs[0] is None
        ref = ref_logprobs(model, ids, k)
        assert lp.token_logprobs[1:] == pytest.approx([float(ref[i, t]) for i, t in enumerate(ids[1:])], abs=1e-5)
        assert r.model_extra["exit_layers"] == [k] * 4

    many = client.completions.create(model="tiny@3", prompt="hi", max_tokens=5, n=3, seed=11, temperature=1.0)
    one = client.completions.create(model="tiny@3", prompt="hi", max_tokens=5, seed=12, temperature=1.0)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[1].text == one.choices[0].text  # choice 1 used seed + 1

    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.completions.create(model="tiny", prompt="hi", best_of=2)
    assert "best_of" in str(e.value)


def test_chat_with_the_checkpoints_template(shared_v1, client):
    model = shared_v1[0]
    messages = [{"role": "user", "content": "hi"}]
    prompt = [BOS_ID] + list(b"[user] hi\n[assistant] ")
    out = ref_greedy(model, prompt, 2, 6)
    r = client.chat.completions.create(model="tiny@2", messages=messages, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text_of(out)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [piece(t) for t in out]
    assert all(len(c.top_logprobs) == 3 for c in content)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 6

    chunks = list(client.chat.completions.create(
        model="tiny@2", messages=messages, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text_of(out)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
