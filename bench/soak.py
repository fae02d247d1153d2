"""Soak: mixed traffic, good and bad, against a live server for a while; does it stay up, answer
/health, keep its memory and make no errors?

    python bench/soak.py                                   # starts `bitskip serve` (default model)
    python bench/soak.py --duration 60 --concurrency 16    # shorter
    python bench/soak.py --url http://host:8000 --pid N    # a running server (RSS of process N)

`--concurrency` closed-loop clients send, in rotation: /generate (plain and streamed, at several
exit layers), /v1/completions (plain and streamed), /v1/chat/completions (when the model has a
chat template), /tokenize, /v1/models, a short /perplexity, a long /perplexity (thousands of
tokens), and bad requests (bad JSON, a lone surrogate, out-of-range fields, an oversized body,
loose types, unknown paths and models, unsupported OpenAI fields). One more client probes /health back to back. A good request must answer 200 (a
stream must end with [DONE] and no error event); a bad one must answer its 4xx. Anything else
(a 5xx, a wrong status, a broken connection) counts as an error. The server's RSS is sampled
every second. Prints a table and writes JSON (default bench/out/soak.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path

from common import git_commit  # bench/ is the script's directory, first on sys.path
from serve import ROOT, free_port, percentile, start_server

import httpx

LONG_TEXT = " ".join(f"word{i % 97} of the long scored passage" for i in range(600))

# (kind, method, path, body or raw bytes, status expected)
BAD = [
    ("bad:json", "POST", "/generate", b'{"prompt": ', 400),
    ("bad:surrogate", "POST", "/generate", b'{"prompt": "\\ud800"}', 422),
    ("bad:exit_layer", "POST", "/generate?exit_layer=999", {"prompt": "x"}, 422),
    ("bad:query_float", "POST", "/generate?exit_layer=2.0", {"prompt": "x"}, 422),
    ("bad:token_true", "POST", "/generate", {"token_ids": [True]}, 422),
    ("bad:stop_list", "POST", "/generate", {"prompt": "x", "stop": ["s"] * 1000}, 422),
    ("bad:big_body", "POST", "/generate", {"prompt": "x" * (3 * 1024 * 1024)}, 413),
    ("bad:unknown_path", "GET", "/nope", None, 404),
    ("bad:method", "GET", "/generate", None, 405),
    ("bad:model", "POST", "/v1/completions", {"prompt": "x", "model": "no-such-model"}, 404),
    ("bad:best_of", "POST", "/v1/completions", {"prompt": "x", "best_of": 3}, 422),
]


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Soak:
    def __init__(self, url: str, layers: list[int], max_tokens: int, chat: bool):
        self.url, self.layers, self.max_tokens, self.chat = url, layers, max_tokens, chat
        self.latency: dict[str, list[float]] = {}
        self.errors: list[str] = []
        self.counts: dict[str, int] = {}

    def record(self, kind: str, seconds: float, error: str | None) -> None:
        self.latency.setdefault(kind, []).append(seconds)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if error:
            self.errors.append(f"{kind}: {error}")

    def requests(self, i: int):
        """The i-th request of a client's rotation: (kind, method, path, body, expected status, stream)."""
        k = self.layers[i % len(self.layers)]
        good = [
            (f"generate@{k}", "POST", f"/generate?exit_layer={k}",
             {"prompt": f"Request {i}: the", "max_tokens": self.max_tokens, "ignore_eos": True}, 200, False),
            (f"stream@{k}", "POST", "/generate",
             {"prompt": f"Stream {i}", "max_tokens": self.max_tokens, "exit_layer": k, "stream": True}, 200, True),
            ("completions", "POST", "/v1/completions",
             {"prompt": "Once upon", "max_tokens": self.max_tokens, "temperature": 0.8, "seed": i}, 200, False),
            ("completions:stream", "POST", "/v1/completions",
             {"prompt": f"Story {i}:", "max_tokens": self.max_tokens, "stream": True, "n": 2}, 200, True),
            ("perplexity", "POST", "/perplexity", {"text": "A short text to score."}, 200, False),
        ]
        if i % 2:
            good.append(("tokenize", "POST", "/tokenize", {"prompt": f"Count the tokens of {i}"}, 200, False))
        else:
            good.append(("models", "GET", "/v1/models", None, 200, False))
        if self.chat:
            good.append(("chat", "POST", "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": f"Hi {i}"}], "max_tokens": self.max_tokens,
                          "stream": i % 2 == 1}, 200, i % 2 == 1))
        rotation = good + [good[0], good[1]] + [(*b, False) for b in BAD[i % len(BAD):][:1]]
        if i % 7 == 3:
            rotation.append(("perplexity:long", "POST", "/perplexity", {"text": LONG_TEXT}, 200, False))
        return rotation

    async def one(self, client: httpx.AsyncClient, kind, method, path, body, expect, stream) -> None:
        t0 = time.perf_counter()
        error = None
        kwargs = ({"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes)
                  else {"json": body} if body is not None else {})
        try:
            if stream:
                async with client.stream(method, path, **kwargs) as r:
                    lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                if r.status_code != expect:
                    error = f"status {r.status_code}"
                elif not lines or lines[-1] != "data: [DONE]" or any('"error"' in x for x in lines[-2:]):
                    error = f"stream ended badly: {lines[-2:]!r}"[:200]
            else:
                r = await client.request(method, path, **kwargs)
                if r.status_code != expect:
                    error = f"status {r.status_code}: {r.text[:200]}"
                elif expect >= 400 and "error" not in r.json():
                    error = f"not the error object: {r.text[:200]}"
        except httpx.HTTPError as e:
            error = f"{type(e).__name__}: {e}"
        self.record(kind, time.perf_counter() - t0, error)

    async def client(self, c: int, deadline: float) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=300) as client:
            i = c
            while time.monotonic() < deadline:
                for req in self.requests(i):
                    if time.monotonic() >= deadline:
                        break
                    await self.one(client, *req)
                i += 1

    async def health(self, deadline: float) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=300) as client:
            while time.monotonic() < deadline:
                await self.one(client, "health", "GET", "/health", None, 200, False)
                await asyncio.sleep(0.1)  # a probe's period, as an orchestrator's

    async def rss(self, pid: int | None, deadline: float, samples: list) -> None:
        t0 = time.monotonic()
        while time.monotonic() < deadline and pid:
            samples.append((round(time.monotonic() - t0, 1), rss_mib(pid)))
            await asyncio.sleep(1.0)

    async def run(self, concurrency: int, duration: float, pid: int | None) -> list:
        deadline = time.monotonic() + duration
        samples: list = []
        await asyncio.gather(self.rss(pid, deadline, samples), self.health(deadline),
                             *(self.client(c, deadline) for c in range(concurrency)))
        return samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="server to soak (default: start one)")
    ap.add_argument("--pid", type=int, default=None, help="with --url: the server process, for RSS")
    ap.add_argument("--model", default=None, help="checkpoint for the started server (default model if unset)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--duration", type=float, default=300.0, help="seconds (default 5 minutes)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--exit-layers", default="6,12,18,24")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "soak.json")
    args = ap.parse_args()

    proc, url, pid = None, args.url, args.pid
    if url is None:
        port = free_port()
        proc = start_server(args.model, port, args.concurrency)
        url, pid = f"http://127.0.0.1:{port}", proc.pid
    layers = [int(x) for x in args.exit_layers.split(",")]
    chat = "/v1/chat/completions" in httpx.get(f"{url}/openapi.json", timeout=60).json()["paths"]  # a template
    soak = Soak(url, layers, args.max_tokens, chat)
    try:
        t0 = time.perf_counter()
        samples = asyncio.run(soak.run(args.concurrency, args.duration, pid))
        wall = time.perf_counter() - t0
    finally:
        if proc:
            proc.terminate()
            proc.wait(60)

    rows = {kind: {"count": soak.counts[kind], "p50_ms": 1000 * percentile(v, 50),
                   "p99_ms": 1000 * percentile(v, 99), "max_ms": 1000 * max(v)}
            for kind, v in sorted(soak.latency.items())}
    rss = [m for _, m in samples if m is not None]
    total = sum(soak.counts.values())
    print(f"\nsoak: {url}, {args.concurrency} clients + a /health probe, {wall:.0f} s, {total} requests, "
          f"{len(soak.errors)} errors")
    print(f"{'kind':<18} {'count':>6} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for kind, r in rows.items():
        print(f"{kind:<18} {r['count']:>6} {r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f} {r['max_ms']:>9.1f}")
    if rss:
        third = max(1, len(rss) // 3)
        print(f"RSS MiB: start {rss[0]:.0f}, max {max(rss):.0f}, end {rss[-1]:.0f} "
              f"(mean of first third {sum(rss[:third]) / third:.0f}, last third {sum(rss[-third:]) / third:.0f})")
    for e in soak.errors[:20]:
        print("error:", e)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "soak", "url": url, "concurrency": args.concurrency, "duration_s": wall,
        "max_tokens": args.max_tokens, "exit_layers": layers, "requests": total, "errors": len(soak.errors),
        "error_samples": soak.errors[:50], "latency": rows, "rss_mib": samples,
        "commit": git_commit(), "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
