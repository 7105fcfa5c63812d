"""group_norm_relu: relu(GroupNorm(1, C)(x)) (+ emb), every backend and each backend's own tests.

(a) every backend (eager, ext, triton under the interpreter, triton on CUDA) through the dispatched op
    against float64 formulas;
(b) the Triton kernels (kernels/group_norm.py) against eager and float64 under the flash-attention rule,
    their configs and bad inputs; at the model's full sizes on CUDA;
(c) the extension (csrc/): CPU kernels against eager and float64, opcheck, bad inputs, its dispatch;
    its CUDA kernels where a GPU and a CUDA build are.
"""
import pytest
import torch
import torch.nn.functional as F

import fast_unet
from fast_unet import dispatch, eager, ops
from helpers import assert_close, assert_close_rule, grads_in, run_or_skip

pytestmark = pytest.mark.op("group_norm_relu")


# ---------------------------------------------------------------------------------------------------
# (a) every backend, through the dispatched op, against float64 formulas written out by hand

def gn_relu_formula(x, w, b, eps, emb):
    x = x.double()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    var = x.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    y = torch.relu((x - mean) / torch.sqrt(var + eps) * w.double()[:, None, None] + b.double()[:, None, None])
    return y if emb is None else y + emb.double()[:, :, None, None]


@pytest.mark.parametrize("shape", [(1, 64, 8, 8), (3, 128, 5, 7), (2, 512, 4, 4), (2, 256, 16, 16)])
@pytest.mark.parametrize("with_emb", [False, True])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_relu(backend, shape, with_emb, channels_last):
    dev = backend.device
    x = torch.randn(shape) + 20  # mean 20x the spread: catches E[x^2] - E[x]^2 (PyTorch's own fails here)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    emb = torch.randn(shape[0], shape[1]) if with_emb else None
    x, w, b = x.to(dev), w.to(dev), b.to(dev)
    emb = emb.to(dev) if with_emb else None
    out = run_or_skip(ops.group_norm_relu, x, w, b, 1e-5, emb)
    assert_close(out, gn_relu_formula(x, w, b, 1e-5, emb), atol=1e-5, rtol=1e-5, what="group_norm_relu")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("with_emb", [False, True])
def test_group_norm_relu_gradcheck_float64(backend, channels_last, with_emb):
    dev = backend.device
    x = (torch.randn(2, 6, 3, 5, dtype=torch.float64) * 2 + 3).to(dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(6, dtype=torch.float64).to(dev).requires_grad_(True)
    b = torch.randn(6, dtype=torch.float64).to(dev).requires_grad_(True)
    emb = torch.randn(2, 6, dtype=torch.float64).to(dev).requires_grad_(True) if with_emb else None
    args = (x, w, b, 1e-5) + ((emb,) if with_emb else ())
    run_or_skip(ops.group_norm_relu, *args)  # skips a backend that cannot take float64
    assert torch.autograd.gradcheck(lambda *a: ops.group_norm_relu(*a), args)


@pytest.mark.parametrize("shape", [(3, 64, 5, 7), (2, 256, 8, 8)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_group_norm_relu_gradients_float32_vs_float64(backend, shape, channels_last):
    """Inputs with a mean 20x their spread: the uncentred backward formula would lose digits here."""
    x = torch.randn(shape) + 20
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b, emb, dy = torch.randn(shape[1]), torch.randn(shape[1]), torch.randn(shape[:2]), torch.randn(shape)
    x, w, b, emb, dy = (t.to(backend.device) for t in (x, w, b, emb, dy))
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b, emb)]
    gold = [t.detach().double().requires_grad_(True) for t in (x, w, b, emb)]
    run_or_skip(ops.group_norm_relu, leaves[0], leaves[1], leaves[2], 1e-5, leaves[3]).backward(dy)
    gn_relu_formula(*gold[:3], 1e-5, gold[3]).backward(dy.double())
    for name, got, want in zip(("x", "weight", "bias", "emb"), leaves, gold):
        scale = want.grad.abs().max().item()
        assert_close(got.grad, want.grad, atol=1e-5 * scale, rtol=1e-4, what=f"grad {name}")


# ---------------------------------------------------------------------------------------------------
# (b) the Triton kernels, under the interpreter (CPU tensors)

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
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
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
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
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


@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
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


@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_backward_with_non_matching_grad_layout():
    """dy in NCHW while x is channels_last (what autograd may hand over): the kernel re-lays it out."""
    x, w, bias, emb = _inputs((1, 64, 5, 5), torch.float32, True)
    x, w, bias, emb = (t.float().requires_grad_() for t in (x, w, bias, emb))
    out = ops.group_norm_relu(x, w, bias, 1e-5, emb)
    dy = torch.randn(out.shape)  # NCHW
    g = torch.autograd.grad(out, x, dy)[0]
    r = torch.autograd.grad(eager.group_norm_relu(x, w, bias, 1e-5, emb), x, dy)[0]
    torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
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


# (b) the Triton kernels on CUDA at the model's full sizes

# every (B, C, H, W) GroupNorm input of the UNet at 64x64 (B=8 to keep the float64 reference quick)
FULL_SHAPES = [(8, 64, 64, 64), (8, 128, 32, 32), (8, 256, 16, 16), (8, 256, 8, 8), (8, 512, 8, 8), (8, 64, 32, 32)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FULL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.backends("triton-cuda")
@pytest.mark.usefixtures("backend")
def test_group_norm_full_sizes(shape, dtype):
    from fast_unet import eager, ops

    b, c = shape[:2]
    x = (torch.randn(shape, device="cuda") * 1.5 + 0.7).to(dtype).contiguous(memory_format=torch.channels_last)
    w, bias = (torch.randn(c, device="cuda") * 0.5 + 1).to(dtype), (torch.randn(c, device="cuda") * 0.5).to(dtype)
    emb = torch.randn(b, c, device="cuda").to(dtype)
    dy = torch.randn(shape, device="cuda").to(dtype)
    inputs = (x, w, bias, 1e-5, emb)
    out, g = grads_in(ops.group_norm_relu, inputs, dtype, dy)
    out_e, g_e = grads_in(eager.group_norm_relu, inputs, dtype, dy)
    ref, g_r = grads_in(eager.group_norm_relu, inputs, torch.float64, dy.double())
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_rule("y", out, out_e, ref, dtype)
    for name, a, e, r in zip(("dx", "dw", "db", "demb"), g, g_e, g_r):
        assert_close_rule(name, a, e, r, dtype)


# ---------------------------------------------------------------------------------------------------
# (c) the extension, CPU

EPS = 1e-5


def make_inputs(b, c, h, w, fmt, with_emb, seed=0, dtype=torch.float32):
    """x, weight, bias, emb with no pre-ReLU value within 1e-3 of 0 (so fp32 and fp64 agree on the mask)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g, dtype=torch.float64) * 2 + 0.5
    weight = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(c, generator=g, dtype=torch.float64) * 0.3
    emb = torch.randn(b, c, generator=g, dtype=torch.float64) if with_emb else None
    z = F.group_norm(x, 1, weight, bias, EPS)
    rstd = 1 / (x.flatten(1).var(1, unbiased=False) + EPS).sqrt()
    near = z.abs() < 1e-3
    x = x + near * torch.where(z >= 0, 1.0, -1.0) * 3e-3 / (rstd[:, None, None, None] * weight[None, :, None, None])
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    x = cast(x).contiguous(memory_format=fmt)
    return x, cast(weight), cast(bias), cast(emb)


def reference64(x, weight, bias, emb):
    """Float64 autograd reference: outputs and gradients for a fixed upstream gradient."""
    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    e = emb.detach().double().requires_grad_() if emb is not None else None
    y = torch.relu(F.group_norm(leaves[0], 1, leaves[1], leaves[2], EPS))
    if e is not None:
        y = y + e[:, :, None, None]
    return y, leaves, e


EXT_SHAPES = [  # (B, C, H, W)
    (1, 64, 16, 16),
    (3, 128, 8, 8),
    (3, 256, 5, 7),  # odd spatial size: vector tails
    (1, 512, 4, 4),
    (3, 64, 32, 32),
]
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.mark.parametrize("shape", EXT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", list(FORMATS), ids=str)
@pytest.mark.parametrize("with_emb", [True, False], ids=["emb", "noemb"])
def test_ext_forward_backward_vs_eager_and_float64(ext_ops, shape, fmt, with_emb):
    x, w, b, emb = make_inputs(*shape, FORMATS[fmt], with_emb)
    y_ref, leaves, e_ref = reference64(x, w, b, emb)
    gy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y_ref.backward(gy)

    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    es = emb.clone().requires_grad_() if emb is not None else None
    y = ext_ops.group_norm_relu(xs, ws, bs, EPS, es)
    assert y.is_contiguous(memory_format=FORMATS[fmt]), "output must keep x's memory format"
    y_eager = eager.group_norm_relu(x, w, b, EPS, emb)
    assert_close(y, y_eager, rtol=1e-5, atol=1e-5, what="forward vs eager")
    assert_close(y, y_ref, rtol=1e-5, atol=1e-5, what="forward vs float64")

    y.backward(gy.float().contiguous(memory_format=FORMATS[fmt]))
    assert_close(xs.grad, leaves[0].grad, rtol=1e-4, atol=1e-5, what="dx")
    assert_close(ws.grad, leaves[1].grad, rtol=1e-4, atol=1e-4, what="dweight")
    assert_close(bs.grad, leaves[2].grad, rtol=1e-4, atol=1e-4, what="dbias")
    if emb is not None:
        assert_close(es.grad, e_ref.grad, rtol=1e-4, atol=1e-4, what="demb")



@pytest.mark.parametrize("shape", EXT_SHAPES + [(1, 3, 3, 5)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", list(FORMATS), ids=str)
@pytest.mark.parametrize("with_emb", [True, False], ids=["emb", "noemb"])
@pytest.mark.parametrize("params", ["float32", "bfloat16"], ids=["fp32-params", "bf16-params"])
def test_ext_bf16_vs_eager_and_float64(ext_ops, shape, fmt, with_emb, params):
    """bf16 activations with float32 parameters and emb (CPU autocast) or bf16 ones (a bf16 model): y and dx in
    bf16, the parameters' and emb's gradients in their own dtype, all within the flash-attention rule of eager
    PyTorch's own bf16 error (same rounded inputs, float64 reference)."""
    bf16, pdt = torch.bfloat16, getattr(torch, params)
    x, w, b, emb = make_inputs(*shape, FORMATS[fmt], with_emb)
    x, w, b = x.to(bf16), w.to(pdt), b.to(pdt)
    emb = emb.to(pdt) if emb is not None else None
    y_ref, leaves, e_ref = reference64(x, w, b, emb)
    gy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y_ref.backward(gy)
    grad = gy.to(bf16).contiguous(memory_format=FORMATS[fmt])

    def run(fn, dtype):
        xs, ws, bs = (t.detach().clone().to(dtype if t is not x else bf16).requires_grad_() for t in (x, w, b))
        es = emb.detach().clone().to(dtype).requires_grad_() if emb is not None else None
        y = fn(xs, ws, bs, EPS, es)
        y.backward(grad)
        return y, (xs.grad, ws.grad, bs.grad, es.grad if es is not None else None)

    y, grads = run(ext_ops.group_norm_relu, pdt)
    y_e, grads_e = run(eager.group_norm_relu, bf16)  # eager PyTorch with everything in bf16
    assert y.dtype == bf16 and y.is_contiguous(memory_format=FORMATS[fmt]), "output keeps x's dtype and format"
    assert_close_rule("y", y, y_e, y_ref, bf16)
    refs = (leaves[0].grad, leaves[1].grad, leaves[2].grad, e_ref.grad if e_ref is not None else None)
    for name, g, ge, gr, dt in zip(("dx", "dweight", "dbias", "demb"), grads, grads_e, refs, (bf16, pdt, pdt, pdt)):
        if gr is None:
            continue
        assert g.dtype == dt, f"{name}: {g.dtype} != {dt}"
        assert_close_rule(name, g, ge, gr, bf16)

def test_ext_gradient_layout_independent_of_upstream_layout(ext_ops):
    x, w, b, emb = make_inputs(2, 64, 8, 8, torch.channels_last, True)
    xs = x.clone().requires_grad_()
    y = ext_ops.group_norm_relu(xs, w, b, EPS, emb)
    gy = torch.randn(y.shape)  # NCHW upstream gradient for a channels_last output
    y.backward(gy)
    xr = x.clone().requires_grad_()
    eager.group_norm_relu(xr, w, b, EPS, emb).backward(gy)
    assert_close(xs.grad, xr.grad, rtol=1e-4, atol=1e-5, what="dx with NCHW upstream")


def test_ext_deterministic(ext_ops):
    x, w, b, emb = make_inputs(3, 128, 8, 8, torch.channels_last, True)
    y1 = ext_ops.group_norm_relu(x, w, b, EPS, emb)
    y2 = ext_ops.group_norm_relu(x, w, b, EPS, emb)
    assert torch.equal(y1, y2)


def test_ext_opcheck(ext_ops):
    x, w, b, emb = make_inputs(2, 64, 4, 4, torch.channels_last, True)
    torch.library.opcheck(ext_ops.group_norm_relu_fwd, (x, w, b, emb, EPS),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("case,match", [
    (dict(weight=torch.ones(63)), "weight"),
    (dict(bias=torch.ones(64, 1)), "bias"),
    (dict(emb=torch.ones(2, 65)), "emb"),
    (dict(x=torch.ones(2, 64, 8)), "x must be 4-D"),
    (dict(weight=torch.ones(64, dtype=torch.float64)), "weight"),
    (dict(x=torch.ones(2, 64, 8, 8)[:, :, ::2]), "x must be NCHW-contiguous or channels_last"),
], ids=["weight-shape", "bias-shape", "emb-shape", "x-3d", "weight-dtype", "x-strided"])
def test_ext_bad_inputs_name_the_argument(ext_ops, case, match):
    args = dict(x=torch.randn(2, 64, 8, 8), weight=torch.ones(64), bias=torch.zeros(64), emb=torch.zeros(2, 64))
    args.update(case)
    with pytest.raises(RuntimeError, match=match):
        ext_ops._C.gn_relu_fwd(args["x"], args["weight"], args["bias"], args["emb"], EPS)
    why = ext_ops.group_norm_relu_reasons(args["x"], args["weight"], args["bias"], EPS, args["emb"])
    assert why and any(match.split()[0] in r for r in why), why


def test_ext_dispatch_reasons_for_unsupported_dtype(ext_ops, monkeypatch):
    x, w, b, emb = make_inputs(1, 64, 4, 4, torch.contiguous_format, True, dtype=torch.float64)
    assert any("dtype" in r for r in dispatch.reasons("group_norm_relu", "ext", x, w, b, EPS, emb))
    monkeypatch.setenv("FAST_UNET_BACKEND", "ext")
    with pytest.raises(RuntimeError, match="dtype"):
        dispatch.call("group_norm_relu", x, w, b, EPS, emb)
    monkeypatch.setenv("FAST_UNET_BACKEND", "auto")
    assert dispatch.select("group_norm_relu", x, w, b, EPS, emb)[0] == "eager"


def test_ext_dispatch_picks_ext_for_float32_cpu(ext_ops, monkeypatch):
    monkeypatch.setenv("FAST_UNET_BACKEND", "auto")
    x, w, b, emb = make_inputs(1, 64, 4, 4, torch.channels_last, True)
    assert dispatch.select("group_norm_relu", x, w, b, EPS, emb)[0] in ("triton", "ext")
    assert dispatch.reasons("group_norm_relu", "ext", x, w, b, EPS, emb) == []


# (c) the extension's CUDA kernels (skipped without a CUDA build and device)

# Tolerances against a float64 reference: float32 tight; half types at most twice eager PyTorch's own error.
CUDA_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


def cuda_make(b, c, h, w, fmt, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, c, h, w, generator=g) * 2 + 0.5)
    wt, bs, emb = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.3, torch.randn(b, c, generator=g)
    to = lambda t: t.to("cuda", dtype)  # noqa: E731
    return to(x).contiguous(memory_format=fmt), to(wt), to(bs), to(emb)


def cuda_ref64(x, w, b, emb):
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b, emb)]
    y = torch.relu(F.group_norm(leaves[0], 1, leaves[1], leaves[2], EPS)) + leaves[3][:, :, None, None]
    return y, leaves


@pytest.mark.parametrize("dtype", list(CUDA_TOL), ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 64, 64, 64), (3, 128, 32, 32), (3, 256, 5, 7), (2, 512, 8, 8), (3, 96, 9, 9)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.gpu
def test_ext_cuda_group_norm_relu(ext_cuda, dtype, fmt, shape):
    x, w, b, emb = cuda_make(*shape, fmt, dtype)
    y_ref, leaves = cuda_ref64(x, w, b, emb)
    gy = torch.randn(y_ref.shape, device="cuda", dtype=torch.float64)
    y_ref.backward(gy)
    xs, ws, bs, es = (t.clone().requires_grad_() for t in (x, w, b, emb))
    y = ext_cuda.group_norm_relu(xs, ws, bs, EPS, es)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    y.backward(gy.to(dtype))
    # eager PyTorch in the same dtype, for the "at most twice eager's error" rule
    xe, we, be, ee = (t.clone().requires_grad_() for t in (x, w, b, emb))
    ye = torch.relu(F.group_norm(xe, 1, we, be, EPS)) + ee[:, :, None, None]
    ye.backward(gy.to(dtype))
    rtol, atol = CUDA_TOL[dtype]
    for name, got, eag, want in (("y", y, ye, y_ref), ("dx", xs.grad, xe.grad, leaves[0].grad),
                                 ("dw", ws.grad, we.grad, leaves[1].grad), ("db", bs.grad, be.grad, leaves[2].grad),
                                 ("demb", es.grad, ee.grad, leaves[3].grad)):
        scale = want.abs().max().item()
        err = (got.double() - want).abs().max().item()
        eager_err = (eag.double() - want).abs().max().item()
        assert err <= max(2 * eager_err, atol * max(scale, 1.0), rtol * scale), \
            f"{name}: err {err:.3g} vs eager {eager_err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_backward_relu_mask_is_the_forwards(channels_last):
    """The backward's ReLU mask is recomputed with the forward's formula: biases are planted so that
    x_hat * w + b is exactly 0 at one element per channel while the forward's (x - mean) * (w * rstd) + b
    (another rounding) is a tiny positive or negative number there. With dy = 1, d bias[c] must be the
    number of positive outputs of channel c: a mask built from another formula miscounts."""
    from fast_unet import backends

    K = backends.kernel_module("group_norm")
    torch.manual_seed(3)
    B, C, H, W = 2, 16, 4, 4
    x = torch.randn(B, C, H, W) * 1.7 + 0.3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(C) * 0.9 + 0.2
    _, mean, rstd = K.group_norm_relu_fwd(x, w, torch.zeros(C), 1e-5)  # the statistics do not depend on w, b
    x_hat = (x - mean[:, None, None, None]) * rstd[:, None, None, None]  # float32, as the kernels compute it
    b = -(x_hat[0, :, 1, 2] * w)  # x_hat * w + b == 0 exactly at (0, c, 1, 2)
    assert ((x_hat[0, :, 1, 2] * w + b) == 0).all()
    y, mean, rstd = K.group_norm_relu_fwd(x, w, b, 1e-5)
    planted = y[0, :, 1, 2]
    assert (planted > 0).any(), "the plant must put the forward's pre-ReLU value above zero somewhere"
    dy = torch.ones_like(x)
    _, dw, db, _ = K.group_norm_relu_bwd(dy, x, w, b, mean, rstd)
    torch.testing.assert_close(db, (y > 0).sum(dim=(0, 2, 3)).float(), rtol=0, atol=0)


@pytest.mark.parametrize("shape, channels_last, dtype", [
    ((3, 64, 8, 8), True, torch.float32), ((2, 130, 9, 7), False, torch.float32),
    ((1, 48, 48, 80), True, torch.float32), ((2, 128, 16, 16), True, torch.bfloat16),
    ((3, 64, 5, 9), False, torch.float16)])
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_backward_second_gradient_summed_on_load(shape, channels_last, dtype):
    """group_norm_relu_bwd(dy, ..., dy2) is the backward of dy + dy2 (two consumers of one output, as the
    attention block's residual and its LayerNorm): against float64 on the same rounded inputs, and against
    the one-gradient call on dy + dy2 summed in float64 then rounded (the flash-attention rule); several
    splits per sample at 48x80 (S > 1), odd channel counts and sizes."""
    from fast_unet import backends

    K = backends.kernel_module("group_norm")
    torch.manual_seed(11)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(shape) * 1.3 + 0.2).to(dtype).contiguous(memory_format=fmt)
    w, b = torch.randn(shape[1]) * 0.8 + 0.3, torch.randn(shape[1]) * 0.4
    emb = torch.randn(shape[:2])
    dy, dy2 = (torch.randn(shape).to(dtype) for _ in range(2))
    leaves = [t.double().requires_grad_() for t in (x, w, b, emb)]
    gn_relu_formula(*leaves[:3], 1e-5, leaves[3]).backward(dy.double() + dy2.double())
    _, mean, rstd = K.group_norm_relu_fwd(x, w, b, 1e-5)
    got = K.group_norm_relu_bwd(dy, x, w, b, mean, rstd, dy2)
    one = K.group_norm_relu_bwd((dy.double() + dy2.double()).to(dtype), x, w, b, mean, rstd)
    for name, g, o, leaf in zip(("dx", "dw", "db", "demb"), got, one, leaves):
        want = leaf.grad
        scale = max(want.abs().max().item(), 1.0)
        err = (g.double() - want).abs().max().item()
        one_err = (o.double() - want).abs().max().item()
        floor = 1e-5 if dtype == torch.float32 else 2e-2
        assert err <= 2 * one_err + floor * scale, f"{name}: err {err:.3g} vs one gradient's {one_err:.3g}"
    with pytest.raises(ValueError, match="dy2"):
        K.group_norm_relu_bwd(dy, x, w, b, mean, rstd, dy2[:, :1])
