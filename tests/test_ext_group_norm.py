"""The C++/CUDA fused GroupNorm(1, C) + ReLU + embedding (fast_unet._C) against eager and float64."""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, require_ext

ext_ops = require_ext()

from fast_unet import dispatch, eager  # noqa: E402

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


SHAPES = [  # (B, C, H, W)
    (1, 64, 16, 16),
    (3, 128, 8, 8),
    (3, 256, 5, 7),  # odd spatial size: vector tails
    (1, 512, 4, 4),
    (3, 64, 32, 32),
]
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fmt", list(FORMATS), ids=str)
@pytest.mark.parametrize("with_emb", [True, False], ids=["emb", "noemb"])
def test_forward_backward_vs_eager_and_float64(shape, fmt, with_emb):
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


def test_gradient_layout_independent_of_upstream_layout():
    x, w, b, emb = make_inputs(2, 64, 8, 8, torch.channels_last, True)
    xs = x.clone().requires_grad_()
    y = ext_ops.group_norm_relu(xs, w, b, EPS, emb)
    gy = torch.randn(y.shape)  # NCHW upstream gradient for a channels_last output
    y.backward(gy)
    xr = x.clone().requires_grad_()
    eager.group_norm_relu(xr, w, b, EPS, emb).backward(gy)
    assert_close(xs.grad, xr.grad, rtol=1e-4, atol=1e-5, what="dx with NCHW upstream")


def test_deterministic():
    x, w, b, emb = make_inputs(3, 128, 8, 8, torch.channels_last, True)
    y1 = ext_ops.group_norm_relu(x, w, b, EPS, emb)
    y2 = ext_ops.group_norm_relu(x, w, b, EPS, emb)
    assert torch.equal(y1, y2)


def test_opcheck():
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
def test_bad_inputs_name_the_argument(case, match):
    args = dict(x=torch.randn(2, 64, 8, 8), weight=torch.ones(64), bias=torch.zeros(64), emb=torch.zeros(2, 64))
    args.update(case)
    with pytest.raises(RuntimeError, match=match):
        ext_ops._C.gn_relu_fwd(args["x"], args["weight"], args["bias"], args["emb"], EPS)
    why = ext_ops.group_norm_relu_reasons(args["x"], args["weight"], args["bias"], EPS, args["emb"])
    assert why and any(match.split()[0] in r for r in why), why


def test_dispatch_reasons_for_unsupported_dtype(monkeypatch):
    x, w, b, emb = make_inputs(1, 64, 4, 4, torch.contiguous_format, True, dtype=torch.float64)
    assert any("dtype" in r for r in dispatch.reasons("group_norm_relu", "ext", x, w, b, EPS, emb))
    monkeypatch.setenv("FAST_UNET_BACKEND", "ext")
    with pytest.raises(RuntimeError, match="dtype"):
        dispatch.call("group_norm_relu", x, w, b, EPS, emb)
    monkeypatch.setenv("FAST_UNET_BACKEND", "auto")
    assert dispatch.select("group_norm_relu", x, w, b, EPS, emb)[0] == "eager"


def test_dispatch_picks_ext_for_float32_cpu(monkeypatch):
    monkeypatch.setenv("FAST_UNET_BACKEND", "auto")
    x, w, b, emb = make_inputs(1, 64, 4, 4, torch.channels_last, True)
    assert dispatch.select("group_norm_relu", x, w, b, EPS, emb)[0] in ("triton", "ext")
    assert dispatch.reasons("group_norm_relu", "ext", x, w, b, EPS, emb) == []
