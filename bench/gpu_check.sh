#!/usr/bin/env bash
# The prepared GPU check: every GPU measurement of the project in one command (README: "GPU check").
#
#   bench/gpu_check.sh OUTDIR [WHEELS]   on a CUDA machine (H100/H200): torch, triton and
#                                        transformers installed, no network; the project's other
#                                        dependencies come from the wheel folder WHEELS
#   bench/gpu_check.sh --smoke OUTDIR    the same flow on the CPU under TRITON_INTERPRET=1 with
#                                        tiny-test shapes (CI runs it: tests/test_gpu_check.py)
#
# Steps (each under its own time limit; a failed step is recorded and the rest still run):
# install (with WHEELS), environment, GPU tests, bench/gpu_kernels.py, a random paper-1b
# checkpoint, bench/decode.py at batch 1 and 32 (exits 6/12/18/24), the bf16 dense transformers
# peer at batch 1 and 32 (its own processes; torch.compile too if time is left), bench/serve.py
# against a live server at concurrency 1/8/32. Writes OUTDIR/*.json, *.log, steps.tsv and
# summary.md (with the GPU name). Exit status 0 when every step passed.
set -uo pipefail

SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
if [ $# -lt 1 ]; then
    echo "usage: bench/gpu_check.sh [--smoke] OUTDIR [WHEELS]" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1" && OUT=$(cd "$1" && pwd)
WHEELS=${2:-}
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

if [ "$SMOKE" = 1 ]; then
    export TRITON_INTERPRET=1 BITSKIP_TRITON_AUTOTUNE=0
    MODE=smoke DEVICE=cpu PRESET=tiny-test EXITS=2,4 BIG=2 NEW=2 REPEATS=1 PROMPT=4
    LEVELS=1,2 PER_CLIENT=1 SERVE_TOKENS=2 SERVE_PROMPT=hi BUDGET=170 SCALE=4  # limits x4: shared CPU
    TESTS=(tests/test_device_sampler.py)   # the interpreter tests run in CI's main suite
else
    MODE=gpu DEVICE=cuda PRESET=paper-1b EXITS=6,12,18,24 BIG=32 NEW=64 REPEATS=3 PROMPT=32
    LEVELS=1,8,32 PER_CLIENT=2 SERVE_TOKENS=64 SERVE_PROMPT="The meaning of an early exit is"
    BUDGET=${BUDGET:-420} SCALE=1
    TESTS=(tests/test_triton_kernels.py tests/test_triton_runner.py tests/test_device_sampler.py
           tests/test_cuda_graphs.py tests/test_triton_speculative.py)
fi

START=$SECONDS
FAILED=0
: > "$OUT/steps.tsv"
# step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, record the status.
# A step's limit is its own, capped by what is left of BUDGET, so the whole check ends in time.
# ONLY="name ..." runs just those steps (a rerun of what failed, within what device time is left).
step() {
    local name=$1 limit=$(($2 * SCALE)) t0=$SECONDS rc left
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then skip "$name" "not in ONLY"; return; fi
    left=$((BUDGET * SCALE - (SECONDS - START)))
    if [ "$left" -lt 10 ]; then skip "$name" "no time left in the budget"; FAILED=1; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$OUT/steps.tsv"
    echo "[$((SECONDS - START))s] $name: exit $rc ($OUT/$name.log)"
    [ "$rc" = 0 ] || FAILED=1
}
skip() {
    printf '%s\t%s\t0\n' "$1" "skipped: $2" >> "$OUT/steps.tsv"
    echo "[$((SECONDS - START))s] $1: skipped ($2)"
}

if [ -n "$WHEELS" ]; then
    # Everything the server and tests need besides torch/triton/transformers, without network;
    # the installed torch is pinned so pip can never replace it.
    "$PY" -c "import torch; print('torch==' + torch.__version__)" > "$OUT/torch-pin.txt"
    step install 120 "$PY" -m pip install --no-index --find-links "$WHEELS" -c "$OUT/torch-pin.txt" \
        fastapi uvicorn pydantic safetensors tokenizers prometheus-client httpx pytest pytest-timeout
fi

step environment 60 "$PY" - "$OUT" "$MODE" <<'EOF'
import json, subprocess, sys, time
import torch
try:
    import triton
    triton_version = triton.__version__
except ImportError:
    triton_version = None
out, mode = sys.argv[1], sys.argv[2]
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter, smoke run)"
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
env = {"gpu": gpu, "mode": mode, "torch": torch.__version__, "triton": triton_version,
       "cuda": torch.version.cuda, "commit": commit or "unknown", "date": time.strftime("%Y-%m-%d %H:%M")}
json.dump(env, open(f"{out}/environment.json", "w"), indent=2)
print(env)
if mode == "gpu" and not torch.cuda.is_available():
    sys.exit("no CUDA device: run with --smoke on a CPU machine")
EOF

# The checkpoint is made on the CPU while the tests use the GPU.
"$PY" -m server.cli init --preset "$PRESET" "$OUT/ckpt" > "$OUT/checkpoint-init.log" 2>&1 &
CKPT_PID=$!

# Tests with the heuristic configs (test_every_autotune_config_exact runs every candidate).
step tests 150 env BITSKIP_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"

if [ "$SMOKE" = 1 ]; then
    skip gpu_kernels "times compiled kernels; needs CUDA"
else
    step gpu_kernels 90 "$PY" bench/gpu_kernels.py --rep 50 --json "$OUT/gpu_kernels.json"
fi

step checkpoint 90 bash -c 'while kill -0 "$1" 2>/dev/null; do sleep 1; done; cat "$2"; grep -q "^wrote" "$2"' \
    _ "$CKPT_PID" "$OUT/checkpoint-init.log"

for batch in 1 "$BIG"; do
    name=b$batch; [ "$batch" = "$BIG" ] && name=b32
    step "decode-$name" 75 "$PY" bench/decode.py --model "$OUT/ckpt" --device "$DEVICE" --backend triton \
        --exit-layers "$EXITS" --batch "$batch" --new-tokens "$NEW" --repeats "$REPEATS" \
        --prompt-tokens "$PROMPT" --json "$OUT/decode-$name.json"
    step "dense-$name" 60 "$PY" bench/dense_peer.py --preset "$PRESET" --device "$DEVICE" --batch "$batch" \
        --new-tokens "$NEW" --repeats "$REPEATS" --prompt-tokens "$PROMPT" --json "$OUT/dense-$name.json"
done

# Where a batch-1 step's time goes, per decode-kernel choice and without CUDA graphs.
if [ "$SMOKE" = 0 ]; then
    for variant in decode_bytes decode prefill; do
        step "profile-$variant" 60 env BITSKIP_DECODE_KERNEL=$variant "$PY" bench/gpu_profile.py \
            --model "$OUT/ckpt" --label "$variant" --json "$OUT/profile-$variant.json"
    done
    step profile-eager 60 "$PY" bench/gpu_profile.py --model "$OUT/ckpt" --enforce-eager --label eager \
        --json "$OUT/profile-eager.json"
fi

step serve 100 "$PY" bench/serve.py --model "$OUT/ckpt" --concurrency "$LEVELS" \
    --requests-per-client "$PER_CLIENT" --max-tokens "$SERVE_TOKENS" --prompt "$SERVE_PROMPT" \
    --serve-args "--device $DEVICE --backend triton" --json "$OUT/serve.json"

if [ "$SMOKE" = 0 ] && [ $((SECONDS - START)) -lt $((BUDGET - 70)) ]; then
    step dense-b1-compiled 60 "$PY" bench/dense_peer.py --preset "$PRESET" --batch 1 --compile \
        --new-tokens "$NEW" --repeats "$REPEATS" --json "$OUT/dense-b1-compiled.json"
else
    skip dense-b1-compiled "no time left in the budget, or smoke run"
fi

rm -rf "$OUT/ckpt"
"$PY" bench/gpu_summary.py "$OUT" > /dev/null || FAILED=1
echo "[$((SECONDS - START))s] summary: $OUT/summary.md"
exit "$FAILED"
