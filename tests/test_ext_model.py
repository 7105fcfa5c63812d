"""The whole fast_unet.UNet on the ext backend (FAST_UNET_BACKEND=ext) against fast_unet.reference."""
import pytest
import torch

from _ext_helpers import require_ext

require_ext()

import fast_unet  # noqa: E402
from fast_unet import dispatch  # noqa: E402
from fast_unet.reference import make_reference  # noqa: E402


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("batch", [1, 2])
def test_unet_ext_matches_reference_forward_and_gradients(monkeypatch, batch):
    monkeypatch.setenv("FAST_UNET_BACKEND", "ext")
    torch.manual_seed(0)
    ref = make_reference(32)
    fast = fast_unet.UNet()
    fast.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(batch, 3, 32, 32)
    t = torch.randint(1, 1000, (batch,))
    target = torch.randn(batch, 3, 32, 32)

    calls = []
    real_call = dispatch.call
    monkeypatch.setattr(dispatch, "call", lambda op, *a: calls.append(dispatch.select(op, *a)[0]) or real_call(op, *a))
    out = fast(x, t)
    assert set(calls) == {"ext"}, f"every op must run on ext, got {set(calls)}"
    out_ref = ref(x, t)
    assert rel_err(out, out_ref) < 1e-4, f"forward rel err {rel_err(out, out_ref):.3g}"

    torch.nn.functional.mse_loss(out, target).backward()
    torch.nn.functional.mse_loss(out_ref, target).backward()
    grads_ref = dict(ref.named_parameters())
    worst = max((rel_err(p.grad, grads_ref[name].grad), name) for name, p in fast.named_parameters())
    assert worst[0] < 1e-3, f"worst parameter gradient rel err {worst[0]:.3g} in {worst[1]}"
