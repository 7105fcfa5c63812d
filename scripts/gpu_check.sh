#!/usr/bin/env bash
# The project's one prepared GPU check (Triton backend): install, GPU tests, benchmarks, in < 8 minutes.
#
#   scripts/gpu_check.sh [OUTDIR]      # OUTDIR defaults to $OUT, else ./gpu_check_out
#
# For a CUDA machine with no network (torch, triton, pytest already installed). Every step's output
# goes to OUTDIR/<step>.log; OUTDIR/summary.txt gets one line per step (exit status, seconds) and the
# test and benchmark figures. A step that fails does not stop the later ones; the script's exit status
# is non-zero if any step failed. Each step's time limit is cut so the whole run stays under TOTAL_S.
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUTDIR="${1:-${OUT:-$ROOT/gpu_check_out}}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"
SUMMARY="$OUTDIR/summary.txt"
TOTAL_S="${GPU_CHECK_TOTAL_S:-460}"
START=$(date +%s)
FAILED=0
cd "$ROOT"

export TORCH_CUDA_ARCH_LIST="9.0"
export MAX_JOBS="${MAX_JOBS:-16}"
export FAST_UNET_BACKEND=auto
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S CMD...: run CMD with at most LIMIT_S seconds (less if the total budget is short).
step() {
    local name="$1" limit="$2"; shift 2
    local left=$(( TOTAL_S - ($(date +%s) - START) ))
    if (( left < 10 )); then note "$name: SKIPPED (time budget spent)"; FAILED=1; return 1; fi
    (( limit > left )) && limit=$left
    local t0=$(date +%s) rc
    timeout --kill-after=10 "$limit" "$@" > "$OUTDIR/$name.log" 2>&1
    rc=$?
    note "$name: rc=$rc $(( $(date +%s) - t0 ))s (limit ${limit}s)$( ((rc == 124)) && echo ' TIMED OUT')"
    (( rc != 0 )) && FAILED=1
    return $rc
}

note "fast_unet GPU check (triton backend) $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
note "$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"

step install 120 python -m pip install --no-build-isolation --no-deps -e .
step info 30 python -m fast_unet.info
grep -E "torch|triton|device|  (triton|ext|eager):" "$OUTDIR/info.log" | sed 's/^/    /' >> "$SUMMARY"

# tests/test_aot.py and tests/interpret need no GPU: CI runs them; here only what needs the device.
step gpu_tests 270 python -m pytest -q -rs --durations=10 tests/gpu --junitxml="$OUTDIR/gpu_tests.xml"
tail -n 25 "$OUTDIR/gpu_tests.log" | sed 's/^/    /' >> "$SUMMARY"

step kernel_bench 120 python scripts/bench_kernels.py --out "$OUTDIR/kernel_bench.jsonl"
sed 's/^/    /' "$OUTDIR/kernel_bench.jsonl" >> "$SUMMARY" 2>/dev/null

step kernel_count 60 python -m bench.kernels --device cuda --summary
tail -n 12 "$OUTDIR/kernel_count.log" | sed 's/^/    /' >> "$SUMMARY"

if [ -d bench ] || python -c "import bench" >/dev/null 2>&1; then
    step bench 120 python -m bench --device cuda --no-kernel-count
    tail -n 30 "$OUTDIR/bench.log" | sed 's/^/    /' >> "$SUMMARY"
    # the fused ops (default) against their eager twins (which run their pieces on Triton), B=64, 64x64, bf16
    unfused="triton,conv3x3=eager,gn_relu_maxpool=eager,upsample2x=eager,gn_ln_linear=eager"
    for variant in fused unfused; do
        setting=auto; [ $variant = unfused ] && setting=$unfused
        step "bench_b64_bf16_$variant" 60 env FAST_UNET_BACKEND=$setting python -m bench --device cuda \
            --batch 64 --dtype bfloat16 --models baseline,fast_unet --repeats 5 --no-memory --no-kernel-count \
            --json "$OUTDIR/bench_b64_bf16_$variant.json"
        tail -n 8 "$OUTDIR/bench_b64_bf16_$variant.log" | sed 's/^/    /' >> "$SUMMARY"
    done
else
    note "bench: not run (no bench package in this checkout)"
fi

note "total: $(( $(date +%s) - START ))s; $([ $FAILED = 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED')"
exit $FAILED
