"""The attention block's token GEMMs: ``linear_residual``, ``ln_linear``, ``mlp_residual`` and ``gn_ln_linear``.

| op              | backend | implementation                                                          |
|-----------------|---------|-------------------------------------------------------------------------|
| linear_residual | triton  | kernels/linear.py: x @ W^T + bias, the residual added in the epilogue   |
| linear_residual | eager   | fast_unet/eager.py: addmm with the residual as its accumulator          |
| ln_linear       | triton  | kernels/linear.py: LayerNorm in the GEMM's prologue, optional GELU epilogue; backward: kernels/ln_backward.py (the GEMM that forms its input's gradient, with the GELU backward on its way in, the LayerNorm backward in its epilogue and the bias gradient's partial sums) |
| ln_linear       | eager   | fast_unet/eager.py: F.layer_norm + F.linear (+ F.gelu)                  |
| mlp_residual    | triton  | the two launches of ``ln_linear`` (with GELU) and ``linear_residual`` (x as the residual); backward: one kernels/ln_backward.py launch that also adds the residual's gradient in its epilogue and sums it for the second bias (no add, no bias sum) |
| mlp_residual    | eager   | fast_unet/eager.py: ``ln_linear`` then ``linear_residual`` (both dispatched) |
| gn_ln_linear    | triton  | kernels/linear.py: relu(GroupNorm(y)) + emb from y's partials, written once as t (the block's residual), then LayerNorm(t) @ W^T + bias |
| gn_ln_linear    | eager   | fast_unet/eager.py: ``group_norm_relu`` then ``ln_linear`` (both dispatched) |

Backward (triton): the weight gradients are torch matmuls (of the h and d2 that kernels/ln_backward.py
writes for ``ln_linear`` and ``gn_ln_linear``); the GroupNorm + ReLU + emb gradient is the Triton GroupNorm backward, which sums the
residual's gradient and the LayerNorm/GEMM path's as it loads them.
Tests: tests/ops/test_linear.py.
"""
import functools
from typing import Optional

import torch
from torch import Tensor

from .. import backends, dispatch, eager
from .group_norm import checked_partials, group_norm_relu, norm_backward, partials_of


def linear_residual(x, weight, bias, residual):
    """``x @ weight.T + bias + residual``: x (..., K), weight (N_out, K), bias (N_out,), residual (..., N_out)."""
    return dispatch.call("linear_residual", x, weight, bias, residual)


def ln_linear(x, ln_weight, ln_bias, ln_eps, weight, bias, gelu=False):
    """``[gelu](layer_norm(x, (K,), ln_weight, ln_bias, ln_eps) @ weight.T + bias)``: x (..., K) ->
    (..., N_out). ``gelu``: exact (erf) GELU, F.gelu's default."""
    return dispatch.call("ln_linear", x, ln_weight, ln_bias, float(ln_eps), weight, bias, bool(gelu))


def mlp_residual(x, ln_weight, ln_bias, ln_eps, weight1, bias1, weight2, bias2):
    """``x + linear(gelu(linear(layer_norm(x, (C,), ln_weight, ln_bias, ln_eps), weight1, bias1)), weight2,
    bias2)``: the attention block's feed-forward with its residual; x (..., C), weight1 (H, C), weight2 (C, H).
    GELU: exact (erf)."""
    return dispatch.call("mlp_residual", x, ln_weight, ln_bias, float(ln_eps), weight1, bias1, weight2, bias2)


def gn_ln_linear(y, partials, gn_weight, gn_bias, gn_eps, emb, ln_weight, ln_bias, ln_eps, weight, bias):
    """The attention block's input and QKV projection -> (out (B, HW, N_out), t (B, C, H, W) channels_last).

    t = relu(group_norm(y, 1, gn_weight, gn_bias, gn_eps)) + emb[:, :, None, None] (y's statistics from its
    ``partials``, or computed when None), the block's residual; out = linear(layer_norm(t's tokens, (C,),
    ln_weight, ln_bias, ln_eps), weight, bias)."""
    return dispatch.call("gn_ln_linear", y, partials, gn_weight, gn_bias, float(gn_eps), emb, ln_weight, ln_bias,
                         float(ln_eps), weight, bias)


def _k():
    return backends.kernel_module("linear")


# --- linear_residual (triton) -------------------------------------------------------------------------

@torch.library.custom_op("fast_unet::linear_residual", mutates_args=())
@backends.on_tensor_device
def _linear_residual_op(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor) -> Tensor:
    return _k().linear_residual(x, weight, bias, residual)


@_linear_residual_op.register_fake
def _(x, weight, bias, residual):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_residual_setup(ctx, inputs, output):
    x, weight, bias, _residual = inputs
    ctx.save_for_backward(x, weight)
    ctx.bias_dtype = bias.dtype


def _linear_residual_backward(ctx, dout):
    x, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    d2 = dout.reshape(-1, weight.shape[0])
    dx = (d2 @ weight).view(x.shape) if need[0] else None
    dw = d2.t() @ x.reshape(-1, x.shape[-1]) if need[1] else None
    db = d2.sum(0, dtype=ctx.bias_dtype) if need[2] else None
    return dx, dw, db, dout if need[3] else None


torch.library.register_autograd("fast_unet::linear_residual", _linear_residual_backward,
                                setup_context=_linear_residual_setup)


def triton_linear_residual(x, weight, bias, residual):
    return torch.ops.fast_unet.linear_residual(x, weight, bias, residual)


def triton_linear_residual_reasons(x, weight, bias, residual):
    return backends.triton_reasons(lambda *a: _k().check_linear(*a),
                                   dict(x=x, weight=weight, bias=bias, residual=residual), x, weight, bias, residual)


# --- ln_linear (triton) -------------------------------------------------------------------------------

@torch.library.custom_op("fast_unet::ln_linear", mutates_args=())
@backends.on_tensor_device
def _ln_linear_op(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, ln_eps: float, weight: Tensor, bias: Tensor,
                  gelu: bool) -> Tensor:
    return _k().ln_linear(x, ln_weight, ln_bias, ln_eps, weight, bias, gelu)


@_ln_linear_op.register_fake
def _(x, ln_weight, ln_bias, ln_eps, weight, bias, gelu):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("fast_unet::ln_linear_backward", mutates_args=())
@backends.on_tensor_device
def _ln_linear_bwd_op(d: Tensor, x2: Tensor, ln_weight: Tensor, ln_bias: Tensor, ln_eps: float, weight: Tensor,
                      bias: Tensor, gelu: bool, res: Optional[Tensor] = None, res_bias: Optional[Tensor] = None
                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return backends.kernel_module("ln_backward").ln_linear_bwd(d, x2, ln_weight, ln_bias, ln_eps, weight, bias, gelu,
                                                               res, res_bias)


@_ln_linear_bwd_op.register_fake
def _(d, x2, ln_weight, ln_bias, ln_eps, weight, bias, gelu, res=None, res_bias=None):
    return (torch.empty_like(x2), torch.empty_like(ln_weight), torch.empty_like(ln_bias), torch.empty_like(bias),
            torch.empty_like(x2), torch.empty_like(d) if gelu else d.new_empty((0,)),
            torch.empty_like(res_bias) if res is not None else bias.new_empty((0,)))


def _ln_linear_grads(d, x2, ln_weight, ln_bias, ln_eps, weight, bias, gelu, res=None, res_bias=None):
    """Gradients of [gelu](LayerNorm(x2) @ weight.T + bias) for the upstream d (M, N_out) -> (dx2, d ln_w,
    d ln_b, dw, db, d res_bias): one Triton launch (kernels/ln_backward.py) forms dx2 with the LayerNorm
    backward in its epilogue (and ``res``, a residual's gradient of x2, added there), GELU's backward on its
    way in (the pre-activation recomputed), the bias gradient and the normalised input h (as the forward's
    GEMM read it); then the parameter sums and dw = d2^T @ h. The (C,) parameters may be float32 with x2 in
    a lower precision (autocast); every parameter gradient comes in its parameter's dtype, summed in
    float32. d res_bias: res's column sums (None without res)."""
    dx2, dlw, dlb, db, h, d2, db_res = torch.ops.fast_unet.ln_linear_backward(
        d, x2, ln_weight, ln_bias, float(ln_eps), weight, bias, bool(gelu), res, res_bias)
    dw = (d2 if gelu else d).t() @ h
    return dx2, dlw, dlb, dw, db, db_res if res is not None else None


def _ln_linear_setup(ctx, inputs, output):
    x, ln_weight, ln_bias, ln_eps, weight, bias, gelu = inputs
    ctx.save_for_backward(x, ln_weight, ln_bias, weight, bias)
    ctx.ln_eps = ln_eps
    ctx.gelu = gelu


def _ln_linear_backward(ctx, dout):
    x, ln_weight, ln_bias, weight, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    k = x.shape[-1]
    dx2, dlw, dlb, dw, db, _ = _ln_linear_grads(dout.reshape(-1, weight.shape[0]), x.reshape(-1, k), ln_weight,
                                                ln_bias, ctx.ln_eps, weight, bias, ctx.gelu)
    return dx2.view(x.shape) if need[0] else None, dlw, dlb, None, dw, db, None


torch.library.register_autograd("fast_unet::ln_linear", _ln_linear_backward, setup_context=_ln_linear_setup)


def triton_ln_linear(x, ln_weight, ln_bias, ln_eps, weight, bias, gelu):
    return torch.ops.fast_unet.ln_linear(x, ln_weight, ln_bias, ln_eps, weight, bias, gelu)


def _check_ln_linear(x, ln_weight, ln_bias, weight, bias):
    k = _k()
    k.check_linear(x, weight, bias)
    k.check_ln(x, ln_weight, ln_bias)


def triton_ln_linear_reasons(x, ln_weight, ln_bias, ln_eps, weight, bias, gelu=False):
    return backends.triton_reasons(_check_ln_linear,
                                   dict(x=x, ln_weight=ln_weight, ln_bias=ln_bias, weight=weight, bias=bias),
                                   x, ln_weight, ln_bias, weight, bias)


# --- mlp_residual (triton) ----------------------------------------------------------------------------

@torch.library.custom_op("fast_unet::mlp_residual", mutates_args=())
@backends.on_tensor_device
def _mlp_residual_op(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, ln_eps: float, weight1: Tensor, bias1: Tensor,
                     weight2: Tensor, bias2: Tensor) -> tuple[Tensor, Tensor]:
    k = _k()
    f = k.ln_linear(x, ln_weight, ln_bias, ln_eps, weight1, bias1, True)
    return k.linear_residual(f, weight2, bias2, x), f


@_mlp_residual_op.register_fake
def _(x, ln_weight, ln_bias, ln_eps, weight1, bias1, weight2, bias2):
    return x.new_empty((*x.shape[:-1], weight2.shape[0])), x.new_empty((*x.shape[:-1], weight1.shape[0]))


def _mlp_residual_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero tensor for the hidden activation (not differentiable)
    x, ln_weight, ln_bias, ln_eps, weight1, bias1, weight2, bias2 = inputs
    ctx.save_for_backward(x, output[1], ln_weight, ln_bias, weight1, bias1, weight2, bias2)
    ctx.ln_eps = ln_eps
    ctx.mark_non_differentiable(output[1])


def _mlp_residual_backward(ctx, dout, _df):
    """The second layer's input gradient and weight gradient are torch matmuls; everything else is the one
    LayerNorm-backward GEMM launch of the first layer (kernels/ln_backward.py), which adds the residual's
    gradient (dout) to dx as it stores it and sums dout's columns for the second layer's bias."""
    x, f, ln_weight, ln_bias, weight1, bias1, weight2, bias2 = ctx.saved_tensors
    c = x.shape[-1]
    d = dout.reshape(-1, weight2.shape[0])
    df = d @ weight2
    dw2 = d.t() @ f.reshape(-1, f.shape[-1])
    dx, dlw, dlb, dw1, db1, db2 = _ln_linear_grads(df, x.reshape(-1, c), ln_weight, ln_bias, ctx.ln_eps, weight1,
                                                   bias1, True, res=d, res_bias=bias2)
    return dx.view(x.shape), dlw, dlb, None, dw1, db1, dw2, db2


torch.library.register_autograd("fast_unet::mlp_residual", _mlp_residual_backward, setup_context=_mlp_residual_setup)


def triton_mlp_residual(x, ln_weight, ln_bias, ln_eps, weight1, bias1, weight2, bias2):
    return torch.ops.fast_unet.mlp_residual(x, ln_weight, ln_bias, ln_eps, weight1, bias1, weight2, bias2)[0]


def _check_mlp_residual(x, ln_weight, ln_bias, weight1, bias1, weight2, bias2):
    _check_ln_linear(x, ln_weight, ln_bias, weight1, bias1)
    hidden = x[..., :1].expand(*x.shape[:-1], weight1.shape[0])  # the hidden activation's shape, no memory
    _k().check_linear(hidden, weight2, bias2, x, name="the hidden activation")


def triton_mlp_residual_reasons(x, ln_weight, ln_bias, ln_eps, weight1, bias1, weight2, bias2):
    tensors = dict(x=x, ln_weight=ln_weight, ln_bias=ln_bias, weight1=weight1, bias1=bias1, weight2=weight2,
                   bias2=bias2)
    return backends.triton_reasons(_check_mlp_residual, tensors, x, ln_weight, ln_bias, weight1, bias1, weight2,
                                   bias2)


# --- gn_ln_linear (triton) ----------------------------------------------------------------------------

@torch.library.custom_op("fast_unet::gn_ln_linear", mutates_args=())
@backends.on_tensor_device
def _gn_ln_linear_op(y: Tensor, partials: Tensor, gn_weight: Tensor, gn_bias: Tensor, gn_eps: float,
                     emb: Optional[Tensor], ln_weight: Tensor, ln_bias: Tensor, ln_eps: float, weight: Tensor,
                     bias: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _k().gn_ln_linear(y, partials, gn_weight, gn_bias, gn_eps, emb, ln_weight, ln_bias, ln_eps, weight, bias)


@_gn_ln_linear_op.register_fake
def _(y, partials, gn_weight, gn_bias, gn_eps, emb, ln_weight, ln_bias, ln_eps, weight, bias):
    b, c, h, w = y.shape
    stats = y.new_empty((b,), dtype=torch.float32)
    return (y.new_empty((b, h * w, weight.shape[0])), torch.empty_like(y, memory_format=torch.channels_last),
            stats, torch.empty_like(stats))


def _gn_ln_linear_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs without a gradient
    y, _partials, gn_weight, gn_bias, _gn_eps, emb, ln_weight, ln_bias, ln_eps, weight, bias = inputs
    _out, t, mean, rstd = output
    ctx.save_for_backward(y, t, gn_weight, gn_bias, mean, rstd, ln_weight, ln_bias, weight, bias)
    ctx.ln_eps = ln_eps
    ctx.emb_dtype = emb.dtype if emb is not None else None
    ctx.mark_non_differentiable(mean, rstd)


def _gn_ln_linear_backward(ctx, dout, dt, _dmean, _drstd):
    y, t, gn_weight, gn_bias, mean, rstd, ln_weight, ln_bias, weight, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    b, c, h, w = t.shape
    tokens = t.permute(0, 2, 3, 1).reshape(-1, c)  # channels_last: a view
    dw = db = dlw = dlb = None
    dtok = None
    if dout is not None:
        dtok, dlw, dlb, dw, db, _ = _ln_linear_grads(dout.reshape(-1, weight.shape[0]), tokens, ln_weight,
                                                     ln_bias, ctx.ln_eps, weight, bias, False)
        dtok = dtok.view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W) channels_last
    # t's gradient: the LN/GEMM path's and the residual path's, summed as the GroupNorm backward loads them
    grads = [g for g in (dtok, dt) if g is not None]
    dy = dgw = dgb = demb = None
    if grads and (need[0] or need[2] or need[3] or need[5]):
        dy, dgw, dgb, demb = norm_backward(grads[0], y, gn_weight, gn_bias, mean, rstd, ctx.emb_dtype,
                                           grads[1] if len(grads) > 1 else None)
    return dy, None, dgw, dgb, None, demb, dlw, dlb, None, dw, db


torch.library.register_autograd("fast_unet::gn_ln_linear", _gn_ln_linear_backward, setup_context=_gn_ln_linear_setup)


def triton_gn_ln_linear(y, partials, gn_weight, gn_bias, gn_eps, emb, ln_weight, ln_bias, ln_eps, weight, bias):
    partials = partials_of(y, partials)
    out, t, _mean, _rstd = torch.ops.fast_unet.gn_ln_linear(y, partials, gn_weight, gn_bias, gn_eps, emb,
                                                            ln_weight, ln_bias, ln_eps, weight, bias)
    return out, t


def _check_gn_ln_linear(y, partials, gn_weight, gn_bias, emb, ln_weight, ln_bias, weight, bias):
    k = _k()
    k.check_gn(y, checked_partials(y, partials), gn_weight, gn_bias, emb)
    tokens = y.permute(0, 2, 3, 1)
    k.check_linear(tokens, weight, bias, name="y (channels)")
    k.check_ln(tokens, ln_weight, ln_bias, name="y (channels)")


def triton_gn_ln_linear_reasons(y, partials, gn_weight, gn_bias, gn_eps, emb, ln_weight, ln_bias, ln_eps, weight,
                                bias):
    tensors = dict(y=y, partials=partials, gn_weight=gn_weight, gn_bias=gn_bias, emb=emb, ln_weight=ln_weight,
                   ln_bias=ln_bias, weight=weight, bias=bias)
    return backends.triton_reasons(_check_gn_ln_linear, tensors, y, partials, gn_weight, gn_bias, emb, ln_weight,
                                   ln_bias, weight, bias)


dispatch.register("linear_residual", "triton", triton_linear_residual, triton_linear_residual_reasons, devices=backends.triton_devices)
dispatch.register("linear_residual", "eager", eager.linear_residual)
dispatch.register("ln_linear", "triton", triton_ln_linear, triton_ln_linear_reasons, devices=backends.triton_devices)
dispatch.register("ln_linear", "eager", eager.ln_linear)
dispatch.register("mlp_residual", "triton", triton_mlp_residual, triton_mlp_residual_reasons,
                  devices=backends.triton_devices)
dispatch.register("mlp_residual", "eager",
                  functools.partial(eager.mlp_residual, ln_linear=ln_linear, linear_residual=linear_residual))
dispatch.register("gn_ln_linear", "triton", triton_gn_ln_linear, triton_gn_ln_linear_reasons, devices=backends.triton_devices)
dispatch.register("gn_ln_linear", "eager",
                  functools.partial(eager.gn_ln_linear, normalize=group_norm_relu, ln_linear=ln_linear))
dispatch.autocast_keep("gn_ln_linear", 1)  # partials
dispatch.register_autocast(_linear_residual_op)
dispatch.register_autocast(_ln_linear_op)
dispatch.register_autocast(_mlp_residual_op)
dispatch.register_autocast(_gn_ln_linear_op, keep=("partials",))
