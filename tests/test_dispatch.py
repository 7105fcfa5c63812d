"""The dispatch layer: FAST_UNET_BACKEND, forced backends, explanations, and `python -m fast_unet.info`."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fast_unet import dispatch, ops


def _gn_args():
    return torch.randn(2, 8, 4, 4), torch.ones(8), torch.zeros(8), 1e-5, None


def test_unknown_backend_lists_the_valid_ones(monkeypatch):
    monkeypatch.setenv("FAST_UNET_BACKEND", "cudnn")
    with pytest.raises(ValueError, match="auto, triton, ext, eager"):
        ops.group_norm_relu(*_gn_args())


def test_forced_eager_runs_eager(monkeypatch):
    monkeypatch.setenv("FAST_UNET_BACKEND", "eager")
    assert dispatch.select("group_norm_relu", *_gn_args())[0] == "eager"


@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_forced_backend_that_cannot_run_raises_with_reason(monkeypatch, backend):
    """On CPU tensors with no interpreter / no CPU kernel, a forced backend must say why, not fall back."""
    args = _gn_args()
    why = dispatch.reasons("group_norm_relu", backend, *args)
    monkeypatch.setenv("FAST_UNET_BACKEND", backend)
    if why:
        with pytest.raises(RuntimeError, match=f"FAST_UNET_BACKEND={backend} cannot run group_norm_relu: .+"):
            ops.group_norm_relu(*args)
    else:
        assert dispatch.select("group_norm_relu", *args)[0] == backend


def test_auto_picks_first_backend_without_reasons(monkeypatch):
    monkeypatch.delenv("FAST_UNET_BACKEND", raising=False)
    args = _gn_args()
    explained = dispatch.explain("group_norm_relu", *args)
    assert list(explained) == list(dispatch.PRIORITY)
    assert explained["eager"] == []
    expected = next(b for b in dispatch.PRIORITY if not explained[b])
    assert dispatch.select("group_norm_relu", *args)[0] == expected
    for b, why in explained.items():
        assert all(isinstance(r, str) and r for r in why), (b, why)


def test_register_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown op"):
        dispatch.register("conv", "eager", lambda: None)
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.register("attention", "cuda", lambda: None)


def test_info_prints_every_backend():
    out = subprocess.run([sys.executable, "-m", "fast_unet.info"], capture_output=True, text=True, check=True).stdout
    for b in dispatch.PRIORITY:
        assert f"  {b}:" in out
    assert "torch" in out


def test_info_says_which_fused_paths_run_and_why_not():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "fast_unet.info"], capture_output=True, text=True, check=True,
                         env=dict(env, FAST_UNET_FUSED="conv")).stdout
    assert "fused model paths (FAST_UNET_FUSED=conv" in out
    assert "attention  off: FAST_UNET_FUSED does not include 'attention'" in out
    if not torch.cuda.is_available():
        assert "conv       off: x is on the CPU and TRITON_INTERPRET is not 1" in out
    bad = subprocess.run([sys.executable, "-m", "fast_unet.info", "--json"], capture_output=True, text=True,
                         check=True, env=dict(env, FAST_UNET_FUSED="conv,pool")).stdout
    assert "is not valid" in json.loads(bad)["fused"]["error"]
