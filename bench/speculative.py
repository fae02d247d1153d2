"""Self-speculative decoding against full-depth greedy decoding, at identical output.

    python bench/speculative.py                       # default model, E in its exit points + its default, k 2..6 + its default
    python bench/speculative.py --draft-exits 6 --draft-tokens 2,3 --draft-confidence 0,0.1 --skip-server

Single stream: greedy decode of held-out prompts in this process, one request at a time, every
configuration (full depth and each (E, k)) timed in each repeat, interleaved; decode time from the
first token to the last (the first token comes from the prompt's full-depth step either way).
On a machine with two cores or more each stream's round is pipelined (engine/kernels/native/
draft_loop.c: one core drafts while the other verifies), as the server runs it; full depth runs a
block of one row on one core at any thread count (too small to share). `--no-pipeline` times the
sequential round instead. `--cpu-time` times by the process's CPU time (both cores of a pipelined
round: its CPU cost, not its latency), which keeps other processes' load out of the ratios.
Concurrent: a live `bitskip serve` and `--concurrency` clients sending one /generate request
each, all at once, per configuration; tokens/s over the wall time of the wave. Every output is
compared with the full-depth output of the same prompt. Prints tables, writes JSON (default
bench/out/speculative.json) and a PNG of the gain against E and k (default bench/speculative.png).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from common import decode_seconds, git_commit  # bench/ is the script's directory, first on sys.path
from serve import free_port, start_server

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `bitskip serve` runs (server/cli.py)

from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from engine.speculative import SpeculativeRule  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402

FULL = "full"


def prompts_from(path: Path, engine: LLMEngine, n: int, tokens: int) -> list[list[int]]:
    """The first `tokens` ids of `n` paragraphs of a text file."""
    lines = [x for x in path.read_text(encoding="utf-8").splitlines() if len(x) > 4 * tokens]
    return [engine.encode(x)[:tokens] for x in lines[:n]]


def decode_one(engine: LLMEngine, prompt: list[int], params: SamplingParams,
               rule: SpeculativeRule | None, clock) -> tuple[list[int], float, int, int]:
    """(output ids, decode seconds after the first token, drafted, accepted) of one request alone."""
    seq = engine.add_request(prompt, params, speculative=rule)
    dt = decode_seconds(engine, seq, clock)
    s = seq.speculation
    return seq.output_ids, dt, s.drafted if s else 0, s.accepted if s else 0


def single_stream(engine: LLMEngine, prompts, configs, max_tokens: int, repeats: int,
                  clock=time.perf_counter) -> dict:
    """Each repeat decodes every prompt under every configuration, the configurations taking
    turns prompt by prompt (in an order rotated each repeat), so that drift in the machine's speed
    hits them alike; a configuration's gain is the median over repeats of its tokens/s over full
    depth's in the same repeat."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    rates = {c: [] for c in configs}
    outputs, drafted, accepted = {}, dict.fromkeys(configs, 0), dict.fromkeys(configs, 0)
    for rep in range(repeats):
        order = configs[rep % len(configs):] + configs[:rep % len(configs)]
        spent = {c: [0.0, 0] for c in configs}
        for i, p in enumerate(prompts):
            for c in order:
                rule = None if c == FULL else SpeculativeRule(*c)
                ids, dt, d, a = decode_one(engine, p, params, rule, clock)
                spent[c][0] += dt
                spent[c][1] += len(ids) - 1
                outputs[c, i] = ids
                if rep == 0:
                    drafted[c], accepted[c] = drafted[c] + d, accepted[c] + a
        for c in configs:
            rates[c].append(spent[c][1] / spent[c][0])
    return {c: {"tokens_per_s": statistics.median(rates[c]), "runs": rates[c],
                "gain": statistics.median(r / f for r, f in zip(rates[c], rates[FULL])),
                "equal": all(outputs[c, i] == outputs[FULL, i] for i in range(len(prompts))),
                "acceptance": accepted[c] / drafted[c] if drafted[c] else None} for c in configs}, outputs


async def concurrent_wave(url: str, prompts, config, max_tokens: int) -> tuple[float, list, int, int]:
    """(tokens/s, outputs, drafted, accepted) of one request per prompt, sent all at once."""
    body = {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    if config != FULL:
        body |= {"policy": "speculative", "draft_exit_layer": config[0], "num_draft_tokens": config[1],
                 "draft_confidence": config[2]}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        t0 = time.perf_counter()
        rs = await asyncio.gather(*[client.post("/generate", json={**body, "token_ids": p}) for p in prompts])
        dt = time.perf_counter() - t0
    for r in rs:
        r.raise_for_status()
    out = [r.json() for r in rs]
    return (sum(len(o["token_ids"]) for o in out) / dt, [o["token_ids"] for o in out],
            sum(o["usage"].get("draft_tokens", 0) for o in out),
            sum(o["usage"].get("accepted_draft_tokens", 0) for o in out))


def concurrent(args, prompts, configs, reference) -> dict:
    port = free_port()
    proc = start_server(str(args.model), port, max(8, len(prompts)), [])
    url = f"http://127.0.0.1:{port}"
    try:
        rates = {c: [] for c in configs}
        result = {}
        for rep in range(args.repeats):
            for c in configs:
                rate, outs, d, a = asyncio.run(concurrent_wave(url, prompts, c, args.max_tokens))
                rates[c].append(rate)
                result[c] = {"equal": all(o == reference[FULL, i] for i, o in enumerate(outs)),
                             "acceptance": a / d if d else None}
        for c in configs:
            result[c] |= {"tokens_per_s": statistics.median(rates[c]), "runs": rates[c]}
        return result
    finally:
        proc.terminate()
        proc.wait(30)


def table(title: str, result: dict) -> list[str]:
    base = result[FULL]["tokens_per_s"]
    lines = [f"\n{title}", "| E | k | draft confidence | tokens/s | vs full depth | acceptance | output = full depth |",
             "|---|---|---|---|---|---|---|"]
    for c, r in result.items():
        e, k, tau = ("full", "-", "-") if c == FULL else c
        acc = "-" if r["acceptance"] is None else f"{100 * r['acceptance']:.1f}%"
        gain = r.get("gain", r["tokens_per_s"] / base)  # paired per repeat where there are repeats
        lines.append(f"| {e} | {k} | {tau} | {r['tokens_per_s']:.1f} | {gain:.2f}x | {acc} | "
                     f"{'yes' if r['equal'] else 'NO'} |")
    return lines


def plot(results: dict[str, dict], exits: list[int], ks: list[int], taus: list[float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, (title, result) in zip(axes[0], results.items()):
        base = result[FULL]["tokens_per_s"]
        for e in exits:
            for tau in taus:
                ax.plot(ks, [result[(e, k, tau)].get("gain", result[(e, k, tau)]["tokens_per_s"] / base) for k in ks],
                        marker="o",
                        ls="-" if tau == taus[0] else "--",
                        label=f"E = {e}" + (f", draft confidence {tau}" if len(taus) > 1 else ""))
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set(title=title, xlabel="draft tokens per round (k)", ylabel="tokens/s vs full-depth greedy")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    ap.add_argument("--prompts", type=Path, default=None, help="text file (default: the model's heldout_sample.txt)")
    ap.add_argument("--draft-exits", default=None,
                    help="comma-separated (default: the model's exit points and its default draft exit; "
                         "then k also takes the model's default beside --draft-tokens)")
    ap.add_argument("--draft-tokens", default="2,3,4,5,6")
    ap.add_argument("--draft-confidence", default="0", help="comma-separated thresholds (0: always draft k)")
    ap.add_argument("--num-prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-server", action="store_true", help="single stream only")
    ap.add_argument("--no-pipeline", action="store_true",
                    help="single stream: sequential rounds on one core, not drafting beside the verify")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time the single stream by this process's CPU time, not wall-clock: on a shared "
                         "machine the others' load then stays out of the ratios (1 thread)")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "speculative.json")
    ap.add_argument("--plot", type=Path, default=ROOT / "bench" / "speculative.png")
    args = ap.parse_args()

    engine = LLMEngine(load_checkpoint(args.model), EngineConfig(max_num_seqs=1, num_threads=args.threads))
    if args.no_pipeline and engine.runner.native_drafts is not None:
        engine.runner.native_drafts.pipeline = False
    pipelined = engine.runner.native_drafts is not None and engine.runner.native_drafts.pipeline
    c = engine.model_config
    exits = ([int(x) for x in args.draft_exits.split(",")] if args.draft_exits  # exit points, and the default's
             else sorted({p for p in c.exit_points if p < c.num_hidden_layers} | {engine.speculative_rule().draft_exit_layer}))
    ks = sorted({int(x) for x in args.draft_tokens.split(",")}  # and the model's default k, unless asked
                | (set() if args.draft_exits else {engine.speculative_rule().num_draft_tokens}))
    taus = [float(x) for x in args.draft_confidence.split(",")]
    configs = [FULL] + [(e, k, tau) for e in exits for tau in taus for k in ks]
    text = args.prompts or args.model / "heldout_sample.txt"
    prompts = prompts_from(text, engine, max(args.num_prompts, args.concurrency), args.prompt_tokens)

    print(f"speculative benchmark: {args.model.name}, {args.max_tokens} tokens per request, "
          f"{args.num_prompts} prompts, {args.repeats} repeats, {args.threads} thread(s), "
          + ("pipelined" if pipelined else "sequential") + " rounds"
          + (", single stream in CPU time" if args.cpu_time else ""))
    results, lines = {}, []
    clock = time.process_time if args.cpu_time else time.perf_counter
    single, outputs = single_stream(engine, prompts[:args.num_prompts], configs, args.max_tokens, args.repeats, clock)
    results["single stream"] = single
    lines += table("single stream (in process)", single)
    print("\n".join(lines))
    if not args.skip_server:
        reference = {(FULL, i): single_stream(engine, [p], [FULL], args.max_tokens, 1)[1][FULL, 0]
                     for i, p in enumerate(prompts[:args.concurrency])}
        conc = concurrent(args, prompts[:args.concurrency], configs, reference)
        results[f"{args.concurrency} concurrent (live server)"] = conc
        more = table(f"{args.concurrency} concurrent requests (live server)", conc)
        print("\n".join(more))
        lines += more
    best = max((x for x in single if x != FULL), key=lambda x: single[x]["gain"])
    print(f"\nbest single-stream setting: E={best[0]}, k={best[1]}, draft confidence {best[2]}: "
          f"{single[best]['gain']:.2f}x full depth")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "benchmark": "speculative", "model": str(args.model), "commit": git_commit(),
        "machine": platform.platform(), "processor": platform.processor(), "threads": args.threads,
        "pipelined_rounds": pipelined,
        "max_tokens": args.max_tokens, "prompts": args.num_prompts, "repeats": args.repeats,
        "single_stream_clock": clock.__name__,
        "best": {"draft_exit_layer": best[0], "num_draft_tokens": best[1], "draft_confidence": best[2]},
        "results": {title: {("full" if k == FULL else "E{}-k{}-c{}".format(*k)): v for k, v in r.items()}
                    for title, r in results.items()}}, indent=1))
    plot(results, exits, ks, taus, args.plot)
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()
