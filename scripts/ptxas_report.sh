#!/usr/bin/env bash
# Registers, spills and shared memory of every CUDA kernel in csrc/, per architecture, from ptxas -v.
# Usage: scripts/ptxas_report.sh [ARCHS]   (default "80 90"; needs nvcc and the CUDA build of torch)
# A kernel that spills shows "spill stores > 0" or a non-zero stack frame; the script exits 1 then.
set -euo pipefail
cd "$(dirname "$0")/.."
ARCHS=${1:-"80 90"}
TORCH_INC=$(python -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-I'+p for p in include_paths()))" 2>/dev/null)
NV_INC=$(python -c "import nvidia, glob, os; print(' '.join('-I'+p for b in nvidia.__path__ for p in glob.glob(os.path.join(b, 'cu*', 'include'))))" 2>/dev/null || true)
status=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for src in $(find csrc -name '*.cu' | sort); do
  # one nvcc per arch, side by side (each is mostly the host compiler on torch's headers: one core each)
  for arch in $ARCHS; do
    ( nvcc -c "$src" -o /dev/null -std=c++20 -O3 --use_fast_math -Icsrc $TORCH_INC $NV_INC -DFAST_UNET_WITH_CUDA \
        -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
        -D__CUDA_NO_HALF2_OPERATORS__ --expt-relaxed-constexpr \
        -gencode "arch=compute_${arch},code=sm_${arch}" -Xptxas -v >"$tmp/$arch.log" 2>&1; echo $? >"$tmp/$arch.rc" ) &
  done
  wait
  for arch in $ARCHS; do
    log="$tmp/$arch.log"
    [ "$(cat "$tmp/$arch.rc")" -eq 0 ] || { cat "$log"; exit 2; }
    echo "== $src sm_${arch}"
    python - "$log" <<'PY' || status=1
import re, subprocess, sys
text = open(sys.argv[1]).read()
rows, spilled = [], False
for m in re.finditer(r"Compiling entry function '(\S+)' for 'sm_\d+'.*?(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?", text, re.S):
    name = subprocess.run(["c++filt"], input=m.group(1), capture_output=True, text=True).stdout.strip()
    name = re.sub(r"fast_unet::\(anonymous namespace\)::", "", name)
    name = re.sub(r"\(.*\)$", "", name).replace("c10::BFloat16", "bf16").replace("c10::Half", "half")
    stack, st, ld, reg, smem = (int(g or 0) for g in m.group(2, 3, 4, 5, 6))
    spilled |= bool(stack or st or ld)
    rows.append((name, reg, stack, st, ld, smem))
for r in sorted(rows):
    print(f"  {r[0]:<48} regs {r[1]:>3}  stack {r[2]:>3}  spill st/ld {r[3]}/{r[4]}  smem {r[5]}")
print(f"  {len(rows)} kernels, " + ("SPILLS FOUND" if spilled else "no spills"))
sys.exit(1 if spilled else 0)
PY
  done
done
exit $status
