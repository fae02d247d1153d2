"""One markdown summary of a bench/gpu_check.sh run: the GPU, each step's status, and the figures
against the issue's targets. Reads OUTDIR/*.json, writes OUTDIR/summary.md (and prints it).

    python bench/gpu_summary.py OUTDIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(out: Path, name: str) -> dict | None:
    path = out / name
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "MISSED")


def decode_section(out: Path, lines: list[str]) -> None:
    b1, b32 = load(out, "decode-b1.json"), load(out, "decode-b32.json")
    peer1, peer32 = load(out, "dense-b1.json"), load(out, "dense-b32.json")
    if not b1:
        lines.append("decode: no result (see steps above)\n")
        return
    layers = list(b1["tokens_per_s"])
    full = layers[-1]
    lines.append(f"## Decode ({b1['model']}, {b1['device']})\n")
    lines.append("| exit | batch 1 tok/s | vs full | batch 32 tok/s | b32 / b1 |")
    lines.append("|---|---|---|---|---|")
    for k in layers:
        r1 = b1["tokens_per_s"][k]
        r32 = b32["tokens_per_s"].get(k) if b32 else None
        lines.append(f"| {k} | {r1:.1f} | {r1 / b1['tokens_per_s'][full]:.2f}x | "
                     f"{'' if r32 is None else f'{r32:.1f}'} | {'' if r32 is None else f'{r32 / r1:.1f}x'} |")
    for peer, batch in ((peer1, 1), (peer32, 32)):
        if peer:
            ours = (b1 if batch == 1 else b32 or {}).get("tokens_per_s", {}).get(full)
            ratio = f", ours at exit {full}: {ours / peer['tokens_per_s']:.2f}x" if ours else ""
            lines.append(f"\nbf16 dense peer ({peer['model']}{', compiled' if peer['compiled'] else ''}) "
                         f"batch {batch}: {peer['tokens_per_s']:.1f} tok/s{ratio}")
    r = b1["tokens_per_s"]
    ex18 = r.get("18")
    lines.append("\nTargets (paper-1b):")
    lines.append(f"- batch-1 exit {full} >= 1000 tok/s: {r[full]:.0f} ({check(r[full] >= 1000)})")
    if ex18:
        lines.append(f"- exit 18 >= 1.28x exit {full}: {ex18 / r[full]:.2f}x ({check(ex18 / r[full] >= 1.28)})")
    if peer1:
        ratio = r[full] / peer1["tokens_per_s"]
        lines.append(f"- >= 3x the bf16 dense peer at batch 1: {ratio:.2f}x ({check(ratio >= 3)})")
    if b32:
        agg = b32["tokens_per_s"][full] / r[full]
        lines.append(f"- batch-32 aggregate >= 15x batch 1: {agg:.1f}x ({check(agg >= 15)})")
    lines.append("")


def kernels_section(out: Path, lines: list[str]) -> None:
    k = load(out, "gpu_kernels.json")
    if not k:
        return
    lines.append("## Projection kernels (bench/gpu_kernels.py)\n")
    t = k.get("m1_gate_up")
    if t:
        lines.append(f"- M=1 2048->8192 (kernel {t['kernel']}): {t['ours_us']:.2f} us vs bf16 cuBLAS "
                     f"{t['bf16_us']:.2f} us = {t['speedup']:.2f}x, target >= 4x: {check(t['met'])}")
    lines.append("- full table: gpu_kernels.json, gpu_kernels.log\n")


def serve_section(out: Path, lines: list[str]) -> None:
    s = load(out, "serve.json")
    if not s:
        return
    lines.append("## Live server (bench/serve.py)\n")
    lines.append("| concurrency | tok/s | x c=1 | TTFT p50 ms | ITL p50 ms |")
    lines.append("|---|---|---|---|---|")
    base = s["levels"][0]["tokens_per_s"]
    for r in s["levels"]:
        lines.append(f"| {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base:.2f}x | "
                     f"{r['ttft_p50_ms']:.1f} | {r['itl_p50_ms']:.1f} |")
    lines.append("")


def main() -> None:
    out = Path(sys.argv[1])
    env = load(out, "environment.json") or {}
    lines = [f"# BitSkip GPU check: {env.get('gpu', 'unknown GPU')}\n",
             f"{env.get('date', '')}, commit {env.get('commit', '?')}, torch {env.get('torch', '?')}, "
             f"triton {env.get('triton', '?')}, mode {env.get('mode', '?')}\n", "## Steps\n",
             "| step | status | seconds |", "|---|---|---|"]
    for line in (out / "steps.tsv").read_text().splitlines() if (out / "steps.tsv").exists() else []:
        name, status, seconds = line.split("\t")
        shown = "ok" if status == "0" else status if status.startswith("skipped") else f"FAILED (exit {status})"
        lines.append(f"| {name} | {shown} | {seconds} |")
    lines.append("")
    decode_section(out, lines)
    kernels_section(out, lines)
    serve_section(out, lines)
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
