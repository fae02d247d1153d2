"""What extra rows cost the native decoder blocks: one call through every block for 1 row, for k
rows of one sequence at consecutive positions (a speculative verify), and for k sequences of one
cached token each (a batch), ms per block split into the ternary products, attention and the
rest of the C code. Calls are captured from the runner's own forward passes and replayed; with
--lib, another build of the kernels runs the same calls in the same process, alternated (A/B).

    python bench/block_rows.py --model models/default --threads 2 --rows 1,4,8
    python bench/block_rows.py --model /tmp/cpu2/p1b --threads 2 --rows 1,8 --lib /tmp/old.so
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import git_commit, write_json  # noqa: E402

from engine.kernels.native.block import DecodeBlocks  # noqa: E402
from engine.kv_cache import KVCache, SequenceKV  # noqa: E402
from engine.model_runner import ModelRunner, Row  # noqa: E402
from engine.weights import ModelWeights  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def bind_blocks(path: Path) -> ctypes.CDLL:
    """Another build (older ones lack newer entry points): only what the blocks' call needs."""
    lib, p, i64 = ctypes.CDLL(str(path)), ctypes.c_void_p, ctypes.c_int64
    lib.bitskip_decode_blocks.argtypes = [p, i64, p, i64, p, p, i64, i64, p, p, p, p, ctypes.c_int]
    lib.bitskip_decode_blocks.restype = ctypes.c_int
    lib.bitskip_decode_profile.argtypes = [ctypes.c_int, p]
    return lib


def capture(runner: ModelRunner, shape: str, rows: int, prompt: int) -> tuple:
    """The native call of a forward pass: `rows` sequences of one token each ("batch") or one
    sequence's `rows` consecutive tokens ("verify"), after prompts of `prompt` tokens."""
    c, L, seen = runner.config, runner.config.num_hidden_layers, []
    blocks = runner.native_blocks

    def spy(first, last, h, positions, tables, *rest):
        seen.append((first, last, h.clone(), positions.clone(), tables.clone(), *rest))
        return blocks(first, last, h, positions, tables, *rest)

    seqs = 1 if shape == "verify" else rows
    kvs = [SequenceKV() for _ in range(seqs)]
    assert all(runner.kv_cache.reserve(kv, L, prompt + rows) for kv in kvs)
    gen = torch.Generator().manual_seed(0)
    runner.forward([Row(torch.randint(0, c.vocab_size, (prompt,), generator=gen).tolist(), 0, L, kv)
                    for kv in kvs])
    runner.native_blocks = spy
    tokens = rows if shape == "verify" else 1
    runner.forward([Row(list(range(1, tokens + 1)), prompt, L, kv) for kv in kvs])
    runner.native_blocks = blocks
    return seen[-1]


def replay(blocks: DecodeBlocks, call: tuple, repeats: int) -> dict[str, float]:
    """ms per block of the call, median over `repeats`, and the profile's split (summed)."""
    first, last, h, positions, tables, *rest = call
    lib, timers, times = blocks.lib, (ctypes.c_double * 3)(), []
    lib.bitskip_decode_profile(1, None)
    for _ in range(repeats):
        x = h.clone()
        t = time.perf_counter()
        blocks(first, last, x, positions, tables, *rest)
        times.append(time.perf_counter() - t)
    lib.bitskip_decode_profile(0, timers)
    per = 1e3 / (last - first + 1)
    return {"block_ms": statistics.median(times) * per, "best_ms": min(times) * per, "kernel_ms": timers[0] * per / repeats,
            "attention_ms": timers[1] * per / repeats,
            "other_c_ms": (timers[2] - timers[0] - timers[1]) * per / repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,4,8")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the builds")
    ap.add_argument("--lib", type=Path, action="append", default=[], help="another build to compare")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "block_rows.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ckpt = load_checkpoint(args.model)
    c = ckpt.config
    rows = [int(r) for r in args.rows.split(",")]
    per_seq = c.num_hidden_layers * -(-(args.prompt + max(rows)) // 16)
    runner = ModelRunner(ModelWeights.from_checkpoint(ckpt), KVCache(
        per_seq * (2 + 2 * sum(rows)), 16, c.num_key_value_heads, c.head_dim))
    builds = {"this": runner.native_blocks}
    for path in args.lib:
        builds[path.name] = DecodeBlocks(bind_blocks(path), c, runner.weights.layers)
    calls = {(shape, r): capture(runner, shape, r, args.prompt)
             for r in rows for shape in (("verify", "batch") if r > 1 else ("one",))}
    print(f"{args.model}, {args.threads} threads, prompt {args.prompt}: ms per block "
          "(median call / profile split)")
    print(f"{'build':>14} {'shape':>7} {'rows':>4} {'block':>7} {'best':>7} {'kernel':>7} {'attn':>7} {'otherC':>7} "
          f"{'x1row':>6} {'best x1':>7}")
    results = []
    for rnd in range(args.rounds):
        for name, blocks in builds.items():
            one = None
            for (shape, r), call in calls.items():
                p = replay(blocks, call, args.repeats)
                one = p if shape == "one" else one
                results.append({"round": rnd, "build": name, "shape": shape, "rows": r, **p})
                print(f"{name:>14} {shape:>7} {r:>4} {p['block_ms']:>7.3f} {p['best_ms']:>7.3f} {p['kernel_ms']:>7.3f} "
                      f"{p['attention_ms']:>7.3f} {p['other_c_ms']:>7.3f} {p['block_ms'] / one['block_ms']:>6.2f} "
                      f"{p['best_ms'] / one['best_ms']:>7.2f}")
    write_json({"benchmark": "block_rows", "model": str(args.model), "threads": args.threads,
                "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M"), "results": results}, args.json)


if __name__ == "__main__":
    main()
