"""The per-op benchmark (`python -m bench.ops`, which the GPU check runs) kept runnable without a GPU: its
--dry mode runs every dispatched op once on every backend that takes it, forward and forward+backward,
on CPU tensors, the Triton kernels under the interpreter."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_ops_dry_runs_every_op_on_triton(tmp_path):
    from fast_unet import dispatch

    out = tmp_path / "ops.json"
    env = dict(os.environ, TRITON_INTERPRET="1", FAST_UNET_BACKEND="auto")
    proc = subprocess.run([sys.executable, "-m", "bench.ops", "--dry", "--batch", "1", "--sizes", "8", "--quiet",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["op"] for r in rows} == set(dispatch.OPS)
    for r in rows:
        assert r["results"]["triton"][r["direction"]] == {"ran": True}, r
        assert r["results"]["eager"][r["direction"]] == {"ran": True}, r
    assert {r["direction"] for r in rows} == {"fwd", "fwd+bwd"}
