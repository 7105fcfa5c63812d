"""The Triton 3x3 conv (implicit GEMM, NHWC) with GroupNorm statistics in its epilogue, and the optional
fused conv + GroupNorm + ReLU + emb path (FAST_UNET_FUSED_CONV=1): vs eager and float64."""
import pytest
import torch
import torch.nn.functional as F

import fast_unet
from fast_unet import eager
from fast_unet.reference import make_reference
from interpret_rules import assert_close_rule, assert_param_grads_close

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, C_in, C_out, H, W): odd channel counts and sizes, batch 1 and 3, tiles with masked rows and columns.
# In half precision H*W <= 64 takes the 64-row "small_hw" config, larger ones the 128-row configs with
# BLOCK_K 16 (C_in < 32) or 32: each of them is here.
SHAPES = [(3, 3, 64, 8, 8), (1, 5, 96, 5, 7), (3, 64, 64, 16, 8), (1, 64, 96, 5, 7), (1, 5, 64, 9, 11)]
_id = lambda s: "x".join(map(str, s))  # noqa: E731


def _inputs(shape, dtype, with_emb=True):
    """float64 tensors holding values representable in ``dtype`` (the same inputs for every path)."""
    b, ci, co, h, w = shape
    x = torch.randn(b, ci, h, w, dtype=torch.float64) + 0.3
    wt = torch.randn(co, ci, 3, 3, dtype=torch.float64) / (3 * ci ** 0.5)
    bias = torch.randn(co, dtype=torch.float64) * 0.5 + 0.2
    gw = torch.randn(co, dtype=torch.float64) * 0.5 + 1.0
    gb = torch.randn(co, dtype=torch.float64) * 0.5
    emb = torch.randn(b, 2 * co, dtype=torch.float64)[:, co // 2: co // 2 + co] if with_emb else None  # strided
    return [t.to(dtype).double() if t is not None else None for t in (x, wt, bias, gw, gb, emb)]


def _leaves(tensors, dtype):
    out = [t.to(dtype).detach().requires_grad_() if t is not None else None for t in tensors]
    out[0] = out[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_conv_output_and_partial_statistics(shape, dtype):
    from kernels import conv as K
    from kernels import group_norm as G

    x, wt, bias = _inputs(shape, dtype)[:3]
    y, partials = K.conv3x3_stats(x.to(dtype).contiguous(memory_format=torch.channels_last), wt.to(dtype),
                                  bias.to(dtype))
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x, wt, bias, padding=1)
    eag = F.conv2d(x.to(dtype), wt.to(dtype), bias.to(dtype), padding=1)
    assert_close_rule("conv", y, eag, ref, dtype)
    # padding edges on their own: first/last rows and columns
    for sl in ((slice(None), slice(None), 0), (slice(None), slice(None), -1), (Ellipsis, 0), (Ellipsis, -1)):
        assert_close_rule("conv edge", y[sl], eag[sl], ref[sl], dtype)
    # the partials: count per sample is C_out*H*W, and combined they give var_mean of y as stored
    b, _, co, h, w = shape
    assert partials.shape[0] == b and partials.shape[2] == 3
    torch.testing.assert_close(partials[:, :, 0].sum(1), torch.full((b,), float(co * h * w)))
    mean = torch.empty(b)
    rstd = torch.empty(b)
    G._gn_combine_kernel[(b,)](partials, mean, rstd, partials.shape[1], 1e-5, BLOCK_P=128)
    var_r, mean_r = torch.var_mean(y.double().reshape(b, -1), dim=1, correction=0)
    scale = y.double().abs().max().item()
    torch.testing.assert_close(mean.double(), mean_r, atol=1e-6 * scale, rtol=1e-5)
    torch.testing.assert_close(rstd.double(), 1 / torch.sqrt(var_r + 1e-5), atol=0, rtol=1e-5)


def _eager_fused(x, wt, bias, gw, gb, eps, emb):
    return eager.group_norm_relu(F.conv2d(x, wt, bias, padding=1), gw, gb, eps, emb)


def _run(fn, tensors, dtype, dy):
    leaves = _leaves(tensors, dtype)
    x, wt, bias, gw, gb, emb = leaves
    out = fn(x, wt, bias, gw, gb, 1e-5, emb)
    (out.double() * dy).sum().backward()
    return out, [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], (3, 64, 96, 5, 7)], ids=_id)
def test_fused_conv_gn_relu_forward_and_gradients(shape, dtype):
    from fast_unet import triton_ops

    tensors = _inputs(shape, dtype)
    b, _, co, h, w = shape
    dy = torch.randn(b, co, h, w, dtype=torch.float64)
    if dtype != torch.float32:
        # A pre-ReLU value within a rounding of 0 flips the ReLU mask under any half-precision rounding of
        # the conv output (eager's too, by luck elsewhere): one flip costs |dy * x_hat| in d gn_weight.
        # No gradient flows from those elements, so the comparison measures the kernels, not the coin.
        x, wt, bias, gw, gb, _ = tensors
        y64 = F.conv2d(x, wt, bias, padding=1)
        var, mean = torch.var_mean(y64.reshape(b, -1), dim=1, correction=0)
        z = (y64 - mean.view(-1, 1, 1, 1)) * torch.rsqrt(var + 1e-5).view(-1, 1, 1, 1) * gw.view(1, -1, 1, 1) \
            + gb.view(1, -1, 1, 1)
        dy = torch.where(z.abs() < 0.05, 0.0, dy)
    out, grads = _run(triton_ops.conv3x3_gn_relu, tensors, dtype, dy)
    out_e, grads_e = _run(_eager_fused, tensors, dtype, dy)
    ref, grads_r = _run(_eager_fused, tensors, torch.float64, dy)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert_close_rule("y", out, out_e, ref, dtype)
    for name, g, ge, gr in zip(("dx", "dweight", "dbias", "dgn_weight", "dgn_bias", "demb"), grads, grads_e, grads_r):
        assert g.dtype == dtype, name
        assert_close_rule(name, g, ge, gr, dtype)


def test_conv_gn_stats_op_and_its_gradient():
    from fast_unet import triton_ops

    x, wt, bias = (t.float() for t in _inputs((1, 5, 64, 5, 7), torch.float32)[:3])
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    wt.requires_grad_()
    bias.requires_grad_()
    y, mean, rstd = triton_ops.conv3x3_gn_stats(x, wt, bias, 1e-5)
    assert not mean.requires_grad and not rstd.requires_grad
    ref = F.conv2d(x, wt, bias, padding=1)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    v, m = torch.var_mean(ref.detach().reshape(1, -1), dim=1, correction=0)
    torch.testing.assert_close(mean, m, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rstd, 1 / torch.sqrt(v + 1e-5), atol=0, rtol=1e-5)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, wt, bias), g)
    exp = torch.autograd.grad(ref, (x, wt, bias), g)
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("op", ["conv3x3_gn_stats", "conv3x3_gn_relu"])
def test_custom_op_registration(op):
    import fast_unet.triton_ops  # noqa: F401

    x = torch.randn(2, 5, 5, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(64, 5, 3, 3, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    if op == "conv3x3_gn_stats":
        args = (x, w, b, 1e-5)
    else:
        args = (x, w, b, torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True), 1e-5,
                torch.randn(2, 64, requires_grad=True))
    torch.library.opcheck(getattr(torch.ops.fast_unet, op).default, args)


def test_bad_inputs_and_switch(monkeypatch):
    from kernels import conv as K

    x = torch.randn(2, 5, 4, 4)
    with pytest.raises(ValueError, match=r"weight must have shape \(C_out, 5, 3, 3\)"):
        K.conv3x3_stats(x, torch.randn(8, 4, 3, 3), torch.randn(8))
    with pytest.raises(ValueError, match="bias must have shape"):
        K.conv3x3_stats(x, torch.randn(8, 5, 3, 3), torch.randn(7))
    with pytest.raises(TypeError, match="weight has dtype"):
        K.conv3x3_stats(x, torch.randn(8, 5, 3, 3).double(), torch.randn(8))
    args = (x, torch.randn(8, 5, 3, 3), torch.randn(8), torch.ones(8), torch.zeros(8), 1e-5, None)
    monkeypatch.delenv("FAST_UNET_FUSED_CONV", raising=False)
    assert fast_unet.dispatch.fused("conv3x3_gn_relu", *args) is None  # off by default
    monkeypatch.setenv("FAST_UNET_FUSED_CONV", "1")
    assert fast_unet.dispatch.fused("conv3x3_gn_relu", *args) is not None
    assert fast_unet.dispatch.fused("conv3x3_gn_relu", x, torch.randn(8, 5, 1, 1), *args[2:]) is None
    monkeypatch.setenv("FAST_UNET_BACKEND", "eager")
    assert fast_unet.dispatch.fused("conv3x3_gn_relu", *args) is None
    monkeypatch.setenv("FAST_UNET_FUSED_CONV", "yes")
    with pytest.raises(ValueError, match="FAST_UNET_FUSED_CONV"):
        fast_unet.dispatch.fused_conv_enabled()


def test_unet_with_fused_conv_matches_reference(monkeypatch):
    monkeypatch.setenv("FAST_UNET_FUSED_CONV", "1")
    torch.manual_seed(0)
    ref = make_reference(16)
    model = fast_unet.UNet()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3, 517])
    fast_unet.dispatch.last_choice.clear()
    calls = []
    orig = fast_unet.ops.group_norm_relu
    monkeypatch.setattr(fast_unet.ops, "group_norm_relu", lambda *a: calls.append(1) or orig(*a))
    y = model(x, t)
    assert not calls, "with FAST_UNET_FUSED_CONV=1 every DoubleConv must take the fused path"
    assert fast_unet.dispatch.last_choice["conv3x3_gn_relu"] == "triton"
    y_ref = ref(x, t)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert_param_grads_close(model, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_read_through_its_strides(dtype):
    """The kernel reads the weight in place: channels_last (the model's, K-contiguous), NCHW and a
    non-contiguous view all give the same conv."""
    from kernels import conv as K

    x, wt, bias = (t.to(dtype) for t in _inputs((1, 64, 96, 5, 7), dtype)[:3])
    x = x.contiguous(memory_format=torch.channels_last)
    base = K.conv3x3_stats(x, wt.contiguous(), bias)[0]
    cl = K.conv3x3_stats(x, wt.contiguous(memory_format=torch.channels_last), bias)[0]
    view = torch.stack([wt, wt], 1)[:, 0]  # wt again, with stride 2 * 9 * C_in on dim 0
    assert not view.is_contiguous() and torch.equal(view, wt)
    strided = K.conv3x3_stats(x, view, bias)[0]
    torch.testing.assert_close(cl, base, atol=0, rtol=0)
    torch.testing.assert_close(strided, base, atol=0, rtol=0)
