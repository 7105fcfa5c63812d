"""GPU-only checks of the Triton backend (skipped without CUDA; nothing is asked of the GPU at import).

The whole UNet at B=64, 64x64, bfloat16 against the reference, gradients, and torch.compile over the
custom ops, each with every op fused (``FAST_UNET_BACKEND=auto``) and with the fused ops on their eager
twins (``UNFUSED``, as bench/kernels.py). Run by scripts/gpu_check.py. Kernel parity at the model's full
sizes is in tests/ops/ (the ``triton-cuda`` backend).
"""
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# the fused model path, and the same model with the fused ops on their eager twins (bench/kernels.py UNFUSED)
SETTINGS = {"fused": "auto",
            "unfused": "triton,conv3x3=eager,gn_relu_maxpool=eager,upsample2x=eager,gn_ln_linear=eager,mlp_residual=eager"}


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("GPU tests run with TRITON_INTERPRET unset")
    monkeypatch.setenv("FAST_UNET_BACKEND", "triton")
    torch.manual_seed(0)


def _models(h):
    """(fast_unet.UNet, reference) on CUDA, float32, with the same weights."""
    import fast_unet
    from fast_unet.reference import make_reference

    ref = make_reference(h, need_weights=False).cuda()
    model = fast_unet.UNet().cuda()
    model.load_state_dict(ref.state_dict())
    return model, ref


@pytest.mark.parametrize("fused", list(SETTINGS))
def test_unet_b64_64x64_bf16_forward(monkeypatch, fused):
    """The whole model at B=64, 64x64, bf16 (Triton backend) vs the float32 reference; the bound is the
    error of the same bf16 model on the eager backend (the reference itself cannot run in bf16: its
    time encoding is float32)."""
    monkeypatch.setenv("FAST_UNET_BACKEND", SETTINGS[fused])
    torch.manual_seed(0)
    model, ref32 = _models(64)
    model = model.bfloat16()
    x = torch.randn(64, 3, 64, 64, device="cuda")
    t = torch.randint(0, 1000, (64,), device="cuda")
    with torch.no_grad():
        y = model(x.bfloat16(), t)
        monkeypatch.setenv("FAST_UNET_BACKEND", "eager")
        y_eager = model(x.bfloat16(), t)
        y32 = ref32(x, t)
    assert y.shape == (64, 3, 64, 64) and y.dtype == torch.bfloat16
    err = (y.float() - y32).abs().max().item()
    err_eager = (y_eager.float() - y32).abs().max().item()
    assert err <= 2 * err_eager + 1e-2 * y32.abs().max().item(), (err, err_eager)


@pytest.mark.parametrize("fused", list(SETTINGS))
def test_unet_gradients_float32(monkeypatch, fused):
    monkeypatch.setenv("FAST_UNET_BACKEND", SETTINGS[fused])
    model, ref = _models(32)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    t = torch.randint(0, 1000, (4,), device="cuda")
    y, y_ref = model(x, t), ref(x, t)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-3)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    refp = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        r = refp[name].grad
        assert (p.grad - r).abs().max().item() <= 1e-3 * r.abs().max().item() + 1e-6, name


def test_torch_compile_over_custom_ops():
    """Dynamo + AOTAutograd trace the custom ops through their fake and autograd registrations
    (``aot_eager``: the same tracing as inductor without its code generation, which would take minutes)."""
    import fast_unet

    model, _ = _models(16)
    x = torch.randn(2, 3, 16, 16, device="cuda")
    t = torch.tensor([1, 500], device="cuda")
    eager_out = model(x, t)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x, t)
    torch.testing.assert_close(out, eager_out, atol=1e-4, rtol=1e-3)
    out.sum().backward()
    assert fast_unet.dispatch.select("attention", torch.randn(1, 8, 3, 4, 16, device="cuda"))[0] == "triton"
