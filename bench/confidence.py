"""Quality versus speed of the confidence exit policy, threshold by threshold.

    python bench/confidence.py --model models/default --text data/corpus/heldout.txt

For each threshold: decode tokens/s (batch 1, greedy, from held-out prompts) and its ratio to
full depth; mean exit depth of the generated tokens; and, teacher-forced on held-out text, the
agreement of the policy's token (argmax at its exit) with the full-depth argmax and the policy's
perplexity (NLL of the true next token at the exit the policy picks). The teacher-forced numbers
come from one forward per window: with an exact KV cache a token's hidden state at layer k does
not depend on where earlier tokens exited. Prints a table, writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from common import decode_seconds, git_commit  # bench/ is the script's directory, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from engine.exit_policy import ConfidenceRule  # noqa: E402
from engine.model_runner import Row  # noqa: E402
from engine.perplexity import windows  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402


def teacher_forced(engine: LLMEngine, ids: list[int], thresholds: list[float], min_exit: int, measure: str):
    """Per threshold: (agreement with full-depth argmax, policy NLL, mean exit) over ids[1:]."""
    c = engine.model_config
    L = c.num_hidden_layers
    points = [p for p in c.exit_points if p >= min_exit] + [L]
    stats = {t: {"agree": 0, "nll": 0.0, "depth": 0} for t in thresholds}
    n = 0
    for start, end, first in windows(len(ids), c.max_position_embeddings):
        row = Row(ids[start:end], 0, L, None, {k: "all" for k in points})
        logits = engine.runner.forward([row])[0].logits
        a = first - 1 - start
        targets = torch.tensor(ids[first:end])
        logp = {k: torch.log_softmax(logits[k][a:end - start - 1].double(), -1) for k in points}
        probs = {k: lp.exp() for k, lp in logp.items()}
        conf = {}
        for k in points[:-1]:
            top2 = torch.topk(probs[k], 2, dim=-1).values
            conf[k] = top2[:, 0] if measure == "probability" else top2[:, 0] - top2[:, 1]
        full_argmax = logp[L].argmax(-1)
        for t in thresholds:
            chosen = torch.full_like(targets, L)
            for k in reversed(points[:-1]):  # the first confident exit point wins
                chosen = torch.where(conf[k] >= t, torch.full_like(chosen, k), chosen)
            for k in points:
                sel = chosen == k
                stats[t]["agree"] += int((logp[k][sel].argmax(-1) == full_argmax[sel]).sum())
                stats[t]["nll"] += float(-logp[k][sel].gather(1, targets[sel][:, None]).sum())
                stats[t]["depth"] += int(k * sel.sum())
        n += len(targets)
    return {t: (s["agree"] / n, s["nll"] / n, s["depth"] / n) for t, s in stats.items()}, n


def decode(engine: LLMEngine, prompts: list[list[int]], new_tokens: int, confidence: ConfidenceRule | None):
    """(tokens/s over decode steps, mean exit depth) for the prompts run one at a time."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    seconds, tokens, exits = 0.0, 0, []
    for p in prompts:
        seq = engine.add_request(p, params, confidence=confidence)
        seconds += decode_seconds(engine, seq)
        tokens += len(seq.output_ids) - 1
        exits += seq.exit_layers
    return tokens / seconds, statistics.mean(exits)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    ap.add_argument("--text", type=Path, default=ROOT / "data" / "corpus" / "heldout.txt")
    ap.add_argument("--thresholds", default="0.5,0.6,0.7,0.8,0.9,0.95,0.99")
    ap.add_argument("--min-exit-layer", type=int, default=1)
    ap.add_argument("--measure", default="probability", choices=["probability", "margin"])
    ap.add_argument("--eval-tokens", type=int, default=20000, help="held-out tokens scored teacher-forced")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "confidence")
    args = ap.parse_args()

    ckpt = load_checkpoint(args.model)
    engine = LLMEngine(ckpt, EngineConfig(max_num_seqs=1, num_threads=args.threads))
    L = engine.model_config.num_hidden_layers
    thresholds = [float(t) for t in args.thresholds.split(",")]
    ids = engine.encode(args.text.read_text())[:args.eval_tokens + 1]
    quality, scored = teacher_forced(engine, ids, thresholds, args.min_exit_layer, args.measure)
    full_nll = teacher_forced(engine, ids, [2.0], args.min_exit_layer, args.measure)[0][2.0][1]

    paragraphs = [p for p in args.text.read_text().split("\n") if len(p) > 200]
    step = max(1, len(paragraphs) // args.prompts)
    room = engine.model_config.max_position_embeddings - args.new_tokens - 1
    prompts = [engine.encode(p)[:min(64, room)] for p in paragraphs[::step][:args.prompts]]
    decode(engine, prompts[:1], 8, None)  # warm-up
    full_rate, _ = decode(engine, prompts, args.new_tokens, None)
    rows = []
    for t in thresholds:
        rule = engine.confidence_rule(t, args.min_exit_layer, args.measure)
        rate, depth = decode(engine, prompts, args.new_tokens, rule)
        agree, nll, tf_depth = quality[t]
        rows.append({"threshold": t, "tokens_per_s": rate, "speedup": rate / full_rate,
                     "mean_exit_decode": depth, "mean_exit_teacher_forced": tf_depth,
                     "agreement": agree, "perplexity": math.exp(nll)})
    full_rate_again, _ = decode(engine, prompts, args.new_tokens, None)  # drift check

    print(f"\nconfidence policy on {args.model.name} ({L} layers), {args.measure}, min exit {args.min_exit_layer}; "
          f"teacher-forced on {scored} held-out tokens; decode: {len(prompts)} prompts x {args.new_tokens} tokens")
    print(f"full depth: {full_rate:.1f} tok/s (again at the end: {full_rate_again:.1f}), "
          f"perplexity {math.exp(full_nll):.2f}")
    print(f"{'threshold':>9} {'tok/s':>8} {'speedup':>8} {'exit(dec)':>9} {'exit(tf)':>9} {'agree':>7} {'ppl':>8}")
    for r in rows:
        print(f"{r['threshold']:>9.2f} {r['tokens_per_s']:>8.1f} {r['speedup']:>7.2f}x {r['mean_exit_decode']:>9.2f} "
              f"{r['mean_exit_teacher_forced']:>9.2f} {100 * r['agreement']:>6.1f}% {r['perplexity']:>8.2f}")
    args.out.mkdir(parents=True, exist_ok=True)
    commit = git_commit()
    (args.out / "confidence.json").write_text(json.dumps({
        "benchmark": "confidence", "model": str(args.model), "measure": args.measure,
        "min_exit_layer": args.min_exit_layer, "scored_tokens": scored, "full_depth_tokens_per_s": full_rate,
        "full_depth_tokens_per_s_end": full_rate_again, "full_depth_perplexity": math.exp(full_nll),
        "rows": rows, "commit": commit, "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    plot(rows, math.exp(full_nll), args.out / "confidence.png", args.model.name)
    print(f"wrote {args.out}/confidence.json and confidence.png")


def plot(rows: list[dict], full_ppl: float, path: Path, name: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["speedup"] for r in rows]
    a.plot(x, [100 * r["agreement"] for r in rows], "o-")
    b.plot(x, [r["perplexity"] for r in rows], "o-", color="C1")
    b.axhline(full_ppl, ls="--", color="gray", label="full depth")
    for r in rows:
        a.annotate(f"{r['threshold']:g}", (r["speedup"], 100 * r["agreement"]), fontsize=8,
                   textcoords="offset points", xytext=(4, 4))
        b.annotate(f"{r['threshold']:g}", (r["speedup"], r["perplexity"]), fontsize=8,
                   textcoords="offset points", xytext=(4, 4))
    a.set(xlabel="decode speed vs full depth (x)", ylabel="agreement with full-depth argmax (%)",
          title=f"{name}: quality vs speed")
    b.set(xlabel="decode speed vs full depth (x)", ylabel="held-out perplexity", title="policy perplexity")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
