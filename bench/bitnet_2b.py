"""Scale check at BitNet b1.58 2B-4T dimensions: our engine beside transformers' own BitNet forward.

    flock /tmp/bench.lock python bench/bitnet_2b.py [--dir /tmp/bitskip-bitnet-2b] [--new-tokens 16]

Writes `bitskip init --preset bitnet-2b` (random weights) and the same weights as a Hugging Face
BitNet directory (bitlinear, packed with transformers' own pack_weights, float32 floats). Then,
each in its own process, one after the other: our engine on the native checkpoint, our engine on
the Hugging Face directory (converted at load), and transformers' BitNetForCausalLM (float32,
its CPU path) on the Hugging Face directory. Each reports load time, batch-1 greedy decode
tokens/s at full depth after a 32-token prompt, and its peak RSS. Prints a table with ratios to
transformers and writes JSON (default bench/out/bitnet-2b.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import git_commit  # bench/ is the script's directory, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PROMPT = list(range(1000, 1032))


def write_dirs(base: Path) -> tuple[Path, Path]:
    """The native checkpoint (bitskip init) and the same weights in the Hugging Face layout."""
    from safetensors.torch import save_file
    from transformers import BitNetConfig
    from transformers.integrations.bitnet import pack_weights

    from models.checkpoint import load_checkpoint
    from models.packing import unpack_ternary
    native, hf = base / "native", base / "hf"
    if not (native / "config.json").exists():
        subprocess.run([sys.executable, "-m", "server.cli", "init", "--preset", "bitnet-2b", str(native)],
                       cwd=ROOT, check=True)
    if (hf / "config.json").exists():
        return native, hf
    ckpt = load_checkpoint(native)
    c = ckpt.config
    tensors = {}
    for name, t in ckpt.tensors.items():
        if name.endswith(".qweight"):
            prefix = name[: -len(".qweight")]
            tensors[f"{prefix}.weight"] = pack_weights(unpack_ternary(t, torch.float32))
            tensors[f"{prefix}.weight_scale"] = (1.0 / ckpt.tensors[f"{prefix}.weight_scale"]).reshape(1)
        elif not name.endswith(".weight_scale"):
            tensors[name] = t
    hf.mkdir(parents=True)
    save_file(tensors, str(hf / "model.safetensors"), metadata={"format": "pt"})
    BitNetConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                 num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                 num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                 rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=True, bos_token_id=None, eos_token_id=None,
                 rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
                 quantization_config={"quant_method": "bitnet", "linear_class": "bitlinear",
                                      "quantization_mode": "offline"}).save_pretrained(hf)
    ckpt.tokenizer.save(str(hf / "tokenizer.json"))
    return native, hf


def run_ours(path: Path, new_tokens: int) -> dict:
    from engine import EngineConfig, LLMEngine, SamplingParams
    from models.checkpoint import load_checkpoint
    t0 = time.perf_counter()
    engine = LLMEngine(load_checkpoint(path), EngineConfig(max_num_seqs=1, num_kv_blocks=16 * 30))
    load_s = time.perf_counter() - t0
    seq = engine.add_request(PROMPT, SamplingParams(max_tokens=new_tokens + 1, ignore_eos=True))
    while seq.first_token_time is None:
        engine.step()
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return {"load_s": load_s, "decode_tok_s": new_tokens / (time.perf_counter() - t0),
            "tokens": seq.output_ids}


@torch.no_grad()
def run_transformers(path: Path, new_tokens: int) -> dict:
    torch._dynamo.config.disable = True  # its @torch.compile'd helpers: eager on a CPU
    from transformers import BitNetForCausalLM
    t0 = time.perf_counter()
    model = BitNetForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    out = model(torch.tensor([PROMPT]), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(torch.tensor([[tokens[-1]]]), cache=out.cache, use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return {"load_s": load_s, "decode_tok_s": new_tokens / (time.perf_counter() - t0), "tokens": tokens}


def child(args) -> None:
    torch.set_num_threads(args.threads)
    run = run_transformers if args.system == "transformers" else run_ours
    result = run(args.path, args.new_tokens)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bitskip-bitnet-2b"))
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "out" / "bitnet-2b.json")
    ap.add_argument("--system", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.system:
        return child(args)
    native, hf = write_dirs(args.dir)
    rows = {}
    for label, system, path in (("ours, native checkpoint", "ours", native),
                                ("ours, Hugging Face dir", "ours", hf),
                                ("transformers (float32)", "transformers", hf)):
        out = subprocess.run([sys.executable, __file__, "--system", system, "--path", str(path),
                              "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)],
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout
        rows[label] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    ref = rows["transformers (float32)"]
    print(f"\nbitnet-2b (2.41B parameters, random weights): batch 1, prompt {len(PROMPT)}, "
          f"{args.new_tokens} new tokens at full depth, {args.threads} threads")
    print(f"{'system':<26} {'load s':>7} {'decode tok/s':>13} {'vs tf':>6} {'peak RSS MiB':>13}")
    for label, r in rows.items():
        print(f"{label:<26} {r['load_s']:>7.1f} {r['decode_tok_s']:>13.2f} "
              f"{r['decode_tok_s'] / ref['decode_tok_s']:>5.1f}x {r['peak_rss_mib']:>13.0f}")
    same = all(r["tokens"] == ref["tokens"] for r in rows.values())
    print(f"greedy tokens identical across the three: {same}")
    result = {"benchmark": "bitnet-2b", "rows": rows, "new_tokens": args.new_tokens,
              "threads": args.threads, "identical_tokens": same, "commit": git_commit(),
              "machine": f"{platform.machine()} {args.threads} threads", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d")}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
