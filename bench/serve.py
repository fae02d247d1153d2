"""Serving throughput and latency at several concurrency levels, against a live server.

    python bench/serve.py                         # starts `bitskip serve` (default model) itself
    python bench/serve.py --url http://host:8000  # an already running server

Each level runs `concurrency` closed-loop clients, each sending streaming /generate requests
back to back for `--requests-per-client` requests. Reports aggregate generated tokens/s and
p50/p99 of time to first token and inter-token latency (client side), prints a table and writes
JSON (default bench/out/serve.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import git_commit  # bench/ is the script's directory, first on sys.path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def one_request(client: httpx.AsyncClient, body: dict, exit_layer: int | None):
    """(tokens, ttft, [inter-token gaps]) of one streaming request."""
    t0 = time.perf_counter()
    stamps = []
    params = {"exit_layer": exit_layer} if exit_layer else {}
    async with client.stream("POST", "/generate", json=body, params=params) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"token_id"' in line:
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return len(stamps), (stamps[0] - t0) if stamps else float("nan"), gaps


async def run_level(url: str, concurrency: int, n_per_client: int, body: dict, exit_layers: list[int | None]):
    results = []

    async def client_loop(i: int):
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            for j in range(n_per_client):
                results.append(await one_request(client, body, exit_layers[(i + j) % len(exit_layers)]))

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop(i) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    tokens = sum(r[0] for r in results)
    ttft = [r[1] for r in results]
    itl = [g for r in results for g in r[2]]
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall,
            "ttft_p50_ms": 1000 * percentile(ttft, 50), "ttft_p99_ms": 1000 * percentile(ttft, 99),
            "itl_p50_ms": 1000 * percentile(itl, 50), "itl_p99_ms": 1000 * percentile(itl, 99)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, port: int, max_batch: int, extra: list[str] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), "--max-batch", str(max_batch),
           "--log-level", "warning", *extra]
    if model:
        cmd += ["--model", model]
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": pythonpath})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)  # polling a starting process; not a correctness wait
    proc.kill()
    raise SystemExit("server did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=None, help="server to measure (default: start one)")
    ap.add_argument("--model", default=None, help="checkpoint for the started server (default model if unset)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompt", default="The meaning of an early exit is")
    ap.add_argument("--exit-layers", default="", help="comma-separated exit layers to rotate (default: full)")
    ap.add_argument("--serve-args", default="", help="more arguments for the started server, e.g. "
                    "'--device cpu --backend triton'")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "serve.json")
    args = ap.parse_args()

    levels = [int(x) for x in args.concurrency.split(",")]
    exit_layers = [int(x) for x in args.exit_layers.split(",") if x] or [None]
    body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True}
    proc = None
    url = args.url
    if url is None:
        port = free_port()
        proc = start_server(args.model, port, max(levels), args.serve_args.split())
        url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(run_level(url, 1, 1, body, exit_layers))  # warm-up
        rows = [asyncio.run(run_level(url, c, args.requests_per_client, body, exit_layers)) for c in levels]
    finally:
        if proc:
            proc.terminate()
            proc.wait(60)

    base = rows[0]["tokens_per_s"]
    print(f"\nserve benchmark: {url}, {args.max_tokens} tokens per request, exit layers {exit_layers}")
    print(f"{'conc':>5} {'reqs':>5} {'tok/s':>9} {'x c=1':>7} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'ITL p50':>8} {'ITL p99':>8}   (ms)")
    for r in rows:
        print(f"{r['concurrency']:>5} {r['requests']:>5} {r['tokens_per_s']:>9.1f} {r['tokens_per_s'] / base:>6.2f}x "
              f"{r['ttft_p50_ms']:>9.1f} {r['ttft_p99_ms']:>9.1f} {r['itl_p50_ms']:>8.1f} {r['itl_p99_ms']:>8.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    commit = git_commit()
    args.json.write_text(json.dumps({
        "benchmark": "serve", "url": url, "max_tokens": args.max_tokens, "exit_layers": exit_layers,
        "levels": rows, "speedup_vs_c1": {r["concurrency"]: r["tokens_per_s"] / base for r in rows},
        "commit": commit, "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
