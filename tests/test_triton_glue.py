"""The Triton backend's glue without running kernels: lazy import, missing Triton, CPU without the
interpreter. Each case runs in a fresh interpreter so the environment at import time is controlled."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env_overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FAST_UNET_BACKEND")}
    env.update(env_overrides)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_missing_triton_disables_the_backend_with_a_reason():
    out = _run("""
        import sys
        sys.modules["triton"] = None  # as if Triton were not installed
        import torch, fast_unet
        from fast_unet import dispatch, ops
        try:
            import fast_unet.kernels.attention
        except ImportError as e:
            print("ImportError", e.name)
        reason = dispatch.backend_status()["triton"]
        assert reason and "triton" in reason, reason
        qkv = torch.randn(1, 8, 3, 4, 16)
        assert dispatch.select("attention", qkv)[0] != "triton"
        print("ok", reason)
    """)
    assert "ImportError triton" in out and "ok" in out


def test_cpu_tensors_without_interpreter_fall_back_to_eager():
    out = _run("""
        import torch, fast_unet
        from fast_unet import dispatch
        qkv = torch.randn(1, 8, 3, 4, 16)
        why = dispatch.explain("attention", qkv)["triton"]
        assert any("TRITON_INTERPRET" in r for r in why), why
        assert dispatch.select("attention", qkv)[0] != "triton"
        why = dispatch.explain("group_norm_relu", torch.randn(2, 8, 4, 4).to("meta"), torch.ones(8, device="meta"),
                               torch.zeros(8, device="meta"), 1e-5, None, None)["triton"]
        assert any("meta" in r for r in why), why
        print("ok")
    """)
    assert "ok" in out


def test_forced_triton_on_cpu_without_interpreter_says_why():
    out = _run("""
        import torch, fast_unet
        try:
            fast_unet.ops.attention(torch.randn(1, 8, 3, 4, 16))
        except RuntimeError as e:
            assert "FAST_UNET_BACKEND=triton" in str(e) and "TRITON_INTERPRET" in str(e), e
            print("ok")
    """, FAST_UNET_BACKEND="triton")
    assert "ok" in out
