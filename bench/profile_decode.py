"""Where a decode step's time goes: blocks (split, on the native path, into the ternary products,
attention, the rest of the block's C code: norms, quantizers, elementwise, and the Python call
around it), the shared head, and the rest of the step (scheduler, sampler, Python), per step and
per block, with the native blocks and with the general path.

    python bench/profile_decode.py --model models/default --threads 2
    python bench/profile_decode.py --preset paper-1b --threads 2 --batches 1
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `bitskip serve` runs (server/cli.py)

from common import git_commit, write_json  # noqa: E402

from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from engine.kernels import native  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def profile(engine: LLMEngine, batch: int, exit_layer: int, new_tokens: int,
            clock=time.perf_counter) -> dict[str, float]:
    runner, spent = engine.runner, {"block": 0.0, "head": 0.0}
    lib, timers = native.library(), (ctypes.c_double * 3)()

    def timed(name, fn):
        def call(*args):
            t = clock()
            out = fn(*args)
            spent[name] += clock() - t
            return out
        return call

    blocks = runner.native_blocks
    runner._block, runner.head = timed("block", runner._block), timed("head", runner.head)
    runner.greedy_head = timed("head", runner.greedy_head)
    if blocks is not None:
        runner.native_blocks = timed("block", blocks)
    seqs = [engine.add_request(list(range(32)), SamplingParams(max_tokens=new_tokens, ignore_eos=True),
                               exit_layer) for _ in range(batch)]
    while any(s.first_token_time is None for s in seqs):
        engine.step()
    spent.update(block=0.0, head=0.0)
    if lib is not None:
        lib.bitskip_decode_profile(1, None)
    t0, done0 = clock(), sum(len(s.output_ids) for s in seqs)
    while engine.has_unfinished():
        engine.step()
    total = clock() - t0
    if lib is not None:
        lib.bitskip_decode_profile(0, timers)
    del runner._block, runner.head, runner.greedy_head  # back to the methods
    runner.native_blocks = blocks
    steps = (sum(len(s.output_ids) for s in seqs) - done0) / batch
    per_block = 1e3 / steps / exit_layer
    out = {"step_ms": 1e3 * total / steps, "block_ms": spent["block"] * per_block,
           "head_ms": 1e3 * spent["head"] / steps,
           "rest_ms": 1e3 * (total - spent["block"] - spent["head"]) / steps}
    if blocks is not None and timers[2] > 0:  # inside the native blocks
        out.update(kernel_ms=timers[0] * per_block, attention_ms=timers[1] * per_block,
                   other_c_ms=(timers[2] - timers[0] - timers[1]) * per_block,
                   call_ms=(spent["block"] - timers[2]) * per_block)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path)
    src.add_argument("--preset", help="random packed checkpoint of this preset (temp dir)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--general", action="store_true", help="also the general (torch) path")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by the main thread's CPU time (time.thread_time), not the wall clock: the "
                         "single-threaded parts (the Python, a small head) stay out of a busy machine's noise; "
                         "multi-threaded parts (blocks, a large head) count the main thread's share only")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "profile_decode.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if args.preset:
            from models.config import preset
            from models.random_checkpoint import write_random_checkpoint
            path = Path(tmp) / args.preset
            write_random_checkpoint(path, preset(args.preset, "v1"))
        batches = [int(b) for b in args.batches.split(",")]
        engine = LLMEngine(load_checkpoint(path), EngineConfig(max_num_seqs=max(batches), num_threads=args.threads))
        results = run(engine, batches, args)
    write_json({"benchmark": "profile_decode", "model": str(args.model or args.preset), "threads": args.threads,
                "clock": "main-thread CPU" if args.cpu_time else "wall",
                "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M"), "results": results}, args.json)


def run(engine: LLMEngine, batches: list[int], args) -> list[dict]:
    L = engine.model_config.num_hidden_layers
    native_blocks, results = engine.runner.native_blocks, []
    print(f"exit {L}, {args.threads} threads{', main-thread CPU time' if args.cpu_time else ''}; ms per step, per block (native: ternary kernel, attention, "
          "other C: norms/quantizers/elementwise, the call from Python), head, rest of the step")
    cols = ("step_ms", "block_ms", "kernel_ms", "attention_ms", "other_c_ms", "call_ms", "head_ms", "rest_ms")
    print(f"{'path':>8} {'batch':>5} {'tok/s':>7} " + " ".join(f"{c[:-3]:>9}" for c in cols))
    for b in batches:
        profile(engine, b, L, 4)  # warm-up
        for name, blocks in (("native", native_blocks), ("general", None))[:2 if args.general else 1]:
            engine.runner.native_blocks = blocks
            p = profile(engine, b, L, args.new_tokens, time.thread_time if args.cpu_time else time.perf_counter)
            results.append({"path": name, "batch": b, "tokens_per_s": 1e3 * b / p["step_ms"], **p})
            print(f"{name:>8} {b:>5} {1e3 * b / p['step_ms']:>7.1f} "
                  + " ".join(f"{p[c]:>9.3f}" if c in p else f"{'':>9}" for c in cols))
        engine.runner.native_blocks = native_blocks
    return results


if __name__ == "__main__":
    main()
