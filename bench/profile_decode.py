"""Where a decode step's time goes: blocks, the shared head, and the rest (scheduler, sampler,
Python), per step and per block, with the native decode block and with the general path.

    python bench/profile_decode.py --model models/default --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402


def profile(engine: LLMEngine, batch: int, exit_layer: int, new_tokens: int) -> dict[str, float]:
    runner, spent = engine.runner, {"block": 0.0, "head": 0.0}

    def timed(name, fn):
        def call(*args):
            t = time.perf_counter()
            out = fn(*args)
            spent[name] += time.perf_counter() - t
            return out
        return call

    runner._block, runner.head = timed("block", runner._block), timed("head", runner.head)
    seqs = [engine.add_request(list(range(32)), SamplingParams(max_tokens=new_tokens, ignore_eos=True),
                               exit_layer) for _ in range(batch)]
    while any(s.first_token_time is None for s in seqs):
        engine.step()
    spent.update(block=0.0, head=0.0)
    t0, done0 = time.perf_counter(), sum(len(s.output_ids) for s in seqs)
    while engine.has_unfinished():
        engine.step()
    total = time.perf_counter() - t0
    del runner._block, runner.head  # back to the methods
    steps = (sum(len(s.output_ids) for s in seqs) - done0) / batch
    ms = {k: 1e3 * v / steps for k, v in spent.items()}
    return {"step_ms": 1e3 * total / steps, "block_ms": ms["block"] / exit_layer, "head_ms": ms["head"],
            "rest_ms": 1e3 * total / steps - ms["block"] - ms["head"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()
    engine = LLMEngine(load_checkpoint(args.model), EngineConfig(max_num_seqs=8, num_threads=args.threads))
    L = engine.model_config.num_hidden_layers
    native = engine.runner.native_blocks
    print(f"{args.model.name}: exit {L}, {args.threads} threads (ms)")
    print(f"{'path':>8} {'batch':>5} {'step':>8} {'per block':>9} {'head':>7} {'rest':>7}")
    for b in map(int, args.batches.split(",")):
        profile(engine, b, L, 4)  # warm-up
        for name, blocks in (("native", native), ("general", None)):
            engine.runner.native_blocks = blocks
            p = profile(engine, b, L, args.new_tokens)
            print(f"{name:>8} {b:>5} {p['step_ms']:>8.2f} {p['block_ms']:>9.3f} {p['head_ms']:>7.2f} {p['rest_ms']:>7.2f}")
        engine.runner.native_blocks = native


if __name__ == "__main__":
    main()
