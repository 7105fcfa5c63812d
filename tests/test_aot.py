"""The ahead-of-time compile report (``python -m fast_unet.info --compile``): builds for GPUs that are
not here, so it runs on any machine with Triton's bundled ptxas/cuobjdump. It runs in a subprocess with
TRITON_INTERPRET removed (interpreted kernels cannot be compiled), so it works inside either test run."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "fast_unet.info", "--compile", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_attention_forward_compiles_without_spills_and_uses_wgmma():
    out = _report("sm_90", "--kernel", "attn_fwd", "--json")
    rows = json.loads(out)
    assert len(rows) == 9, out  # 3 dtypes x 3 head dims
    for r in rows:
        assert set(r) >= {"kernel", "config", "arch", "regs", "spill_bytes", "shared_bytes", "tensor_cores"}, r
        assert r["arch"] == "sm_90" and r["kernel"] == "attn_fwd"
        assert r["spill_bytes"] == 0, f"spills: {r}"
        assert 0 < r["regs"] <= 255, r
        if not r["config"].startswith("float32"):
            assert r["tensor_cores"] == "wgmma", f"no wgmma in a half-precision attention build: {r}"


def test_group_norm_apply_table():
    out = _report("sm_80", "--kernel", "gn_apply")
    lines = out.strip().splitlines()
    assert lines[0].startswith("| kernel") and "spill_bytes" in lines[0]
    body = lines[2:]
    assert len(body) == 3 * 4 * 2, out  # dtypes x tile configs x (emb, no emb)
    assert all(line.split("|")[5].strip() == "0" for line in body), out


def test_parse_archs():
    from fast_unet.aot import parse_archs

    assert parse_archs("sm_80,sm_90") == [80, 90]
    assert parse_archs("90a") == [90]
    with pytest.raises(ValueError, match="--compile"):
        parse_archs("hopper")


def test_conv_compiles_without_spills_and_uses_tensor_cores():
    rows = json.loads(_report("sm_80,sm_90", "--kernel", "conv3x3_gn", "--json"))
    # 2 archs x (1 float32 + 3 bfloat16 + 3 float16 configs) x 4 input variants
    assert len(rows) == 2 * 7 * 4, rows
    assert {r["config"].split()[1] for r in rows} == {"plain", "norm-on-load", "concat", "pool-on-load"}
    for r in rows:
        assert r["spill_bytes"] == 0, f"spills: {r}"
        assert 0 < r["regs"] <= 255, r
        if not r["config"].startswith("float32"):
            assert r["tensor_cores"] == ("wgmma" if r["arch"] == "sm_90" else "mma"), r


def test_fused_path_kernels_compile_without_spills():
    """The normalise + pool pass, the upsample (both variants) and the GroupNorm backward's batch
    reduction: every dtype, both archs."""
    rows = json.loads(_report("sm_80,sm_90", "--kernel", "gn_relu_pool", "--kernel", "upsample2x",
                              "--kernel", "gn_bwd_param", "--json"))
    assert len(rows) == 2 * 3 * 4, rows  # 2 archs x 3 dtypes x (pool, 2 upsample variants, param)
    for r in rows:
        assert r["spill_bytes"] == 0 and 0 < r["regs"] <= 255, r


def test_layernorm_backward_gemm_compiles_without_spills():
    """kernels/ln_backward.py: every (dtype, padded K) config on both archs; wgmma on sm_90 where the
    row block is 64 (half precision, K <= 128)."""
    rows = json.loads(_report("sm_80,sm_90", "--kernel", "ln_linear_bwd", "--json"))
    assert len(rows) == 2 * 3 * 4, rows  # 2 archs x 3 dtypes x 4 K buckets
    for r in rows:
        assert r["spill_bytes"] == 0 and 0 < r["regs"] <= 255, r
        if not r["config"].startswith("float32"):
            assert r["tensor_cores"] in ("mma", "wgmma"), r
            if r["arch"] == "sm_90" and " 64x" in r["config"]:
                assert r["tensor_cores"] == "wgmma", r
