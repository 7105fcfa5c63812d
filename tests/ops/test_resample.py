"""gn_relu_maxpool and upsample2x, the resampling passes of the model's one forward: the normalise + 2x2
max-pool pass and the (normalise-on-load +) bilinear 2x upsample.

The Triton kernels (kernels/resample.py) through the dispatched ops against eager and float64 (the
flash-attention rule), forward and gradients, three dtypes, odd sizes, under the interpreter; opcheck of
the custom ops; bad inputs. The extension has no implementation of them.

The parity tests through the dispatched op run on every CPU backend (eager, ext: skipped, it has no
implementation, triton under the interpreter); the kernel-level tests on triton only.
"""
import pytest
import torch
import torch.nn.functional as F

from fast_unet import eager
from helpers import assert_close_rule, partials_of


# ---------------------------------------------------------------------------------------------------
# the Triton kernels under the interpreter (CPU tensors); the dispatched-op parity tests on eager too

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _leaves(tensors, dtype):
    return [t.to(dtype).detach().requires_grad_() for t in tensors]


def _norm_inputs(b, c, h, w, dtype):
    y = ((torch.randn(b, c, h, w, dtype=torch.float64) * 1.5 + 0.4).to(dtype).double())
    gw = (torch.randn(c, dtype=torch.float64) * 0.5 + 1).to(dtype).double()
    gb = (torch.randn(c, dtype=torch.float64) * 0.5).to(dtype).double()
    return y, gw, gb


def _run(fn, tensors, dtype, grads_out):
    leaves = _leaves(tensors, dtype)
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    sum(((o.double() * g).sum() for o, g in zip(outs, grads_out))).backward()
    return outs, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 5, 2, 2), (3, 72, 6, 10), (2, 64, 16, 8)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.op("gn_relu_maxpool")
@pytest.mark.backends("eager", "ext", "triton")
@pytest.mark.usefixtures("backend")
def test_gn_relu_maxpool(shape, dtype):
    """One pass writes relu(GroupNorm(y)) (the skip connection) and its 2x2 max-pool; gradients flow back
    through both outputs into y and the norm's affine."""
    from fast_unet import ops

    b, c, h, w = shape
    _, gw, gb = _norm_inputs(b, c, h, w, dtype)
    # Each 2x2 window holds four values 0.3 apart (in random order) around its own base: a max-pool's
    # gradient goes to the window's maximum, and two values within a rounding of each other would make
    # that choice a coin toss in half precision (for eager as for the kernel).
    base = torch.randn(b, c, h // 2, w // 2, dtype=torch.float64) * 1.5 + 0.4
    offs = torch.rand(b, c, h // 2, w // 2, 4).argsort(-1).double() * 0.3
    offs = offs.view(b, c, h // 2, w // 2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)
    y = (base.repeat_interleave(2, 2).repeat_interleave(2, 3) + offs).to(dtype).double()
    partials = partials_of(y.to(dtype), 3)
    g_x = torch.randn(b, c, h, w, dtype=torch.float64)
    g_p = torch.randn(b, c, h // 2, w // 2, dtype=torch.float64)

    def fused(y, gw, gb):
        return ops.gn_relu_maxpool(y.contiguous(memory_format=torch.channels_last), partials, gw, gb, 1e-5)

    def unfused(y, gw, gb):
        x = eager.group_norm_relu(y, gw, gb, 1e-5)
        return x, F.max_pool2d(x, 2)

    (x, p), grads = _run(fused, [y, gw, gb], dtype, (g_x, g_p))
    (x_e, p_e), grads_e = _run(unfused, [y, gw, gb], dtype, (g_x, g_p))
    (x_r, p_r), grads_r = _run(unfused, [y, gw, gb], torch.float64, (g_x, g_p))
    assert x.is_contiguous(memory_format=torch.channels_last) and p.is_contiguous(memory_format=torch.channels_last)
    assert_close_rule("x", x, x_e, x_r, dtype)
    assert_close_rule("pooled", p, p_e, p_r, dtype)
    assert torch.equal(p, F.max_pool2d(x, 2)), "the pooled output must be the max-pool of the written x"
    for name, g, ge, gr in zip(("dy", "dgn_weight", "dgn_bias"), grads, grads_e, grads_r):
        assert g.dtype == dtype
        assert_close_rule(name, g, ge, gr, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lazy", [False, True], ids=["plain", "normalise_on_load"])
@pytest.mark.parametrize("shape", [(1, 5, 1, 1), (2, 72, 3, 5), (2, 64, 8, 8)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.op("upsample2x")
@pytest.mark.backends("eager", "ext", "triton")
def test_upsample2x(backend, shape, lazy, dtype):
    from fast_unet import ops

    b, c, h, w = shape
    y, gw, gb = _norm_inputs(b, c, h, w, dtype)
    partials = partials_of(y.to(dtype), 2)
    g = torch.randn(b, c, 2 * h, 2 * w, dtype=torch.float64)
    up = lambda v: F.interpolate(v, scale_factor=2, mode="bilinear", align_corners=True)  # noqa: E731
    if lazy:
        def fused(y, gw, gb):
            return ops.upsample2x(y.contiguous(memory_format=torch.channels_last), (partials, gw, gb, 1e-5))

        def unfused(y, gw, gb):
            return up(eager.group_norm_relu(y, gw, gb, 1e-5))
        tensors, names = [y, gw, gb], ("dy", "dgn_weight", "dgn_bias")
    else:
        fused = ops.upsample2x  # noqa: E731  (NCHW input: read through its strides)
        unfused = up
        tensors, names = [y], ("dx",)
    (out,), grads = _run(fused, tensors, dtype, (g,))
    (out_e,), grads_e = _run(unfused, tensors, dtype, (g,))
    (ref,), grads_r = _run(unfused, tensors, torch.float64, (g,))
    assert out.shape == (b, c, 2 * h, 2 * w)
    if backend.name.startswith("triton"):  # the kernel writes channels_last (eager keeps a 1x1 input's NCHW)
        assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_rule("upsampled", out, out_e, ref, dtype)
    for name, gr_, ge, gref in zip(names, grads, grads_e, grads_r):
        assert_close_rule(name, gr_, ge, gref, dtype)


@pytest.mark.parametrize("op", ["gn_relu_maxpool", "upsample2x", "upsample2x_norm"])
@pytest.mark.op("gn_relu_maxpool", "upsample2x")
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_custom_op_registration(op):
    import fast_unet.ops  # noqa: F401  (registers the custom ops)

    y = torch.randn(2, 6, 4, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    gw, gb = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    partials = partials_of(y, 2)
    if op == "gn_relu_maxpool":
        args = (y, partials, gw, gb, 1e-5)
    elif op == "upsample2x":
        args = (y, None, None, None, 0.0)
    else:
        op, args = "upsample2x", (y, partials, gw, gb, 1e-5)
    torch.library.opcheck(getattr(torch.ops.fast_unet, op).default, args)


@pytest.mark.op("gn_relu_maxpool", "upsample2x")
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_bad_inputs_name_the_argument():
    from fast_unet.kernels import resample as R

    y = torch.randn(2, 6, 4, 6)
    ok = (partials_of(y, 2), torch.ones(6), torch.zeros(6), 1e-5)
    with pytest.raises(ValueError, match="height and width must be even"):
        R.gn_relu_maxpool(torch.randn(2, 6, 5, 6), *ok)
    with pytest.raises(ValueError, match="partials must be float32"):
        R.gn_relu_maxpool(y, ok[0].double(), *ok[1:])
    with pytest.raises(ValueError, match=r"gn_weight must have shape \(6,\)"):
        R.upsample2x(y, (ok[0], torch.ones(5), ok[2], 1e-5))
    with pytest.raises(TypeError, match="gn_bias"):
        R.upsample2x(y, (ok[0], ok[1], torch.zeros(6, dtype=torch.float16), 1e-5))
    with pytest.raises(ValueError, match="x must be a 4-D tensor"):
        R.upsample2x(torch.randn(6, 4, 6))
    with pytest.raises(TypeError, match="x must be float32"):
        R.upsample2x(torch.randn(2, 6, 4, 6).double())
