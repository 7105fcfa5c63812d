"""Glue of the attention block's token GEMMs (kernels/linear.py) as ``torch.library`` custom ops.

The SelfAttention block in five launches:

1. ``gn_ln_linear``: t = relu(GroupNorm(1, C)(y)) + emb from the conv output y and its partial statistics,
   written once (the block's residual), then LayerNorm(t) @ in_proj^T + bias -> qkv (B, HW, 3C);
2. ``triton_ops.attention`` on the (B, HW, 3, heads, d) view of qkv (not here);
3. ``linear_residual``: attention output @ out_proj^T + bias + t tokens -> a;
4. ``ln_linear(gelu=True)``: gelu(LayerNorm(a) @ fc1^T + bias) -> f;
5. ``linear_residual``: f @ fc2^T + bias + a.

Each op is a ``torch.library.custom_op`` ("fast_unet::...") with a ``register_fake`` and a
``register_autograd``. Backward: the GEMM gradients are torch matmuls; LayerNorm's is recomputed with
``aten.native_layer_norm`` / ``native_layer_norm_backward`` on the saved input (and GELU's from the
recomputed pre-activation with ``aten.gelu_backward``); the GroupNorm + ReLU + emb gradient runs the
Triton kernels of ``kernels/group_norm.py`` (``fast_unet::group_norm_relu_backward``), fed with the sum of
the gradient through the LayerNorm/GEMM and the gradient of the t output itself.

Each op has a ``*_reasons`` function (empty list: the kernels can take the inputs) for dispatch; the
integrating code registers them.
"""
from typing import Optional

import torch
from torch import Tensor

from fast_unet.kernels import linear as _lin
from fast_unet.kernels import ln_backward as _lnb

from . import triton_ops as _tops  # registers fast_unet::group_norm_relu_backward; _device_reasons


def _reasons(check, tensors, *args):
    out = _tops._device_reasons(**tensors)
    try:
        check(*args)
    except (ValueError, TypeError) as e:
        out.append(str(e))
    return out


# ---------------------------------------------------------------------------------------------------
# linear_residual

@torch.library.custom_op("fast_unet::linear_residual", mutates_args=())
def _linear_residual_op(x: Tensor, weight: Tensor, bias: Tensor, residual: Tensor) -> Tensor:
    return _lin.linear_residual(x, weight, bias, residual)


@_linear_residual_op.register_fake
def _(x, weight, bias, residual):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_residual_setup(ctx, inputs, output):
    x, weight, _bias, _residual = inputs
    ctx.save_for_backward(x, weight)


def _linear_residual_backward(ctx, dout):
    x, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    d2 = dout.reshape(-1, weight.shape[0])
    dx = (d2 @ weight).view(x.shape) if need[0] else None
    dw = d2.t() @ x.reshape(-1, x.shape[-1]) if need[1] else None
    db = d2.sum(0) if need[2] else None
    return dx, dw, db, dout if need[3] else None


torch.library.register_autograd("fast_unet::linear_residual", _linear_residual_backward,
                                setup_context=_linear_residual_setup)


def linear_residual(x, weight, bias, residual):
    """``x @ weight.T + bias + residual``: x (..., K), weight (N_out, K), bias (N_out,), residual
    (..., N_out) -> (..., N_out), all one dtype (float32, bfloat16, float16); residual added in the
    GEMM's epilogue."""
    return torch.ops.fast_unet.linear_residual(x, weight, bias, residual)


def linear_residual_reasons(x, weight, bias, residual):
    return _reasons(_lin.check_linear, dict(x=x, weight=weight, bias=bias, residual=residual),
                    x, weight, bias, residual)


# ---------------------------------------------------------------------------------------------------
# ln_linear

@torch.library.custom_op("fast_unet::ln_linear", mutates_args=())
def _ln_linear_op(x: Tensor, ln_weight: Tensor, ln_bias: Tensor, ln_eps: float, weight: Tensor, bias: Tensor,
                  gelu: bool) -> Tensor:
    return _lin.ln_linear(x, ln_weight, ln_bias, ln_eps, weight, bias, gelu)


@_ln_linear_op.register_fake
def _(x, ln_weight, ln_bias, ln_eps, weight, bias, gelu):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.custom_op("fast_unet::ln_linear_backward", mutates_args=())
def _ln_linear_bwd_op(d2: Tensor, x2: Tensor, ln_weight: Tensor, ln_eps: float,
                      weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return _lnb.ln_linear_bwd(d2, x2, ln_weight, ln_eps, weight)


@_ln_linear_bwd_op.register_fake
def _(d2, x2, ln_weight, ln_eps, weight):
    return torch.empty_like(x2), torch.empty_like(ln_weight), torch.empty_like(ln_weight)


def _ln_linear_grads(d2, x2, ln_weight, ln_bias, ln_eps, weight, bias, gelu, need_x, need_ln):
    """Gradients of [gelu](LayerNorm(x2) @ weight.T + bias) for the upstream d2 (M, N_out) ->
    (dx2, d ln_w, d ln_b, dw, db). The normalised input (needed for dw, and the pre-activation for GELU)
    is recomputed with ATen's LayerNorm; dx2 and the LayerNorm's parameter gradients come from one Triton
    GEMM with the LayerNorm backward in its epilogue (kernels/ln_backward.py), so d(normalised input) is
    never written."""
    k = x2.shape[-1]
    h = torch.native_layer_norm(x2, [k], ln_weight, ln_bias, ln_eps)[0]
    if gelu:
        d2 = torch.ops.aten.gelu_backward(d2, torch.nn.functional.linear(h, weight, bias))
    dw = d2.t() @ h
    db = d2.sum(0)
    dx2 = dlw = dlb = None
    if need_x or need_ln:
        dx2, dlw, dlb = torch.ops.fast_unet.ln_linear_backward(d2, x2, ln_weight, float(ln_eps), weight)
    return dx2, dlw, dlb, dw, db


def _ln_linear_setup(ctx, inputs, output):
    x, ln_weight, ln_bias, ln_eps, weight, bias, gelu = inputs
    ctx.save_for_backward(x, ln_weight, ln_bias, weight, bias)
    ctx.ln_eps = ln_eps
    ctx.gelu = gelu


def _ln_linear_backward(ctx, dout):
    x, ln_weight, ln_bias, weight, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    k = x.shape[-1]
    dx2, dlw, dlb, dw, db = _ln_linear_grads(dout.reshape(-1, weight.shape[0]), x.reshape(-1, k), ln_weight,
                                             ln_bias, ctx.ln_eps, weight, bias, ctx.gelu, need[0],
                                             need[1] or need[2])
    return dx2.view(x.shape) if need[0] else None, dlw, dlb, None, dw, db, None


torch.library.register_autograd("fast_unet::ln_linear", _ln_linear_backward, setup_context=_ln_linear_setup)


def ln_linear(x, ln_weight, ln_bias, ln_eps, weight, bias, gelu=False):
    """``[gelu](layer_norm(x, (K,), ln_weight, ln_bias, ln_eps) @ weight.T + bias)`` with the LayerNorm in
    the GEMM's prologue: x (..., K) with K <= 512, ln_weight/ln_bias (K,), weight (N_out, K), bias
    (N_out,) -> (..., N_out). ``gelu``: exact (erf) GELU, F.gelu's default, in the epilogue."""
    return torch.ops.fast_unet.ln_linear(x, ln_weight, ln_bias, float(ln_eps), weight, bias, bool(gelu))


def _check_ln_linear(x, ln_weight, ln_bias, weight, bias):
    _lin.check_linear(x, weight, bias)
    _lin.check_ln(x, ln_weight, ln_bias)


def ln_linear_reasons(x, ln_weight, ln_bias, ln_eps, weight, bias, gelu=False):
    return _reasons(_check_ln_linear, dict(x=x, ln_weight=ln_weight, ln_bias=ln_bias, weight=weight, bias=bias),
                    x, ln_weight, ln_bias, weight, bias)


# ---------------------------------------------------------------------------------------------------
# gn_ln_linear

@torch.library.custom_op("fast_unet::gn_ln_linear", mutates_args=())
def _gn_ln_linear_op(y: Tensor, partials: Tensor, gn_weight: Tensor, gn_bias: Tensor, gn_eps: float,
                     emb: Optional[Tensor], ln_weight: Tensor, ln_bias: Tensor, ln_eps: float, weight: Tensor,
                     bias: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _lin.gn_ln_linear(y, partials, gn_weight, gn_bias, gn_eps, emb, ln_weight, ln_bias, ln_eps, weight, bias)


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
    dt_total = dt
    if dout is not None:
        need_t = need[0] or need[2] or need[3] or need[5]
        dtok, dlw, dlb, dw, db = _ln_linear_grads(dout.reshape(-1, weight.shape[0]), tokens, ln_weight, ln_bias,
                                                  ctx.ln_eps, weight, bias, False, need_t, need[6] or need[7])
        if need_t:
            dtok = dtok.view(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W) channels_last
            dt_total = dtok if dt is None else dtok + dt  # the LN/GEMM path and the residual path
    dy = dgw = dgb = demb = None
    if dt_total is not None and (need[0] or need[2] or need[3] or need[5]):
        dy, dgw, dgb, demb = _tops.norm_backward(dt_total, y, gn_weight, gn_bias, mean, rstd, ctx.emb_dtype)
    return dy, None, dgw, dgb, None, demb, dlw, dlb, None, dw, db


torch.library.register_autograd("fast_unet::gn_ln_linear", _gn_ln_linear_backward, setup_context=_gn_ln_linear_setup)


def gn_ln_linear(y, partials, gn_weight, gn_bias, gn_eps, emb, ln_weight, ln_bias, ln_eps, weight, bias):
    """The attention block's input and QKV projection in one launch -> (out (B, HW, N_out), t).

    t = relu(group_norm(y, 1, gn_weight, gn_bias, gn_eps)) + emb[:, :, None, None], (B, C, H, W)
    channels_last in y's dtype (the block's residual); out = linear(layer_norm(t tokens, (C,), ln_weight,
    ln_bias, ln_eps), weight, bias). y: (B, C, H, W), the conv output, never normalised (channels_last,
    else copied to it); partials: (B, P, 3) float32 (count, mean, M2) of y per tile (the conv epilogue's,
    or ``group_norm._gn_stats_kernel``'s), not differentiable; gn_weight, gn_bias, ln_weight, ln_bias:
    (C,) with C <= 512; emb: (B, C) any strides, or None; weight: (N_out, C); bias: (N_out,). Gradients
    for y, gn_weight, gn_bias, emb, ln_weight, ln_bias, weight and bias."""
    out, t, _mean, _rstd = torch.ops.fast_unet.gn_ln_linear(y, partials, gn_weight, gn_bias, float(gn_eps), emb,
                                                            ln_weight, ln_bias, float(ln_eps), weight, bias)
    return out, t


def _check_gn_ln_linear(y, partials, gn_weight, gn_bias, emb, ln_weight, ln_bias, weight, bias):
    _lin.check_gn(y, partials, gn_weight, gn_bias, emb)
    tokens = y.permute(0, 2, 3, 1)
    _lin.check_linear(tokens, weight, bias, name="y (channels)")
    _lin.check_ln(tokens, ln_weight, ln_bias, name="y (channels)")


def gn_ln_linear_reasons(y, partials, gn_weight, gn_bias, gn_eps, emb, ln_weight, ln_bias, ln_eps, weight, bias):
    out = _reasons(_check_gn_ln_linear,
                   dict(y=y, partials=partials, gn_weight=gn_weight, gn_bias=gn_bias, emb=emb, ln_weight=ln_weight,
                        ln_bias=ln_bias, weight=weight, bias=bias),
                   y, partials, gn_weight, gn_bias, emb, ln_weight, ln_bias, weight, bias)
    if isinstance(partials, Tensor) and partials.requires_grad:
        out.append("partials requires grad; gn_ln_linear gives no gradient for the GroupNorm partials")
    return out


# ---------------------------------------------------------------------------------------------------
# The fused attention path of the model (dispatch.FUSED_PATHS "attention"): SelfAttention in five launches.

def self_attention(sa, x, gn=None):
    """``SelfAttention`` ``sa`` on x (B, C, H, W) channels_last -> (B, C, H, W) channels_last.

    ``gn`` = (partials, gn_weight, gn_bias, gn_eps, emb): x is then a conv output y still to be normalised,
    the block's input being relu(GroupNorm(1, C)(y)) + emb (the fused conv path's lazily normalised
    tensor): the first GEMM normalises it on load and writes it once, as the residual."""
    b, c, h, w = x.shape
    heads = sa.mha.num_heads
    ln1, (ln2, fc1, _, fc2) = sa.ln, sa.ff_self
    mha = sa.mha
    if gn is not None:
        qkv, t = gn_ln_linear(x, *gn[:4], gn[4], ln1.weight, ln1.bias, ln1.eps, mha.in_proj_weight, mha.in_proj_bias)
    else:
        t = x.contiguous(memory_format=torch.channels_last)
        qkv = ln_linear(t.permute(0, 2, 3, 1).reshape(b, h * w, c), ln1.weight, ln1.bias, ln1.eps,
                        mha.in_proj_weight, mha.in_proj_bias)
    tokens = t.permute(0, 2, 3, 1).reshape(b, h * w, c)  # channels_last: a view
    o = _tops.attention(qkv.view(b, h * w, 3, heads, c // heads))
    a = linear_residual(o, mha.out_proj.weight, mha.out_proj.bias, tokens)
    f = ln_linear(a, ln2.weight, ln2.bias, ln2.eps, fc1.weight, fc1.bias, gelu=True)
    out = linear_residual(f, fc2.weight, fc2.bias, a)
    return out.view(b, h, w, c).permute(0, 3, 1, 2)


def fused_attention_reasons(x):
    """Why the fused attention path cannot run the model on input ``x`` (empty: it can). The model's
    attention blocks have C <= 256 and head dims 16-64, which the kernels take."""
    return _tops.fused_conv_reasons(x)


from . import dispatch  # noqa: E402

dispatch.register_fused("attention", fused_attention_reasons)
