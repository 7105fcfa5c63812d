"""Every Triton op with its (C,) parameters (norm weights and biases, biases) in float32 and its activations
and weight matrices in bf16: the arguments a float32 model's ops take under autocast (fast_unet.dispatch
casts tensors of two or more dimensions only).

Per op, through the dispatched op on the triton backend: the output (bf16) and every gradient, against
the float64 reference (the eager op on the same values) under the flash-attention rule, judged by the
same op given all-bf16 arguments (the parameters rounded to bf16); the parameters' gradients come in
float32, the others in bf16.
"""
import pytest
import torch

from fast_unet import ops
from helpers import assert_close_rule

LOW = torch.bfloat16
B, C, H, W = 2, 16, 6, 6


def _rand(*shape, scale=1.0, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _gn_params(c=C, seed=10):
    return dict(gw=_rand(c, scale=0.5, shift=1.0, seed=seed), gb=_rand(c, scale=0.5, seed=seed + 1))


# name -> (activations and weight matrices {name: float64}, (C,) parameters {name: float64},
#          call(**tensors) -> tuple of outputs)
CASES = {
    "group_norm_relu": (
        lambda: dict(x=_cl(_rand(B, C, H, W, scale=1.5, shift=0.7)), emb=_rand(B, C, seed=2)),
        _gn_params,
        lambda x, emb, gw, gb: (ops.group_norm_relu(x, gw, gb, 1e-5, emb),)),
    "conv3x3": (
        lambda: dict(x=_cl(_rand(B, C, H, W, scale=1.5, shift=0.7)), w=_cl(_rand(24, C, 3, 3, scale=0.2, seed=3))),
        lambda: dict(_gn_params(), b=_rand(24, scale=0.5, seed=4)),
        lambda x, w, gw, gb, b: (ops.conv3x3(x, w, b, norm=(None, gw, gb, 1e-5))[0],)),
    "gn_relu_maxpool": (
        lambda: dict(y=_cl(_rand(B, C, H, W, scale=1.5, shift=0.7))),
        _gn_params,
        lambda y, gw, gb: ops.gn_relu_maxpool(y, None, gw, gb, 1e-5)),
    "upsample2x": (
        lambda: dict(x=_cl(_rand(B, C, 3, 4, scale=1.5, shift=0.7))),
        _gn_params,
        lambda x, gw, gb: (ops.upsample2x(x, norm=(None, gw, gb, 1e-5)),)),
    "linear_residual": (
        lambda: dict(x=_rand(B, 9, C), w=_rand(24, C, scale=0.25, seed=3), r=_rand(B, 9, 24, seed=5)),
        lambda: dict(b=_rand(24, scale=0.5, seed=4)),
        lambda x, w, r, b: (ops.linear_residual(x, w, b, r),)),
    "ln_linear": (
        lambda: dict(x=_rand(B, 9, C, scale=1.5, shift=0.3), w=_rand(24, C, scale=0.25, seed=3)),
        lambda: dict(lw=_rand(C, scale=0.5, shift=1.0, seed=6), lb=_rand(C, scale=0.5, seed=7),
                     b=_rand(24, scale=0.5, seed=4)),
        lambda x, w, lw, lb, b: (ops.ln_linear(x, lw, lb, 1e-5, w, b, gelu=True),)),
    "gn_ln_linear": (
        lambda: dict(y=_cl(_rand(B, C, 4, 4, scale=1.5, shift=0.7)), emb=_rand(B, C, seed=2),
                     w=_rand(3 * C, C, scale=0.25, seed=3)),
        lambda: dict(_gn_params(), lw=_rand(C, scale=0.5, shift=1.0, seed=6), lb=_rand(C, scale=0.5, seed=7),
                     b=_rand(3 * C, scale=0.5, seed=4)),
        lambda y, emb, w, gw, gb, lw, lb, b: ops.gn_ln_linear(y, None, gw, gb, 1e-5, emb, lw, lb, 1e-5, w, b)),
    "time_embedding": (
        lambda: dict(rw=_rand(24, 32, scale=0.2, seed=3), sw=_rand(40, 32, scale=0.2, seed=8)),
        lambda: dict(rb=_rand(24, scale=0.5, seed=4), sb=_rand(40, scale=0.5, seed=9)),
        lambda rw, sw, rb, sb: ops.time_embedding(torch.tensor([3, 517]), 32, rw, rb, sw, sb)),
}


def _run(call, acts, params, act_dtype, param_dtype, seed=20):
    """call's outputs and the gradients of sum(out * g) wrt every tensor, leaves in the given dtypes."""
    leaves = {n: _cl(t.to(act_dtype)).detach().requires_grad_() for n, t in acts.items()}
    leaves.update({n: t.to(param_dtype).detach().requires_grad_() for n, t in params.items()})
    outs = call(**leaves)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)
    loss.backward()
    return outs, {n: t.grad for n, t in leaves.items()}


@pytest.mark.parametrize("op", list(CASES))
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_float32_params_with_bf16_activations(op, monkeypatch):
    make_acts, make_params, call = CASES[op]
    acts = {n: t.to(LOW).double() for n, t in make_acts().items()}  # values bf16 can hold
    params = {n: t.float().double() for n, t in make_params().items()}  # values float32 can hold

    outs, grads = _run(call, acts, params, LOW, torch.float32)
    outs_low, grads_low = _run(call, acts, params, LOW, LOW)  # the parameters rounded to bf16
    monkeypatch.setenv("FAST_UNET_BACKEND", "eager")
    refs, grads_ref = _run(call, acts, params, torch.float64, torch.float64)

    for i, (o, ol, r) in enumerate(zip(outs, outs_low, refs)):
        assert o.dtype == LOW, (op, i, o.dtype)
        assert_close_rule(f"{op} output {i}", o, ol, r, LOW)
    for n, g in grads.items():
        assert g is not None, (op, n)
        assert g.dtype == (torch.float32 if n in params else LOW), (op, n, g.dtype)
        assert_close_rule(f"{op} d{n}", g, grads_low[n], grads_ref[n], LOW)


@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_a_param_in_another_low_precision_is_refused_by_name():
    """A (C,) parameter is float32 or the activation's dtype: an fp16 bias of a bf16 conv is refused, the
    reason naming it."""
    from fast_unet import dispatch

    x = torch.randn(1, C, 4, 4, dtype=LOW)
    w = torch.randn(8, C, 3, 3, dtype=LOW)
    why = dispatch.reasons("conv3x3", "triton", x, None, None, None, None, 0.0, w, torch.zeros(8, dtype=torch.float16),
                           False)
    assert why and "bias" in why[0] and "float32" in why[0], why
    assert dispatch.reasons("conv3x3", "triton", x, None, None, None, None, 0.0, w, torch.zeros(8), False) == []
