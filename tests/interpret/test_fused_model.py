"""The whole UNet on the fused model path (fast_unet/fused.py, ``FAST_UNET_FUSED``) vs the reference,
forward and every parameter gradient, and the switch that turns the paths on and off.

Under the interpreter a conv launch costs ~1 s per thousand K-steps, so the model tests run at 8x16 and
replace the conv's tile table with one large tile per small sample (``_fast_conv_config``): the wiring is
what these tests check; every real config of the conv is checked in test_conv.py."""
import pytest
import torch
import triton

import fast_unet
from fast_unet import dispatch
from _model_helpers import model_pair, reference_copy
from interpret_rules import assert_matches_reference


@pytest.fixture
def fast_conv_config(monkeypatch):
    from fast_unet.kernels import conv as K

    monkeypatch.setattr(K, "config", lambda dtype, c_in, hw, pool=False: (max(16, min(128, triton.next_power_of_2(hw))), 128, 64, 4, 1))


@pytest.mark.parametrize("fused", ["conv", "attention", "all"])
def test_fused_unet_matches_reference(monkeypatch, fast_conv_config, fused):
    """Float32, non-square 8x16 (a 1x2 bottleneck), batch 2, NCHW input read in place by the first conv."""
    monkeypatch.setenv("FAST_UNET_FUSED", fused)
    model, ref = model_pair(8, 16)
    x = torch.randn(2, 3, 8, 16)
    t = torch.tensor([3, 517])
    calls = []
    orig = fast_unet.ops.group_norm_relu
    monkeypatch.setattr(fast_unet.ops, "group_norm_relu", lambda *a: calls.append(a) or orig(*a))
    dispatch.last_choice.clear()
    y = model(x, t)
    if "attention" in fused or fused == "all":
        assert dispatch.last_choice["fused attention"] == "triton"
    if fused != "attention":
        assert not calls, "on the fused path no DoubleConv may run the unfused GroupNorm op"
        assert dispatch.last_choice["fused conv"] == "triton"
    else:
        assert "fused conv" not in dispatch.last_choice
    assert y.is_contiguous()
    assert_matches_reference(model, ref, y, x, t)


def test_fused_setting_parses_and_switches(monkeypatch):
    x = torch.randn(1, 3, 8, 8)
    monkeypatch.delenv("FAST_UNET_FUSED", raising=False)
    assert dispatch.fused_setting() == set(dispatch.FUSED_PATHS)  # all on by default
    assert dispatch.fused_paths(x)["conv"] == []
    for value, want in (("none", set()), ("0", set()), ("conv", {"conv"}), ("attention, conv", {"conv", "attention"})):
        monkeypatch.setenv("FAST_UNET_FUSED", value)
        assert dispatch.fused_setting() == want, value
    monkeypatch.setenv("FAST_UNET_FUSED", "none")
    assert dispatch.fused_paths(x)["conv"] == ["FAST_UNET_FUSED does not include 'conv'"]
    monkeypatch.setenv("FAST_UNET_FUSED", "conv,pool")
    with pytest.raises(ValueError, match="FAST_UNET_FUSED='conv,pool' is not valid"):
        dispatch.fused_setting()
    monkeypatch.setenv("FAST_UNET_FUSED", "all")
    monkeypatch.setenv("FAST_UNET_BACKEND", "eager")
    assert "the fused paths are Triton kernels" in dispatch.fused_paths(x)["conv"][0]
    monkeypatch.setenv("FAST_UNET_BACKEND", "auto")
    assert dispatch.fused_paths(x)["conv"] == []
    assert "must be float32, bfloat16 or float16" in dispatch.fused_paths(x.double())["conv"][0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_unet_half_precision_forward(monkeypatch, fast_conv_config, dtype):
    """The fused model in bf16/fp16 vs the float64 reference, judged by the eager model's own error in the
    same dtype (the flash-attention rule, on the whole forward)."""
    monkeypatch.setenv("FAST_UNET_FUSED", "all")
    model, ref = model_pair(8, 8)
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([3, 517])
    ref64 = reference_copy(ref, torch.float64, 8, 8)
    with torch.no_grad():
        y = model.to(dtype)(x.to(dtype), t)
        monkeypatch.setenv("FAST_UNET_BACKEND", "eager")
        y_eager = model(x.to(dtype), t)
        y64 = ref64(x.to(dtype).double(), t)
    assert y.dtype == dtype
    err = (y.double() - y64).abs().max().item()
    err_eager = (y_eager.double() - y64).abs().max().item()
    assert err <= 2 * err_eager + 1e-2 * y64.abs().max().item(), (err, err_eager)
