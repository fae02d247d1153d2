"""The dense peer of bench/decode.py: a transformers LlamaForCausalLM with the same dimensions as a
BitSkip preset, random bf16 weights, greedy decode with a static KV cache.

    python bench/dense_peer.py --preset paper-1b --batch 1 --json out.json
    python bench/dense_peer.py --preset paper-1b --batch 32 --compile   # torch.compile the forward

Decode tokens/s = batch * (N - 1) / (time of N new tokens - time of 1 new token): the prefill and
first token cancel out. Median of --repeats. Run it in its own process beside bench/decode.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from common import git_commit, write_json  # bench/ is the script's directory, first on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models.config import preset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="paper-1b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model's forward")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    c = preset(args.preset)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    config = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                         num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                         num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                         rope_theta=c.rope_theta, rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(args.device):  # random init where it runs: seconds, not a minute on the host
        model = LlamaForCausalLM(config).to(dtype).eval()
    if args.compile:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    prompt = torch.randint(0, min(c.vocab_size, 256), (args.batch, args.prompt_tokens), device=args.device)

    def timed(n: int) -> float:
        gen = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False,
                               cache_implementation="static", pad_token_id=0)
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), generation_config=gen)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(args.new_tokens)  # warm-up (and compilation)
    rates = []
    for _ in range(args.repeats):
        rates.append(args.batch * (args.new_tokens - 1) / (timed(args.new_tokens) - timed(1)))
    rate = statistics.median(rates)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"dense {args.preset} ({str(dtype).replace('torch.', '')}, static cache"
          f"{', compiled' if args.compile else ''}) batch {args.batch} on {name}: {rate:.1f} tokens/s")
    result = {"benchmark": "dense_peer", "model": f"{args.preset}-dense-{str(dtype).replace('torch.', '')}",
              "batch": args.batch, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "compiled": args.compile, "tokens_per_s": rate, "all_runs": rates, "device": name,
              "torch": torch.__version__, "commit": git_commit(), "date": time.strftime("%Y-%m-%d")}
    write_json(result, args.json or Path(__file__).parent / "out" / f"dense-{args.preset}-b{args.batch}.json")


if __name__ == "__main__":
    main()
