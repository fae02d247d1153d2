"""The greedy head alone: the screened head (engine/kernels/native/head_screen.c) against the exact
float32 head, on the activations of real decode steps of a checkpoint (the final RMSNorm's output
at the given exit), calls alternated; ms per call (median and min), exact rows per call, and the
check that both give the same argmax.

    python bench/screened_head.py --model /tmp/cpu2/p1b --threads 2
    python bench/screened_head.py --model /tmp/cpu2/p1b --old-lib <a .so of another commit>

--old-lib adds a third column: the screened head of a library built from the one-level int8 code
(before 5d40cdd), built and called through its own entry points.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `bitskip serve` runs (server/cli.py)

import torch  # noqa: E402

from common import git_commit, write_json  # noqa: E402

from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from engine.kernels import native  # noqa: E402
from engine.kernels.native.screened_head import ScreenedHead  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.functional import rms_norm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def activations(engine: LLMEngine, exit_layer: int, steps: int) -> torch.Tensor:
    """The head's inputs of `steps` greedy decode steps (one sequence, prompt 0..31)."""
    backend, got = engine.runner.backend, []
    head = backend.head

    def spy(h, norm, lm_head, eps, argmax_only=False):
        got.append(rms_norm(h, norm, eps))
        return head(h, norm, lm_head, eps, argmax_only)

    backend.head = spy
    seq = engine.add_request(list(range(32)), SamplingParams(max_tokens=steps + 1, ignore_eos=True), exit_layer)
    while not seq.finished:
        engine.step()
    backend.head = head
    return torch.cat(got[1:])  # past the prefill's


def old_screen(path: str, w: torch.Tensor, threads: int):
    """The one-level int8 screen of another build, through its own entry points."""
    lib, p, i64 = ctypes.CDLL(path), ctypes.c_void_p, ctypes.c_int64
    lib.bitskip_head_screen_build.argtypes = [p, i64, i64, p, p, p, p, ctypes.c_int]
    lib.bitskip_head_screened.argtypes = [p, i64, i64, p, p, p, p, ctypes.c_double, i64, p, ctypes.c_int]
    lib.bitskip_head_screened.restype = i64
    v, k = w.shape
    q, scale, bounds = torch.empty(v, k, dtype=torch.int8), torch.empty(v), torch.empty(v, 2, dtype=torch.float64)
    top = ctypes.c_double(0)
    lib.bitskip_head_screen_build(w.data_ptr(), v, k, q.data_ptr(), scale.data_ptr(), bounds.data_ptr(),
                                  ctypes.byref(top), threads)

    def call(x):
        out = torch.empty(x.shape[0], v)
        lib.bitskip_head_screened(x.data_ptr(), x.shape[0], k, w.data_ptr(), q.data_ptr(), scale.data_ptr(),
                                  bounds.data_ptr(), top.value, v, out.data_ptr(), threads)
        return out
    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--exit-layers", default="18,24")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--old-lib", help="a library .so with the one-level int8 screen, for an A/B")
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "screened_head.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = native.library()
    if lib is None:
        sys.exit("the native kernels are not available (no C compiler?)")
    engine = LLMEngine(load_checkpoint(args.model), EngineConfig(max_num_seqs=1))
    x = torch.cat([activations(engine, int(e), args.steps) for e in args.exit_layers.split(",")])
    w = engine.runner.weights.lm_head.contiguous()
    screen = ScreenedHead(lib, w)
    systems = {"screened": screen, "exact": lambda x: native.head_matmul(lib, x, w)}
    if args.old_lib:
        systems["screened-old"] = old_screen(args.old_lib, w, args.threads)
    rows = []
    print(f"head {list(w.shape)}, {args.threads} threads, {x.shape[0]} activations; ms per call")
    print(f"{'batch':>5} " + " ".join(f"{name:>22}" for name in systems) + "   exact rows/row")
    for batch in map(int, args.batches.split(",")):
        times = {name: [] for name in systems}
        computed = screen.computed
        for rep in range(args.repeats):
            for i in range(0, x.shape[0] - batch + 1, batch):
                xb, argmax = x[i:i + batch].contiguous(), None
                order = list(systems.items())
                for name, f in order if (rep + i) % 2 == 0 else order[::-1]:
                    t = time.perf_counter()
                    out = f(xb)
                    times[name].append(time.perf_counter() - t)
                    argmax = out.argmax(1) if argmax is None else argmax
                    assert torch.equal(out.argmax(1), argmax), name
        calls = len(times["screened"])
        row = {"batch": batch, "exact_rows_per_row": (screen.computed - computed) / (calls * batch)}
        for name, ts in times.items():
            row[name] = {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3}
        rows.append(row)
        print(f"{batch:>5} " + " ".join(f"{row[n]['median_ms']:>10.2f} (min {row[n]['min_ms']:>6.2f})" for n in systems)
              + f"   {row['exact_rows_per_row']:.0f}")
    write_json({"bench": "screened_head", "commit": git_commit(), "model": str(args.model),
                "threads": args.threads, "shape": list(w.shape), "rows": rows,
                "load_average": os.getloadavg()}, args.json)


if __name__ == "__main__":
    main()
