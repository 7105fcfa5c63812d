"""The GPU path as people run it (skipped without CUDA; run by scripts/gpu_check.py): a float32 model under
``torch.autocast`` (bf16, fp16), a bf16 and an fp16 model's forward and backward, NCHW and channels_last
inputs, the 1x1 bottleneck of an 8x8 input, and a model on a second GPU while the first is current. Each
against eager in the same precision, judged by the flash-attention rule (at most twice eager's error
against the float32 model, plus a floor)."""
import pytest
import torch

from helpers import model_pair

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FLOOR = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def compiled_backends(monkeypatch):
    """The automatic choice, compiled Triton; the float32 references are exact (tests/conftest.py turns TF32 off)."""
    if __import__("os").environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("GPU tests run with TRITON_INTERPRET unset")
    monkeypatch.setenv("FAST_UNET_BACKEND", "auto")


def _rule(name, out, out_eager, ref, dtype):
    err = (out.double() - ref.double()).abs().max().item()
    err_eager = (out_eager.double() - ref.double()).abs().max().item()
    floor = FLOOR[dtype] * max(ref.abs().max().item(), 1e-3)
    assert torch.isfinite(out).all(), name
    assert err <= 2 * err_eager + floor, f"{name}: error {err:.3g} > 2 x eager's {err_eager:.3g} + {floor:.3g}"


def _run(model, x, t, g, dtype, autocast):
    """(output, {param: grad}) of one forward and backward, in ``dtype`` (autocast: float32 weights)."""
    model.zero_grad(set_to_none=True)
    if autocast:
        with torch.autocast("cuda", dtype=dtype):
            y = model(x, t)
    else:
        y = model(x.to(dtype), t)
    (y.float() * g).sum().backward()
    return y, {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("size", [8, 32], ids=["8x8 (1x1 bottleneck)", "32x32"])
@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "cast model"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_model_low_precision_forward_backward(monkeypatch, dtype, autocast, fmt, size):
    model, _ = model_pair(size)
    model = model.cuda()
    x = torch.randn(3, 3, size, size, device="cuda")
    if fmt == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (3,), device="cuda")
    g = torch.randn(3, 3, size, size, device="cuda")
    monkeypatch.setenv("FAST_UNET_BACKEND", "eager")
    y32, grads32 = _run(model, x, t, g, torch.float32, False)
    low = model if autocast else model.to(dtype)
    y_eager, grads_eager = _run(low, x, t, g, dtype, autocast)
    monkeypatch.setenv("FAST_UNET_BACKEND", "auto")
    y, grads = _run(low, x, t, g, dtype, autocast)
    assert y.dtype == y_eager.dtype == dtype
    _rule("output", y, y_eager, y32, dtype)
    for name in grads:
        _rule(f"grad {name}", grads[name], grads_eager[name], grads32[name], dtype)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_model_on_the_second_gpu():
    """A model on cuda:1 while cuda:0 is current: every launch runs on cuda:1 (the device guard)."""
    model, _ = model_pair(16)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 700])
    torch.cuda.set_device(0)
    y0 = model.to("cuda:0")(x.cuda(0), t.cuda(0))
    y1 = model.to("cuda:1")(x.cuda(1), t.cuda(1))
    y1.sum().backward()
    assert y1.device == torch.device("cuda:1")
    torch.testing.assert_close(y1.cpu(), y0.cpu(), atol=1e-5, rtol=1e-5)
