"""The whole drop-in UNet on the unfused Triton ops vs the reference (fast_unet.reference), 16x16, float32.
(The fused model path: test_fused_model.py.)"""
import pytest
import torch

import fast_unet
from _model_helpers import model_pair
from interpret_rules import assert_matches_reference


def test_unet_forward_and_parameter_gradients_match_reference(monkeypatch):
    """The unfused Triton ops (FAST_UNET_FUSED=none): every dispatched op runs on Triton."""
    monkeypatch.setenv("FAST_UNET_FUSED", "none")
    model, ref = model_pair(16)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 517])
    calls = []
    orig = fast_unet.dispatch.select

    def spy(op, *args):
        backend, fn = orig(op, *args)
        calls.append((op, backend))
        return backend, fn

    fast_unet.dispatch.select = spy
    try:
        y = model(x, t)
    finally:
        fast_unet.dispatch.select = orig
    assert {op for op, _ in calls} == set(fast_unet.dispatch.OPS)
    assert {b for _, b in calls} == {"triton"}, calls
    assert_matches_reference(model, ref, y, x, t)


@pytest.mark.parametrize("op", ["group_norm_relu", "attention", "time_embedding"])
def test_custom_op_registration(op):
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration, AOT-dispatch tracing."""
    import fast_unet.triton_ops  # noqa: F401  (registers the ops)

    if op == "group_norm_relu":
        x = torch.randn(2, 64, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
        args = (x, torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True), 1e-5,
                torch.randn(2, 64, requires_grad=True))
    elif op == "attention":
        args = (torch.randn(2, 20, 3, 4, 16, requires_grad=True),)
    else:
        args = (torch.tensor([1, 7]), 32, torch.randn(48, 32, requires_grad=True), torch.randn(48, requires_grad=True),
                torch.randn(16, 32, requires_grad=True), torch.randn(16, requires_grad=True))
    torch.library.opcheck(getattr(torch.ops.fast_unet, op).default, args)
