"""The dispatch layer: FAST_UNET_BACKEND, forced backends, explanations, and `python -m fast_unet.info`."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fast_unet import dispatch, ops


def _gn_args():
    return torch.randn(2, 8, 4, 4), torch.ones(8), torch.zeros(8), 1e-5, None, None


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
        with pytest.raises(RuntimeError, match=f"FAST_UNET_BACKEND={backend} cannot run group_norm_relu on {backend}: .+"):
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


def test_register_rejects_unknown_backends():
    with pytest.raises(ValueError, match="unknown backend"):
        dispatch.register("attention", "cuda", lambda: None)
    with pytest.raises(ValueError, match="unknown op 'conv'"):
        dispatch.select("conv", None)


def test_every_op_has_an_eager_twin():
    for op in dispatch.OPS:
        assert "eager" in dispatch.implementations(op), op


def test_per_op_override(monkeypatch):
    """``op=backend`` forces one op; the others keep the mode."""
    monkeypatch.setenv("FAST_UNET_BACKEND", "ext,attention=eager")
    assert dispatch.setting() == ("ext", {"attention": "eager"})
    assert dispatch.select("attention", torch.randn(1, 8, 3, 4, 16))[0] == "eager"
    assert dispatch.forced("conv3x3") == "eager"  # ext has no conv3x3: its mode runs it on eager
    assert dispatch.forced("group_norm_relu") == "ext"
    monkeypatch.setenv("FAST_UNET_BACKEND", "conv3x3=eager")
    assert dispatch.setting() == ("auto", {"conv3x3": "eager"})
    assert dispatch.forced("attention") is None
    for bad, msg in (("auto,conv=eager", "unknown op 'conv'"), ("auto,conv3x3=cudnn", "is not a backend"),
                     ("eager,triton", "is not valid")):
        monkeypatch.setenv("FAST_UNET_BACKEND", bad)
        with pytest.raises(ValueError, match=msg):
            ops.group_norm_relu(*_gn_args())


def test_override_to_a_backend_without_the_op_raises(monkeypatch):
    monkeypatch.setenv("FAST_UNET_BACKEND", "conv3x3=ext")
    x, w, b = torch.randn(1, 4, 4, 4), torch.randn(8, 4, 3, 3), torch.randn(8)
    with pytest.raises(RuntimeError, match="cannot run conv3x3 on ext: ext has no implementation of conv3x3"):
        ops.conv3x3(x, w, b)


def test_reasons_name_each_cause_once():
    """Triton on CPU tensors without the interpreter: one reason naming every tensor, not one per tensor."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1" or dispatch.backend_status()["triton"]:
        pytest.skip("needs Triton without the interpreter")
    why = dispatch.reasons("group_norm_relu", "triton", torch.randn(2, 8, 4, 4), torch.ones(8), torch.zeros(8),
                           1e-5, torch.randn(2, 8), None)
    assert len(why) == 1 and why[0].startswith("x, weight, bias, emb are on the CPU"), why


def test_info_prints_every_backend():
    out = subprocess.run([sys.executable, "-m", "fast_unet.info"], capture_output=True, text=True, check=True).stdout
    for b in dispatch.PRIORITY:
        assert f"  {b}:" in out
    assert "torch" in out


def test_info_json_lists_every_op_and_backend():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    info = json.loads(subprocess.run([sys.executable, "-m", "fast_unet.info", "--json"], capture_output=True,
                                     text=True, check=True, env=env).stdout)
    assert set(info["ops"]) == set(dispatch.OPS)
    for op, per_backend in info["ops"].items():
        assert set(per_backend["backends"]) == set(dispatch.PRIORITY), op
        assert per_backend["backends"]["eager"] == "available", op
        for device in ("cpu", "cuda"):
            assert per_backend["runs_on"][device] in dispatch.PRIORITY, (op, device)
    assert info["ops"]["conv3x3"]["backends"]["ext"] == "ext has no implementation of conv3x3"
    assert info["ops"]["conv3x3"]["runs_on"]["cpu"] == "eager"
    if not info["backends"]["ext"]["reason"]:
        assert info["ops"]["attention"]["runs_on"]["cpu"] == "ext"
    assert "archs" in info["build"] and "cpu_isa" in info["build"]
