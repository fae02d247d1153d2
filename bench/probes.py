"""Issue 14's probes, re-run against live servers started fresh: each finding's exact input, the
status it gets and whether that is the documented answer; /health and a 1-token /generate are
timed while the heavy probes run, and the server's RSS is read before and after.

    python bench/probes.py                    # the default model
    python bench/probes.py --model DIR

Server A (`--api-key`, `--metrics-auth`) takes findings 1-4 and 7; server B (`--max-queue 2`,
`--drain-timeout 0`) is filled until it answers 429 and then sent SIGTERM with requests in flight
(finding 5); finding 6 runs the CLI on a config with max_position_embeddings 10^12. Prints the
table and writes JSON (default bench/out/probes.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import git_commit  # bench/ is the script's directory, first on sys.path
from serve import ROOT, free_port, start_server
from soak import rss_mib

import httpx

sys.path.insert(0, str(ROOT))
from models.default_model import resolve_model  # noqa: E402

KEY = "probe-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SURROGATE = b'"\\ud800"'  # a lone UTF-16 surrogate, as JSON writes it


class Probes:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, finding: str, probe: str, expected: str, got: str, ok: bool, detail: str = "") -> None:
        self.rows.append({"finding": finding, "probe": probe, "expected": expected, "got": got, "ok": ok,
                          "detail": detail})
        print(f"{'ok ' if ok else 'BAD'} [{finding}] {probe}: {got} {detail}", flush=True)

    def status(self, finding: str, probe: str, r: httpx.Response, expected: int, detail: str = "") -> dict | None:
        """A row for a response that should be `expected` with the error object (when >= 400)."""
        body = None
        try:
            body = r.json()
        except ValueError:
            pass
        error_object = expected < 400 or (isinstance(body, dict) and set(body.get("error", {})) >=
                                          {"message", "type", "param", "code"})
        self.add(finding, probe, str(expected), f"{r.status_code} ({len(r.content)} B)",
                 r.status_code == expected and error_object, detail)
        return body


def raw(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """(status, response bytes) of one hand-written HTTP/1.1 request (header bytes sent as given)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(head + b"\r\n" + body)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data:
                break
        return int(data.split()[1]), data


async def timed_health(url: str, stop: asyncio.Event) -> list[float]:
    """/health latencies, one probe every 100 ms, until `stop`."""
    out = []
    async with httpx.AsyncClient(timeout=300) as c:
        while not stop.is_set():
            t = time.perf_counter()
            await c.get(f"{url}/health")
            out.append(time.perf_counter() - t)
            await asyncio.sleep(0.1)
    return out


async def beside(url: str, work) -> tuple:
    """Run `work` (a coroutine) with /health probed meanwhile: (work's result, max /health s)."""
    stop = asyncio.Event()
    health = asyncio.create_task(timed_health(url, stop))
    try:
        result = await work
    finally:
        stop.set()
    return result, max(await health)


def long_text(c: httpx.Client, tokens: int = 21894) -> tuple[str, int]:
    """A text of about `tokens` tokens (the issue's long /perplexity) and its exact count."""
    words = "the early exit of a ternary model scores this passage word by word".split()
    text = " ".join(words[i % len(words)] + str(i % 10) for i in range(40000))
    n = c.post("/tokenize", json={"prompt": text}).json()["count"]
    text = " ".join(text.split()[:int(40000 * tokens / n)])
    return text, c.post("/tokenize", json={"prompt": text}).json()["count"]


def step_totals(c: httpx.Client) -> tuple[float, float]:
    """(seconds, count) of the engine steps so far, from /metrics."""
    values = {line.split()[0]: float(line.split()[1]) for line in c.get("/metrics").text.splitlines()
              if line.startswith(("bitskip_engine_step_seconds_sum", "bitskip_engine_step_seconds_count"))}
    return values["bitskip_engine_step_seconds_sum"], values["bitskip_engine_step_seconds_count"]


def server_a(p: Probes, url: str, port: int, pid: int) -> None:
    rss0 = rss_mib(pid)
    c = httpx.Client(base_url=url, headers=AUTH, timeout=600)
    # ---- 1: a 50 MiB body, sized and chunked; /health meanwhile --------------------------------
    big = json.dumps({"prompt": "x" * (50 << 20)}).encode()

    async def upload(chunked: bool):
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=600) as ac:
            async def parts():  # no Content-Length: sent chunked
                for i in range(0, len(big), 1 << 20):
                    yield big[i:i + (1 << 20)]
            t = time.perf_counter()
            r = await ac.post("/generate", content=parts() if chunked else big,
                              headers={"content-type": "application/json"})
            return r, time.perf_counter() - t
    for chunked in (False, True):
        (r, took), health = asyncio.run(beside(url, upload(chunked)))
        p.status("1", f"50 MiB prompt ({'chunked' if chunked else 'Content-Length'})", r, 413,
                 f"answered in {took:.2f} s; /health max {health * 1000:.0f} ms")
    # ---- 2: a 21,894-token /perplexity beside a 1-token /generate; /ready sampled --------------
    text, n = long_text(c)
    steps0 = step_totals(c)

    async def long_scoring():
        async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=1200) as ac:
            t = time.perf_counter()
            scoring = asyncio.create_task(ac.post("/perplexity", json={"text": text}))
            gens, ready = [], []
            while not scoring.done():
                t0 = time.perf_counter()
                g = await ac.post("/generate", json={"prompt": "hi", "max_tokens": 1})
                gens.append((g.status_code, time.perf_counter() - t0))
                ready.append((await ac.get("/ready")).status_code)
            return await scoring, time.perf_counter() - t, gens, ready
    (r, took, gens, ready), health = asyncio.run(beside(url, long_scoring()))
    worst = max(s for _, s in gens)
    (total1, count1), (total0, count0) = step_totals(c), steps0
    p.status("2", f"/perplexity of {n} tokens", r, 200, f"{took:.1f} s")
    p.add("2", f"1-token /generate meanwhile (x{len(gens)})", "200, held up at most about a step",
          f"{sorted({s for s, _ in gens})}, median {sorted(s for _, s in gens)[len(gens) // 2]:.2f} s, "
          f"max {worst:.2f} s",
          all(s == 200 for s, _ in gens), f"engine steps meanwhile: {count1 - count0:.0f}, mean "
          f"{(total1 - total0) / max(1, count1 - count0):.2f} s")
    p.add("2", f"/ready meanwhile (x{len(ready)})", "200", f"{ready.count(503)} x 503; /health max "
          f"{health * 1000:.0f} ms", all(s == 200 for s in ready))
    # ---- 3: bad text, header bytes, subnormal values ------------------------------------------
    for path, body in [("/generate", b'{"prompt": %s}'), ("/generate", b'{"prompt": "a", "stop": [%s]}'),
                       ("/v1/completions", b'{"prompt": %s}'), ("/perplexity", b'{"text": %s}'),
                       ("/tokenize", b'{"prompt": %s}'), ("/v1/completions", b'{"prompt": "a", "model": %s}')]:
        r = c.post(path, content=body % SURROGATE, headers={"content-type": "application/json"})
        p.status("3", f"lone surrogate: {path} {(body % SURROGATE).decode()}", r, 422)
    get = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Junk: \xff\xfe\r\n"
    for probe, head, want in [("non-UTF-8 header byte, right key", get + b"Authorization: Bearer probe-key\r\n", 200),
                              ("non-UTF-8 header byte, no key", get, 401),
                              ("key 'Bearer \\xff'", get + b"Authorization: Bearer \xff\r\n", 401)]:
        status, _ = raw(port, head)
        p.add("3", probe, str(want), str(status), status == want)
    for stream in (False, True):
        r = c.post("/generate", json={"prompt": "hello", "max_tokens": 4, "temperature": 5e-324, "stream": stream})
        clean = not stream or (r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text)
        p.add("3", f"temperature 5e-324 ({'stream' if stream else 'plain'})", "200, no error event",
              str(r.status_code), r.status_code == 200 and clean)
    r = c.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 4, "repetition_penalty": 5e-324})
    p.status("3", "repetition_penalty 5e-324 (fuzz finding)", r, 200)
    # ---- 4: amplification -------------------------------------------------------------------
    r = c.post("/generate", json={"prompt": 1, "stop": "x" * 1_000_000})
    p.status("4", "1 MB invalid value", r, 422, "the error quotes a short prefix")
    r = c.post("/generate", json={"prompt": 1, "token_ids": "7" * 5_000_000})
    p.status("4", "5 MB invalid value", r, 413)
    for items in (1_000_000, 200_000):
        t = time.perf_counter()
        r = c.post("/generate", json={"prompt": "x", "stop": [f"s{i}" for i in range(items)]})
        p.status("4", f"{items:,}-item stop list", r, 413 if items == 1_000_000 else 422,
                 f"{(time.perf_counter() - t) * 1000:.0f} ms")
    # ---- 7: the error object for every status ---------------------------------------------------
    p.status("7", "unparsable body", c.post("/generate", content=b'{"prompt": ',
                                             headers={"content-type": "application/json"}), 400)
    p.status("7", "no API key", httpx.post(f"{url}/generate", json={"prompt": "x"}), 401)
    p.status("7", "/metrics without the key (--metrics-auth)", httpx.get(f"{url}/metrics"), 401)
    p.status("7", "unknown path", c.get("/nope"), 404)
    p.status("7", "unknown model", c.post("/v1/completions", json={"prompt": "x", "model": "nope"}), 404)
    p.status("7", "wrong method", c.get("/generate"), 405)
    for probe, kwargs in [("token_ids: [true]", {"json": {"token_ids": [True]}}),
                          ('token_ids: ["7"]', {"json": {"token_ids": ["7"]}}),
                          ("?exit_layer=18.0", {"json": {"prompt": "x"}, "params": {"exit_layer": "18.0"}})]:
        p.status("7", probe, c.post("/generate", **kwargs), 422)
    # 499: a client that leaves mid-request (the long scoring) is recorded, never answered
    with httpx.Client(base_url=url, headers=AUTH, timeout=0.5) as quick:
        try:
            quick.post("/perplexity", json={"text": text})
        except httpx.TimeoutException:
            pass
    deadline, seen = time.monotonic() + 60, False
    while time.monotonic() < deadline and not seen:
        seen = 'status="499"' in c.get("/metrics").text
    p.add("7", "client leaves mid-request", "499 recorded in bitskip_requests_total", "recorded" if seen else
          "not recorded", seen)
    rss1 = rss_mib(pid)
    p.add("1", "server RSS before / after the probes", "no unbounded growth", f"{rss0:.0f} / {rss1:.0f} MiB",
          rss1 < rss0 + 512)


def server_b(p: Probes, model: str | None) -> None:
    port = free_port()
    proc = start_server(model, port, 2, ["--max-queue", "2", "--drain-timeout", "0"])
    url = f"http://127.0.0.1:{port}"
    context = httpx.get(f"{url}/v1/models").json()["data"][0]["max_model_len"]
    long = {"prompt": "x", "max_tokens": min(200, context - 8), "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=600) as c:
        scoring = {"text": long_text(c)[0]}  # long enough to be in flight when the server stops

    async def admitted(ac: httpx.AsyncClient) -> int:
        text = (await ac.get("/metrics")).text
        return sum(int(float(line.split()[-1])) for line in text.splitlines()
                   if line.startswith(("bitskip_requests_running ", "bitskip_requests_waiting ")))

    async def fill_then_stop():
        async with httpx.AsyncClient(base_url=url, timeout=300) as ac:
            async def stream():
                async with ac.stream("POST", "/generate", json={**long, "stream": True}) as r:
                    return r.status_code, [x async for x in r.aiter_lines() if x.startswith("data: ")]
            tasks = [asyncio.create_task(ac.post("/perplexity", json=scoring)) for _ in range(2)]
            tasks.append(asyncio.create_task(stream()))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and await admitted(ac) < len(tasks):
                await asyncio.sleep(0.05)  # polling until the three are in, with a deadline
            extra = [asyncio.create_task(ac.post("/generate", json=long)) for _ in range(6)]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any(t.done() for t in extra):
                await asyncio.sleep(0.05)  # polling for the first refusal, with a deadline
            # the queue is full: stop the server with requests running and waiting, past its drain
            proc.send_signal(signal.SIGTERM)
            answers = await asyncio.gather(*extra, return_exceptions=True)
            refused = [r for r in answers if isinstance(r, httpx.Response) and r.status_code == 429]
            return refused, await asyncio.gather(*tasks, return_exceptions=True)
    try:
        refused, results = asyncio.run(fill_then_stop())
        if refused:
            p.status("7", "queue full (--max-queue 2)", refused[0], 429, f"Retry-After {refused[0].headers.get('retry-after')}")
        else:
            p.add("7", "queue full (--max-queue 2)", "429", "no 429", False)
        for r in results[:2]:
            if isinstance(r, httpx.Response):
                p.status("5", "/perplexity in flight at SIGTERM (--drain-timeout 0)", r, 503)
            else:
                p.add("5", "/perplexity in flight at SIGTERM", "503", repr(r)[:80], False)
        s = results[2]
        if isinstance(s, tuple):
            status, lines = s
            ok = lines[-1] == "data: [DONE]" and '"unavailable"' in lines[-2]
            p.add("5", "stream in flight at SIGTERM", "error event, then [DONE]", f"{status}; {lines[-2][:60]}", ok)
        else:
            p.add("5", "stream in flight at SIGTERM", "error event, then [DONE]", repr(s)[:80], False)
        code = proc.wait(60)
        p.add("5", "server exit after SIGTERM", "0", str(code), code == 0)
    finally:
        if proc.poll() is None:
            proc.kill()


def config_probe(p: Probes, model: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "huge-context"
        shutil.copytree(resolve_model(model), copy)
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 10**12}))
        for command in (["serve", "--port", str(free_port())], ["generate", "hello"]):
            r = subprocess.run([sys.executable, "-m", "server.cli", command[0], "--model", str(copy), *command[1:]],
                               cwd=ROOT, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
            lines = r.stderr.strip().splitlines()
            ok = r.returncode == 2 and "Traceback" not in r.stderr and lines[-1].startswith("error:")
            p.add("6", f"max_position_embeddings 10^12 ({command[0]})", "exit 2, one line",
                  f"exit {r.returncode}", ok, lines[-1][:90] if lines else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint (default model if unset)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "probes.json")
    args = ap.parse_args()
    p = Probes()
    port = free_port()
    proc = start_server(args.model, port, 16, ["--api-key", KEY, "--metrics-auth"])
    try:
        server_a(p, f"http://127.0.0.1:{port}", port, proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    server_b(p, args.model)
    config_probe(p, args.model)
    bad = [r for r in p.rows if not r["ok"]]
    print(f"\n{len(p.rows)} probes, {len(bad)} not as documented")
    print("| # | probe | expected | got | |\n|---|---|---|---|---|")
    for r in p.rows:
        print(f"| {r['finding']} | {r['probe']} | {r['expected']} | {r['got']} | {r['detail']} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"benchmark": "probes", "rows": p.rows, "failures": len(bad),
                                     "commit": git_commit(), "machine": f"{platform.machine()} {os.cpu_count()} cpus",
                                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=2) + "\n")
    print(f"wrote {args.json}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
