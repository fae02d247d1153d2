"""Our CPU engine against Hugging Face transformers on the same model dimensions.

    python bench/peer_cpu.py                      # default model and paper-1b, batch 1 and 8
    python bench/peer_cpu.py --models default --batches 1 --repeats 3

Peers: `LlamaForCausalLM` with the same dimensions and random weights (float32 and bfloat16),
greedy `generate`; "exit k" is the model cut to its first k layers. Ours: the engine on the model's
checkpoint (the bundled default model; a random packed checkpoint of the `paper-1b` preset).
Every system runs in its own process, one after another, `--repeats` rounds; within a process the
(batch, exit) cells are interleaved. Decode tokens/s count from the first generated token to the
last (prefill excluded), the median over rounds is reported with each process's peak RSS. Prints
a table of ratios and writes JSON (default bench/out/peer_cpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import git_commit  # bench/ is the script's directory, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYSTEMS = ("bitskip", "hf-fp32", "hf-bf16")


def measure_bitskip(model: Path, cells: list[tuple[int, int]], args) -> dict[str, float]:
    import torch
    from decode import decode_rate
    from engine import EngineConfig, LLMEngine
    from models.checkpoint import load_checkpoint

    engine = LLMEngine(load_checkpoint(model), EngineConfig(max_num_seqs=max(b for b, _ in cells),
                                                             num_threads=args.threads))
    prompt = torch.randint(0, 256, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    decode_rate(engine, prompt, 1, 4, cells[0][1])  # warm-up
    return {f"{b}/{k}": decode_rate(engine, prompt, b, args.new_tokens, k) for b, k in cells}


def measure_hf(model: Path, dtype_name: str, cells: list[tuple[int, int]], args) -> dict[str, float]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(args.threads)
    c = json.loads((model / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"], max_position_embeddings=c["max_position_embeddings"],
        rope_theta=c["rope_theta"], rms_norm_eps=c["rms_norm_eps"],
        tie_word_embeddings=c["tie_word_embeddings"])
    dtype = {"hf-fp32": torch.float32, "hf-bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    net = LlamaForCausalLM(config).to(dtype).eval()
    layers = net.model.layers

    class Stamps(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def rate(batch: int, exit_layer: int, new_tokens: int) -> float:
        net.model.layers = layers[:exit_layer]
        net.config.num_hidden_layers = exit_layer
        ids = torch.randint(0, 256, (batch, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        stamps = Stamps()
        with torch.inference_mode():
            net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                         logits_processor=LogitsProcessorList([stamps]))
        return batch * (len(stamps.times) - 1) / (stamps.times[-1] - stamps.times[0])

    rate(1, cells[0][1], 4)  # warm-up
    return {f"{b}/{k}": rate(b, k, args.new_tokens) for b, k in cells}


def worker(args) -> None:
    cells = [(b, k) for b in args.batches for k in args.exit_layers]
    if args.worker == "bitskip":
        rates = measure_bitskip(args.model, cells, args)
    else:
        rates = measure_hf(args.model, args.worker, cells, args)
    print(json.dumps({"rates": rates, "peak_rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: on Linux ru_maxrss survives
    exec, so a worker started by a parent holding a freshly written 1B checkpoint would report
    the parent's size."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_dir(name: str, tmp: Path) -> Path:
    if name == "default":
        return ROOT / "models" / "default"
    from models.config import preset
    from models.random_checkpoint import write_random_checkpoint
    write_random_checkpoint(tmp / name, preset(name, "v1"))
    return tmp / name


def run_worker(system: str, model: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", system, "--model", str(model),
           "--batches", ",".join(map(str, args.batches)), "--exit-layers", ",".join(map(str, args.exit_layers)),
           "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens),
           "--new-tokens", str(args.new_tokens)]
    # Every system under the OpenMP wait policy `bitskip serve` sets (server/cli.py).
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    ap.add_argument("--models", default="default,paper-1b")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--batches", type=ints, default=[1, 8])
    ap.add_argument("--exit-layers", type=ints, default=[18, 24])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "peer_cpu.json")
    ap.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    systems = args.systems.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = model_dir(name, Path(tmp))
            runs = {s: [] for s in systems}
            for _ in range(args.repeats):
                for s in systems:  # alternated: a noisy minute hits every system alike
                    runs[s].append(run_worker(s, model, args))
                    print(f"{name} {s}: {json.dumps(runs[s][-1])} (load average {os.getloadavg()[0]:.1f})",
                          file=sys.stderr, flush=True)
            results[name] = {s: {"tokens_per_s": {cell: statistics.median(r["rates"][cell] for r in rs)
                                                  for cell in rs[0]["rates"]},
                                 "all_runs": [r["rates"] for r in rs],
                                 "peak_rss_mib": max(r["peak_rss_mib"] for r in rs)}
                             for s, rs in runs.items()}
    print_table(results, systems, args)
    out = {"benchmark": "peer_cpu", "results": results, "threads": args.threads, "load_average": os.getloadavg(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
           "commit": git_commit(), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "date": time.strftime("%Y-%m-%d")}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


def print_table(results: dict, systems: list[str], args) -> None:
    peers = [s for s in systems if s != "bitskip"]
    print(f"\ndecode tokens/s, {args.threads} threads, median of {args.repeats} alternated rounds")
    head = f"{'model':>9} {'batch':>5} {'exit':>4} " + " ".join(f"{s:>9}" for s in systems)
    if "bitskip" in systems:
        head += " " + " ".join(f"{'vs ' + p[3:]:>8}" for p in peers)
    print(head)
    for name, res in results.items():
        for b in args.batches:
            for k in args.exit_layers:
                cell = f"{b}/{k}"
                line = f"{name:>9} {b:>5} {k:>4} " + " ".join(
                    f"{res[s]['tokens_per_s'][cell]:>9.2f}" for s in systems)
                if "bitskip" in systems:
                    ours = res["bitskip"]["tokens_per_s"][cell]
                    line += " " + " ".join(f"{ours / res[p]['tokens_per_s'][cell]:>7.2f}x" for p in peers)
                print(line)
        if "bitskip" in systems and {18, 24} <= set(args.exit_layers):
            for b in args.batches:
                t = res["bitskip"]["tokens_per_s"]
                print(f"{name:>9} batch {b}: ours exit 18 / exit 24 = {t[f'{b}/18'] / t[f'{b}/24']:.2f}x")
        print(f"{name:>9} peak RSS MiB: " + ", ".join(f"{s} {res[s]['peak_rss_mib']:.0f}" for s in systems))


if __name__ == "__main__":
    main()
