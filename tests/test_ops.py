"""fast_unet's ops (through the dispatcher) against float64 formulas written out by hand.

The Triton and C++ implementations of these ops are held to the same formulas in
tests/interpret/ (Triton, under TRITON_INTERPRET=1) and tests/test_ext_*.py (the extension).
"""
import math

import pytest
import torch

from fast_unet import ops

from helpers import assert_close


@pytest.fixture(params=["eager", "ext", "auto"], autouse=True)
def backend(request, monkeypatch):
    """Every test here runs on each CPU backend; a backend that cannot take the input is skipped with
    its reason (the extension, say, when it is not built or for float64)."""
    monkeypatch.setenv("FAST_UNET_BACKEND", request.param)
    return request.param


def run(fn, *args):
    try:
        return fn(*args)
    except RuntimeError as e:
        if "cannot run" in str(e):
            pytest.skip(str(e))
        raise


def gn_relu_formula(x, w, b, eps, emb):
    x = x.double()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    var = x.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    y = torch.relu((x - mean) / torch.sqrt(var + eps) * w.double()[:, None, None] + b.double()[:, None, None])
    return y if emb is None else y + emb.double()[:, :, None, None]


def attention_formula(qkv):
    b, n, _, h, d = qkv.shape
    q, k, v = qkv.double().permute(2, 0, 3, 1, 4)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (p @ v).transpose(1, 2).reshape(b, n, h * d)


@pytest.mark.parametrize("shape", [(1, 64, 8, 8), (3, 128, 5, 7), (2, 512, 4, 4), (2, 256, 16, 16)])
@pytest.mark.parametrize("with_emb", [False, True])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_relu(shape, with_emb, channels_last):
    x = torch.randn(shape) + 20  # mean 20x the spread: catches E[x^2] - E[x]^2 (PyTorch's own fails here)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    emb = torch.randn(shape[0], shape[1]) if with_emb else None
    out = run(ops.group_norm_relu, x, w, b, 1e-5, emb)
    assert_close(out, gn_relu_formula(x, w, b, 1e-5, emb), atol=1e-5, rtol=1e-5, what="group_norm_relu")


@pytest.mark.parametrize("b,n,h,d", [(1, 64, 4, 16), (3, 100, 4, 32), (2, 37, 4, 64)])
def test_attention(b, n, h, d):
    qkv = torch.randn(b, n, 3, h, d)
    out = run(ops.attention, qkv)
    assert out.shape == (b, n, h * d)
    assert_close(out, attention_formula(qkv), atol=1e-5, rtol=1e-4, what="attention")


def test_attention_reads_a_strided_view():
    """The op takes the in_proj output viewed (B, N, 3, h, d), not a contiguous copy."""
    flat = torch.randn(2, 50, 3 * 64)
    qkv = flat.view(2, 50, 3, 4, 16)
    assert_close(run(ops.attention, qkv), attention_formula(qkv), atol=1e-5, rtol=1e-4, what="view")
    padded = torch.randn(2, 50, 3 * 64 + 8)[..., : 3 * 64].unflatten(-1, (3, 4, 16))  # non-contiguous rows
    assert_close(run(ops.attention, padded), attention_formula(padded), atol=1e-5, rtol=1e-4, what="strided")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("with_emb", [False, True])
def test_group_norm_relu_gradcheck_float64(channels_last, with_emb):
    x = (torch.randn(2, 6, 3, 5, dtype=torch.float64) * 2 + 3)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(2, 6, dtype=torch.float64, requires_grad=True) if with_emb else None
    args = (x, w, b, 1e-5) + ((emb,) if with_emb else ())
    run(ops.group_norm_relu, *args)  # skips a backend that cannot take float64
    assert torch.autograd.gradcheck(lambda *a: ops.group_norm_relu(*a), args)


@pytest.mark.parametrize("shape", [(3, 64, 5, 7), (2, 256, 8, 8)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_relu_gradients_float32_vs_float64(shape, channels_last):
    """Inputs with a mean 20x their spread: the uncentred backward formula would lose digits here."""
    x = torch.randn(shape) + 20
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b, emb, dy = torch.randn(shape[1]), torch.randn(shape[1]), torch.randn(shape[:2]), torch.randn(shape)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b, emb)]
    gold = [t.detach().double().requires_grad_(True) for t in (x, w, b, emb)]
    run(ops.group_norm_relu, leaves[0], leaves[1], leaves[2], 1e-5, leaves[3]).backward(dy)
    gn_relu_formula(*gold[:3], 1e-5, gold[3]).backward(dy.double())
    for name, got, want in zip(("x", "weight", "bias", "emb"), leaves, gold):
        scale = want.grad.abs().max().item()
        assert_close(got.grad, want.grad, atol=1e-5 * scale, rtol=1e-4, what=f"grad {name}")
