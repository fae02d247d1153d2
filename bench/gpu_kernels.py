"""Ternary projection kernels (Triton) against cuBLAS bf16 and torch._int_mm, on a CUDA GPU.

    python bench/gpu_kernels.py                       # paper-1b shapes, M in {1, 4, 16, 64, 512}
    python bench/gpu_kernels.py --ms 1,4 --shapes gate_up --json /tmp/x.json

For each paper-1b projection shape (fused qkv 2048->3072, o 2048->2048, fused gate_up 2048->8192,
down 4096->2048) and each M it times, with triton.testing.do_bench (median, L2 flushed before
every run):

  ours      CudaTernaryLinear.matmul: int8 codes x 2-bit weights + float epilogue, the kernel
            picked by M (decode for M <= decode_max_m, else prefill); also every other kernel
            that accepts M (`decode`, `decode_bytes` up to 8 rows, `prefill` always)
  quant     the activation quantization kernel alone (float32 in, int8 codes + scales out)
  bf16      torch.nn.functional.linear in bf16 (cuBLAS), weights [N, K] bf16
  int_mm    torch._int_mm on the unpacked int8 weights (cuBLASLt int8). It needs M > 16 on CUDA;
            smaller M are padded to 17 rows (marked `padded`)

and, for M <= 16, the same three matmuls replayed from a CUDA graph (do_bench_cudagraph), which
is how decode steps run. Before timing, every kernel's int32 accumulators are checked equal to
torch._int_mm's. Prints a table with the ratios and writes JSON (default
bench/out/gpu_kernels.json). Refuses to run without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from common import git_commit  # bench/ is the script's directory, first on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# paper-1b projections: name -> (K in-features, N out-features), fused as the engine fuses them.
SHAPES = {"qkv": (2048, 3072), "o": (2048, 2048), "gate_up": (2048, 8192), "down": (4096, 2048)}
MS = (1, 4, 16, 64, 512)
H100_SXM_HBM_TBPS = 3.35



def bench(fn, graph: bool, rep: int) -> float:
    """Median microseconds of fn()."""
    from triton.testing import do_bench, do_bench_cudagraph
    if graph:
        return 1e3 * do_bench_cudagraph(fn, rep=rep, return_mode="median")
    return 1e3 * do_bench(fn, warmup=max(rep // 4, 5), rep=rep, return_mode="median")


def int_mm_operand(codes: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """torch._int_mm's left operand: codes, zero-padded to 17 rows where cuBLASLt refuses fewer
    (padded outside the timed call, so only the matmul is timed)."""
    m = codes.shape[0]
    if m > 16:
        return codes, False
    padded = torch.zeros((17, codes.shape[1]), dtype=torch.int8, device=codes.device)
    padded[:m] = codes
    return padded, True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"subset of {','.join(SHAPES)}")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="rows per call")
    ap.add_argument("--bits", type=int, default=8, choices=(8, 4), help="activation bits (V1/V3: 8, V2: 4)")
    ap.add_argument("--rep", type=int, default=200, help="do_bench rep (ms of timing per measurement)")
    ap.add_argument("--hbm-tbps", type=float, default=H100_SXM_HBM_TBPS,
                    help="memory bandwidth for the floor columns (H100 SXM: 3.35)")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph timings")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "out" / "gpu_kernels.json")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("bench/gpu_kernels.py needs a CUDA GPU: torch.cuda.is_available() is False "
              f"(torch {torch.__version__}). Nothing was measured.", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: this benchmark times compiled kernels.", file=sys.stderr)
        return 2
    import triton

    from engine.kernels import PackedWeight
    from engine.kernels import triton_kernels as tk
    from engine.kernels.cuda import CudaTernaryLinear
    from models.packing import pack_ternary

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    qmax = 2 ** (args.bits - 1) - 1
    shapes = [s for s in args.shapes.split(",") if s]
    ms = [int(m) for m in args.ms.split(",") if m]
    torch.manual_seed(0)
    rows = []
    print(f"{name}  torch {torch.__version__}  triton {triton.__version__}  autotune={tk.AUTOTUNE} "
          f"dp4a={tk.USE_DP4A}  activation bits {args.bits}")
    header = (f"{'shape':>8} {'M':>4} {'kernel':>12} {'ours us':>8} {'quant us':>8} {'bf16 us':>8} "
              f"{'int_mm us':>9} {'bf16/ours':>9} {'int_mm/ours':>11} {'floor2b us':>10} {'floor16b us':>11}")
    print(header)
    for shape in shapes:
        k, n = SHAPES[shape]
        ternary = torch.randint(-1, 2, (n, k), dtype=torch.int8)
        lin = CudaTernaryLinear([PackedWeight(pack_ternary(ternary), 0.02)], args.bits, False)
        w_bf16 = ternary.to(dev, torch.bfloat16)
        w_i8_t = ternary.to(dev).t()                  # [K, N] view of the [N, K] int8 weight
        floor2 = lin.packed_bytes() / (args.hbm_tbps * 1e12) * 1e6
        floor16 = w_bf16.numel() * 2 / (args.hbm_tbps * 1e12) * 1e6
        for m in ms:
            codes = torch.randint(-qmax, qmax + 1, (m, k), dtype=torch.int8, device=dev)
            scales = torch.rand((m, 1), device=dev) + 0.5
            x = torch.randn((m, k), device=dev)
            x_bf16 = torch.randn((m, k), device=dev, dtype=torch.bfloat16)
            codes_mm, padded = int_mm_operand(codes)
            ref = torch._int_mm(codes_mm, w_i8_t)[:m]
            kernels = [kk for kk in tk.KERNELS if kk == "prefill" or m <= tk.DECODE_MAX_M]
            for kk in kernels:                          # exactness first (also warms the autotuner)
                got = lin.accumulate(codes, kernel=kk)
                if not torch.equal(got, ref):
                    print(f"MISMATCH: {shape} M={m} kernel {kk}: int32 accumulators differ from _int_mm",
                          file=sys.stderr)
                    return 1
                lin.matmul(codes, scales, kernel=kk)
            auto = lin.pick_kernel(m)
            t_quant = bench(lambda: lin.quantize(x), False, args.rep)
            t_bf16 = bench(lambda: F.linear(x_bf16, w_bf16), False, args.rep)
            t_intmm = bench(lambda: torch._int_mm(codes_mm, w_i8_t), False, args.rep)
            t_full = bench(lambda: lin(x), False, args.rep)
            for kk in kernels:
                t = bench(lambda: lin.matmul(codes, scales, kernel=kk), False, args.rep)
                row = dict(shape=shape, K=k, N=n, M=m, kernel=kk, auto=kk == auto, ours_us=t,
                           quant_us=t_quant, projection_us=t_full if kk == auto else None,
                           bf16_us=t_bf16, int_mm_us=t_intmm, int_mm_padded=padded,
                           bf16_over_ours=t_bf16 / t, int_mm_over_ours=t_intmm / t,
                           floor_2bit_us=floor2, floor_bf16_us=floor16,
                           packed_bytes=lin.packed_bytes(), bf16_bytes=w_bf16.numel() * 2)
                if m <= 16 and not args.no_graphs:
                    try:
                        row["graph_ours_us"] = bench(lambda: lin.matmul(codes, scales, kernel=kk), True, args.rep)
                        row["graph_bf16_us"] = bench(lambda: F.linear(x_bf16, w_bf16), True, args.rep)
                        row["graph_bf16_over_ours"] = row["graph_bf16_us"] / row["graph_ours_us"]
                    except Exception as e:  # noqa: BLE001 - record, do not abort the sweep
                        row["graph_error"] = repr(e)
                rows.append(row)
                mark = "*" if kk == auto else " "
                print(f"{shape:>8} {m:>4} {kk + mark:>12} {t:8.2f} {t_quant:8.2f} {t_bf16:8.2f} "
                      f"{t_intmm:8.2f}{'p' if padded else ' '} {t_bf16 / t:9.2f} {t_intmm / t:11.2f} "
                      f"{floor2:10.2f} {floor16:11.2f}")
    print("* = the kernel CudaTernaryLinear picks for that M; p = _int_mm padded to 17 rows")

    target = [r for r in rows if r["shape"] == "gate_up" and r["M"] == 1]
    best = min(target, key=lambda r: r["ours_us"]) if target else None
    summary = None
    if best:
        summary = dict(kernel=best["kernel"], ours_us=best["ours_us"], bf16_us=best["bf16_us"],
                       speedup=best["bf16_over_ours"], target=4.0, met=best["bf16_over_ours"] >= 4.0)
        print(f"M=1 gate_up (2048->8192): best kernel {best['kernel']} {best['ours_us']:.2f} us vs bf16 "
              f"{best['bf16_us']:.2f} us = {best['bf16_over_ours']:.2f}x (target 4x: "
              f"{'met' if summary['met'] else 'NOT met'})")
    out = dict(device=name, torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
               commit=git_commit(), autotune=tk.AUTOTUNE, dp4a=tk.USE_DP4A, activation_bits=args.bits,
               hbm_tbps=args.hbm_tbps, timing="triton.testing.do_bench median, L2 flushed; graph_* via "
               "do_bench_cudagraph", m1_gate_up=summary, rows=rows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
