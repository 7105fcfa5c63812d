"""GroupNorm(1, C) + ReLU + emb: the Triton kernels vs eager and float64 (forward and gradients)."""
import pytest
import torch

import fast_unet
from fast_unet import eager, ops
from helpers import assert_close_rule

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, C, H, W), odd on purpose: batch 1 and 3, every channel count of the model, H*W not a tile multiple.
SHAPES = [(3, 64, 12, 12), (1, 128, 5, 7), (3, 256, 4, 4), (1, 512, 3, 3)]


def _inputs(shape, dtype, channels_last, with_emb=True):
    b, c = shape[:2]
    # inputs shifted away from zero, so the mean matters (apex's trick)
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.7
    w = torch.randn(c, dtype=torch.float64) * 0.5 + 1.0
    bias = torch.randn(c, dtype=torch.float64) * 0.5
    emb = torch.randn(b, 2 * c, dtype=torch.float64)[:, c // 2: c // 2 + c] if with_emb else None  # strided view
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, w, bias, emb


def _run(fn, x, w, bias, emb, dtype, dy):
    """fn's output and the gradients of (out * dy).sum() wrt x, w, bias, emb, all computed in dtype."""
    leaves = [t.to(dtype).detach().requires_grad_() if t is not None else None for t in (x, w, bias, emb)]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        leaves[0] = leaves[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    out = fn(leaves[0], leaves[1], leaves[2], 1e-5, leaves[3])
    (out.double() * dy).sum().backward()
    return out, [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward_vs_eager_and_float64(shape, channels_last, dtype):
    x, w, bias, emb = _inputs(shape, dtype, channels_last)
    x = x.to(dtype).double()  # the same (rounded) inputs for all three
    w, bias, emb = (t.to(dtype).double() for t in (w, bias, emb))
    dy = torch.randn(shape, dtype=torch.float64)
    out, grads = _run(ops.group_norm_relu, x, w, bias, emb, dtype, dy)
    out_e, grads_e = _run(eager.group_norm_relu, x, w, bias, emb, dtype, dy)
    ref, grads_r = _run(eager.group_norm_relu, x, w, bias, emb, torch.float64, dy)
    assert out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close_rule("y", out, out_e, ref, dtype)
    for name, g, ge, gr in zip(("dx", "dweight", "dbias", "demb"), grads, grads_e, grads_r):
        assert g.dtype == dtype, name
        assert_close_rule(name, g, ge, gr, dtype)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_statistics_split_over_programs(channels_last):
    """A sample big enough that the stats and backward reductions use several HW splits (S > 1)."""
    from fast_unet.kernels import group_norm as K

    shape = (2, 64, 48, 48) if not channels_last else (2, 64, 20, 20)
    c, hw = shape[1], shape[2] * shape[3]
    bc, bhw = K.tile_config(c, hw, channels_last)
    assert K._split(hw, bhw, c // bc)[0] > 1, "the shape must exercise the multi-split path"
    x, w, bias, emb = _inputs(shape, torch.float32, channels_last)
    x = x + 100.0  # a large mean: a naive sum-of-squares variance would lose precision here
    dy = torch.randn(shape, dtype=torch.float64)
    out, grads = _run(ops.group_norm_relu, x, w, bias, emb, torch.float32, dy)
    out_e, grads_e = _run(eager.group_norm_relu, x, w, bias, emb, torch.float32, dy)
    ref, grads_r = _run(eager.group_norm_relu, x, w, bias, emb, torch.float64, dy)
    assert_close_rule("y", out, out_e, ref, torch.float32)
    for name, g, ge, gr in zip(("dx", "dweight", "dbias", "demb"), grads, grads_e, grads_r):
        assert_close_rule(name, g, ge, gr, torch.float32)


def test_without_emb():
    x, w, bias, _ = _inputs((3, 64, 6, 6), torch.float32, True, with_emb=False)
    x, w, bias = x.float().requires_grad_(), w.float().requires_grad_(), bias.float().requires_grad_()
    out = ops.group_norm_relu(x, w, bias, 1e-5, None)
    ref = eager.group_norm_relu(x.double(), w.double(), bias.double(), 1e-5, None)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    dy = torch.randn_like(out)
    gx, gw = torch.autograd.grad((out * dy).sum(), (x, w))
    rx, rw = torch.autograd.grad((eager.group_norm_relu(x, w, bias, 1e-5, None) * dy).sum(), (x, w))
    torch.testing.assert_close(gx, rx, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw, rw, atol=1e-4, rtol=1e-4)


def test_backward_with_non_matching_grad_layout():
    """dy in NCHW while x is channels_last (what autograd may hand over): the kernel re-lays it out."""
    x, w, bias, emb = _inputs((1, 64, 5, 5), torch.float32, True)
    x, w, bias, emb = (t.float().requires_grad_() for t in (x, w, bias, emb))
    out = ops.group_norm_relu(x, w, bias, 1e-5, emb)
    dy = torch.randn(out.shape)  # NCHW
    g = torch.autograd.grad(out, x, dy)[0]
    r = torch.autograd.grad(eager.group_norm_relu(x, w, bias, 1e-5, emb), x, dy)[0]
    torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_bad_inputs_name_the_argument(monkeypatch):
    x = torch.randn(2, 64, 4, 4)
    w, b = torch.ones(64), torch.zeros(64)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ops.group_norm_relu(x, torch.ones(32), b)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        ops.group_norm_relu(x, w, torch.zeros(65))
    with pytest.raises(RuntimeError, match=r"emb must have shape \(2, 64\)"):
        ops.group_norm_relu(x, w, b, 1e-5, torch.zeros(2, 32))
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        ops.group_norm_relu(torch.randn(2, 64, 16), w, b)
    with pytest.raises(RuntimeError, match="x must be NCHW-contiguous or channels_last"):
        ops.group_norm_relu(x[:, :, ::2], w, b)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16, got torch.float64"):
        ops.group_norm_relu(x.double(), w.double(), b.double())
    # the launcher itself validates too
    from fast_unet.kernels.group_norm import group_norm_relu_fwd

    with pytest.raises(ValueError, match="weight must have shape"):
        group_norm_relu_fwd(x, torch.ones(3), b, 1e-5)
    # auto mode falls back to eager for what the kernel cannot take, and says why
    monkeypatch.setenv("FAST_UNET_BACKEND", "auto")
    xs = x[:, :, ::2]
    assert fast_unet.dispatch.select("group_norm_relu", xs, w, b, 1e-5, None)[0] != "triton"
    torch.testing.assert_close(ops.group_norm_relu(xs, w, b), eager.group_norm_relu(xs, w, b, 1e-5))
