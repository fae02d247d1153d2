"""A real `bitskip serve` process over real HTTP: /generate, the official OpenAI client, the
metrics exposition, and a graceful SIGTERM (running requests finish, new ones are refused, exit 0)."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from models.tokenizer import BOS_ID

from conftest import reference_model, write_packed

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live_process(cmd: list, ready_url: str, log_path: Path, name: str, deadline_s: float = 60):
    """Run `cmd` (output to `log_path`) until the block ends; yields the process once
    `ready_url` answers 200, polled with a deadline (never a fixed sleep)."""
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + deadline_s
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} not ready in time:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


@contextlib.contextmanager
def bitskip_serve(ckpt_dir: Path, log_path: Path, *extra: str):
    """Start `bitskip serve` and wait (with a deadline) until /ready answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "server.cli", "serve", "--model", str(ckpt_dir), "--port", str(port),
           "--threads", "1", "--log-level", "warning", *extra]
    with live_process(cmd, f"http://127.0.0.1:{port}/ready", log_path, "server") as proc:
        yield proc, port


@pytest.fixture(scope="module")
def model_and_dir(tmp_path_factory):
    model = reference_model("v1")
    path = tmp_path_factory.mktemp("live") / "tiny-v1"
    write_packed(model, path)
    return model, path


@pytest.fixture(scope="module")
def served(model_and_dir, tmp_path_factory):
    _, path = model_and_dir
    with bitskip_serve(path, tmp_path_factory.mktemp("live-log") / "server.log") as (proc, port):
        yield f"http://127.0.0.1:{port}"
        assert proc.poll() is None, "the server died during the tests"


@torch.no_grad()
def ref_greedy(model, prompt: list[int], k: int, max_tokens: int) -> list[int]:
    ids, out = list(prompt), []
    for _ in range(max_tokens):
        t = int(model(torch.tensor([ids]), [k])[k][0, -1].argmax())
        out.append(t)
        ids.append(t)
    return out


def test_generate_over_http_at_exit_layer_2(model_and_dir, served):
    model, _ = model_and_dir
    r = httpx.post(f"{served}/generate?exit_layer=2", json={"prompt": "hello", "max_tokens": 8,
                                                             "ignore_eos": True}, timeout=30)
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["exit_layers"] == [2] * 8
    assert res["token_ids"] == ref_greedy(model, [BOS_ID] + list(b"hello"), 2, 8)
    assert res["finish_reason"] == "length"
    bad = httpx.post(f"{served}/generate?exit_layer=9", json={"prompt": "hello"}, timeout=30)
    assert bad.status_code == 422 and "1..4" in bad.json()["error"]["message"]


def test_openai_client_completions(served):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="x", max_retries=0, timeout=30)
    models = client.models.list()
    name = models.data[0].id
    assert name == "tiny-v1"
    direct = httpx.post(f"{served}/generate", json={"prompt": "hello", "max_tokens": 8, "exit_layer": 2,
                                                    "ignore_eos": True}, timeout=30).json()

    resp = client.completions.create(model=name, prompt="hello", max_tokens=8, temperature=0,
                                     extra_body={"exit_layer": 2, "ignore_eos": True})
    assert resp.object == "text_completion"
    assert resp.choices[0].text == direct["text"]
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 8 and resp.usage.prompt_tokens == 6
    assert resp.model_extra["exit_layers"] == [2] * 8

    chunks = list(client.completions.create(model=name, prompt="hello", max_tokens=8, temperature=0,
                                            stream=True, extra_body={"exit_layer": 2, "ignore_eos": True}))
    assert len(chunks) >= 2
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == direct["text"]
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == "length"

    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.completions.create(model=name, prompt="hello", max_tokens=8, extra_body={"exit_layer": 0})
    assert "exit_layer" in str(e.value)


def test_metrics_have_both_exit_layer_series(served):
    for k in (2, 4):
        r = httpx.post(f"{served}/generate?exit_layer={k}", json={"prompt": "m", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200
    text = httpx.get(f"{served}/metrics", timeout=30).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    latency = fams["bitskip_request_latency_seconds"]
    layers = {s.labels["exit_layer"] for s in latency.samples if s.name.endswith("_bucket")}
    assert {"2", "4"} <= layers
    counts = {s.labels["exit_layer"]: s.value for s in latency.samples if s.name.endswith("_count")}
    assert counts["2"] >= 1 and counts["4"] >= 1
    tokens = {s.labels["exit_layer"]: s.value for s in fams["bitskip_generated_tokens"].samples}
    assert tokens["2"] >= 1 and tokens["4"] >= 1
    requests = {(s.labels["endpoint"], s.labels["status"]): s.value for s in fams["bitskip_requests"].samples}
    assert requests[("/generate", "200")] >= 2


def test_sigterm_finishes_running_request_refuses_new_ones_and_exits_0(tmp_path):
    # a longer context than tiny-test's 128, so the stream outlasts the checks below
    model = reference_model("v1", max_position_embeddings=512)
    path = tmp_path / "long-ctx"
    write_packed(model, path)
    max_tokens = 400
    with bitskip_serve(path, tmp_path / "server.log", "--max-batch", "2", "--drain-timeout", "60") as (proc, port):
        url = f"http://127.0.0.1:{port}"
        events, first, errors = [], threading.Event(), []

        def read_stream():
            try:
                with httpx.stream("POST", f"{url}/generate", json={"prompt": "go", "max_tokens": max_tokens,
                                                                  "ignore_eos": True, "stream": True},
                                  timeout=60) as r:
                    assert r.status_code == 200
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[len("data: "):])
                            first.set()
            except BaseException as e:  # reported by the main thread
                errors.append(e)
                first.set()

        reader = threading.Thread(target=read_stream, daemon=True)
        reader.start()
        assert first.wait(30), "no event from the streaming request"
        assert not errors, errors
        proc.send_signal(signal.SIGTERM)

        # new connections are refused while the running request is still streaming
        deadline = time.monotonic() + 10
        while True:
            try:
                httpx.get(f"{url}/health", timeout=1)
            except httpx.ConnectError:
                break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server still accepts connections after SIGTERM"
            time.sleep(0.01)
        in_flight = len(events)
        assert reader.is_alive() and in_flight < max_tokens, in_flight

        reader.join(60)
        assert not reader.is_alive() and not errors, errors
        assert events[-1] == "[DONE]"
        final = json.loads(events[-2])
        assert final["finish_reason"] == "length"
        assert len(final["token_ids"]) == max_tokens
        tokens = [json.loads(e) for e in events[:-2]]
        assert [t["token_id"] for t in tokens] == final["token_ids"]
        assert proc.wait(30) == 0, (tmp_path / "server.log").read_text()
