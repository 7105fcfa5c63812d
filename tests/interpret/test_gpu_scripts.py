"""The GPU kernel benchmark (scripts/bench_kernels.py, run by scripts/gpu_check.sh) kept runnable without
a GPU: its --dry mode runs every case once, forward and backward, on CPU tensors under the interpreter."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_kernels_dry_runs_every_case():
    env = dict(os.environ, TRITON_INTERPRET="1", FAST_UNET_BACKEND="auto")
    proc = subprocess.run([sys.executable, "scripts/bench_kernels.py", "--dry", "--batch", "1", "--size", "8"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    ops = [r["op"] for r in rows]
    assert len(ops) == 24, ops
    for kind in ("conv3x3 norm-on-load", "conv3x3 plain", "conv3x3 pool-on-load", "attention block",
                 "group_norm_relu", "attention N=", "time_embedding"):
        assert any(op.startswith(kind) for op in ops), kind
