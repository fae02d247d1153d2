"""Batch-1 (or batch-B) greedy decode tokens/s at several exit layers.

    python bench/decode.py --preset paper-1b --exit-layers 6,12,18,24
    python bench/decode.py --model DIR --batch 8 --json out.json

Decode time is measured from the first generated token to the last (prefill excluded); each
exit layer is timed `--repeats` times, interleaved, and the median is reported. Prints a table
and writes JSON (default bench/out/decode-<name>.json).
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import git_commit, write_json  # bench/ is the script's directory, first on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.config import preset  # noqa: E402
from models.random_checkpoint import write_random_checkpoint  # noqa: E402


def decode_rate(engine: LLMEngine, prompt: list[int], batch: int, new_tokens: int, exit_layer: int) -> float:
    """Generated tokens per second over the decode steps of one batch."""
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    seqs = [engine.add_request(prompt, params, exit_layer) for _ in range(batch)]
    while any(s.first_token_time is None for s in seqs) and engine.has_unfinished():
        engine.step()
    if failed := [s.finish_reason for s in seqs if s.finish_reason not in (None, "length", "stop")]:
        raise SystemExit(f"decode failed: {failed[0]}")
    t0, done0 = time.perf_counter(), sum(len(s.output_ids) for s in seqs)
    while engine.has_unfinished():
        engine.step()
    dt = time.perf_counter() - t0
    return (sum(len(s.output_ids) for s in seqs) - done0) / dt



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="checkpoint directory")
    src.add_argument("--preset", help="random-weight checkpoint of this preset (written to a temp dir)")
    ap.add_argument("--variant", default="v1")
    ap.add_argument("--exit-layers", default=None, help="comma-separated (default: the exit points and L)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--enforce-eager", action="store_true", help="GPU: no CUDA graphs")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.preset:
            ckpt = write_random_checkpoint(Path(tmp) / args.preset, preset(args.preset, args.variant))
            name = f"{args.preset}-{args.variant}"
        else:
            ckpt = load_checkpoint(args.model)
            name = args.model.name
        engine = LLMEngine(ckpt, EngineConfig(max_num_seqs=args.batch, num_threads=args.threads,
                                              device=args.device, backend=args.backend,
                                              enforce_eager=args.enforce_eager))
        load_s = time.perf_counter() - t0
    del ckpt
    c = engine.model_config
    L = c.num_hidden_layers
    layers = ([int(x) for x in args.exit_layers.split(",")] if args.exit_layers
              else sorted(set(c.exit_points) | {L}))
    prompt = torch.randint(0, min(c.vocab_size, 256), (args.prompt_tokens,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    decode_rate(engine, prompt, args.batch, 4, L)  # warm-up
    rates: dict[int, list[float]] = {k: [] for k in layers}
    for _ in range(args.repeats):
        for k in layers:
            rates[k].append(decode_rate(engine, prompt, args.batch, args.new_tokens, k))
    median = {k: statistics.median(v) for k, v in rates.items()}
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print(f"\n{name}: batch {args.batch}, prompt {args.prompt_tokens}, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'exit layer':>10}  {'tokens/s':>10}  {'ms/token':>9}  {'vs exit ' + str(L):>10}")
    for k in layers:
        print(f"{k:>10}  {median[k]:>10.2f}  {1000 * args.batch / median[k]:>9.2f}  "
              f"{median[k] / median[L]:>9.3f}x")
    print(f"peak RSS {peak_mb:.0f} MiB, load {load_s:.1f}s")

    result = {
        "benchmark": "decode", "model": name, "batch": args.batch, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "tokens_per_s": {str(k): median[k] for k in layers},
        "all_runs": {str(k): v for k, v in rates.items()},
        "speedup_vs_full": {str(k): median[k] / median[L] for k in layers},
        "device": engine.backend.describe(), "enforce_eager": args.enforce_eager,
        "peak_rss_mib": peak_mb, "load_s": load_s, "commit": git_commit(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }
    write_json(result, args.json or Path(__file__).parent / "out" / f"decode-{name}-b{args.batch}.json")


if __name__ == "__main__":
    main()
