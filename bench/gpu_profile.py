"""Where a GPU decode step's time goes: wall time per step against the GPU kernels' own time
(torch.profiler, CUDA activity), kernels per step, and the kernels that take the most.

    python bench/gpu_profile.py --model CKPT --batch 1 --exit-layer 24 --json out.json

Run each configuration in its own process (environment variables such as BITSKIP_DECODE_KERNEL
are read at import); bench/gpu_check.sh runs the variants it compares.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402

CUDA = torch.cuda.is_available()
sync = torch.cuda.synchronize if CUDA else (lambda: None)  # the CPU run (interpreter) checks the script


def decode_steps(engine: LLMEngine, batch: int, exit_layer: int, steps: int, prof=None) -> tuple[float, int]:
    """Runs `steps` pure decode steps of `batch` rows; returns (seconds, tokens)."""
    params = SamplingParams(max_tokens=steps + 1, ignore_eos=True)
    seqs = [engine.add_request(list(range(1, 33)), params, exit_layer) for _ in range(batch)]
    while any(s.first_token_time is None for s in seqs):
        engine.step()
    sync()
    done0 = sum(len(s.output_ids) for s in seqs)
    t0 = time.perf_counter()
    if prof is not None:
        prof.start()
    while engine.has_unfinished():
        engine.step()
    sync()
    if prof is not None:
        prof.stop()
    return time.perf_counter() - t0, sum(len(s.output_ids) for s in seqs) - done0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--exit-layer", type=int, default=None)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--label", default="default")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    engine = LLMEngine(load_checkpoint(args.model), EngineConfig(
        device="cuda" if CUDA else "cpu", backend="triton", max_num_seqs=max(args.batch, 1), enforce_eager=args.enforce_eager))
    exit_layer = args.exit_layer or engine.model_config.num_hidden_layers
    decode_steps(engine, args.batch, exit_layer, 16)                 # compile, autotune, capture
    plain_s, plain_tokens = decode_steps(engine, args.batch, exit_layer, args.steps)
    prof = profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * CUDA)
    decode_steps(engine, args.batch, exit_layer, args.steps, prof)
    steps = plain_tokens / args.batch

    gpu_us, count = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            gpu_us[e.name] += e.device_time
            count[e.name] += 1
    total_gpu_ms = sum(gpu_us.values()) / 1e3 / steps
    wall_ms = 1e3 * plain_s / steps
    top = sorted(gpu_us.items(), key=lambda kv: -kv[1])[:12]
    print(f"\n[{args.label}] batch {args.batch}, exit {exit_layer}, eager={args.enforce_eager}, "
          f"BITSKIP_DECODE_KERNEL={os.environ.get('BITSKIP_DECODE_KERNEL', '(default)')}")
    print(f"wall {wall_ms:.3f} ms/step ({args.batch * 1e3 / wall_ms:.1f} tok/s), GPU kernels "
          f"{total_gpu_ms:.3f} ms/step ({100 * total_gpu_ms / wall_ms:.0f}% busy), "
          f"{sum(count.values()) / steps:.0f} kernels/step")
    for name, us in top:
        print(f"  {us / 1e3 / steps:8.3f} ms/step  {count[name] / steps:6.1f}/step  {name[:90]}")
    if args.json:
        args.json.write_text(json.dumps({
            "label": args.label, "batch": args.batch, "exit_layer": exit_layer, "eager": args.enforce_eager,
            "decode_kernel": os.environ.get("BITSKIP_DECODE_KERNEL", "default"),
            "wall_ms_per_step": wall_ms, "gpu_ms_per_step": total_gpu_ms,
            "kernels_per_step": sum(count.values()) / steps, "device": torch.cuda.get_device_name() if CUDA else "cpu",
            "top": [{"name": n, "ms_per_step": us / 1e3 / steps, "per_step": count[n] / steps} for n, us in top],
        }, indent=2))


if __name__ == "__main__":
    main()
