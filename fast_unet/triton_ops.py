"""Glue of the Triton backend: kernels/ wrapped as ``torch.library`` custom ops, registered with dispatch.

Importing this module (dispatch does it lazily, on the first call of an op) needs Triton: without it the
import raises ImportError and dispatch reports the reason. Each op is a ``torch.library.custom_op``
("fast_unet::...") with a ``register_fake`` (shapes for torch.compile / meta tensors) and a
``register_autograd`` whose backward is itself a custom op, so autograd and torch.compile both work.

Where the kernels run: CUDA tensors always; CPU tensors only when ``TRITON_INTERPRET=1`` was set before
kernels/ was imported (Triton's interpreter, for tests on machines without a GPU). Each op's reasons
function says why it cannot take an input, and dispatch falls back (``auto``) or raises (forced).
"""
import os
from typing import Optional

import torch
from torch import Tensor

import triton  # noqa: F401  (ImportError here disables the backend, with the reason)

from fast_unet.kernels import _common
from fast_unet.kernels import attention as _attn
from fast_unet.kernels import conv as _conv
from fast_unet.kernels import group_norm as _gn
from fast_unet.kernels import resample as _resample
from fast_unet.kernels import time_embedding as _temb

from . import dispatch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _device_reasons(**tensors):
    """Why the Triton kernels cannot run on these tensors' devices (empty list: they can)."""
    out = []
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, Tensor)}
    for name, dev in devices.items():
        if dev.type == "cuda":
            continue
        if dev.type == "cpu":
            if os.environ.get("TRITON_INTERPRET", "0") != "1":
                out.append(f"{name} is on the CPU and TRITON_INTERPRET is not 1 (Triton kernels need a CUDA "
                           f"device, or the Triton interpreter for CPU tensors)")
            elif not _common.INTERPRET:
                out.append(f"{name} is on the CPU but kernels/ was imported before TRITON_INTERPRET=1 was set")
            continue
        out.append(f"{name} is on {dev}; the Triton kernels run on CUDA (or on the CPU under TRITON_INTERPRET=1)")
    if len(set(devices.values())) > 1:
        out.append("tensors are on different devices: " + ", ".join(f"{n} on {d}" for n, d in devices.items()))
    return out


# ---------------------------------------------------------------------------------------------------
# group_norm_relu

@torch.library.custom_op("fast_unet::group_norm_relu", mutates_args=())
def _gn_relu_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                emb: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return _gn.group_norm_relu_fwd(x, weight, bias, eps, emb)


@_gn_relu_op.register_fake
def _(x, weight, bias, eps, emb):
    stats = x.new_empty((x.shape[0],), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("fast_unet::group_norm_relu_backward", mutates_args=())
def _gn_relu_bwd_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
                    rstd: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _gn.group_norm_relu_bwd(dy, x, weight, bias, mean, rstd)


@_gn_relu_bwd_op.register_fake
def _(dy, x, weight, bias, mean, rstd):
    c = x.new_empty((x.shape[1],), dtype=weight.dtype)
    return torch.empty_like(x), c, torch.empty_like(c), x.new_empty(x.shape[:2], dtype=weight.dtype)


def norm_backward(dout, x, weight, bias, mean, rstd, emb_dtype=None):
    """(dx, d weight, d bias, d emb) of relu(GroupNorm(1, C)(x)) + emb for the gradient ``dout``, on the
    Triton GroupNorm backward; d weight and d bias come in the weight's dtype, d emb in ``emb_dtype``
    (None: there was no emb). Every op that folds a GroupNorm takes its backward through here."""
    dx, dw, db, demb = torch.ops.fast_unet.group_norm_relu_backward(dout, x, weight, bias, mean, rstd)
    return dx, dw, db, demb.to(emb_dtype) if emb_dtype is not None else None


def _save_norm(ctx, x, weight, bias, emb, mean, rstd):
    """setup_context of an op whose outputs include relu(GroupNorm(x)) + emb and its (B,) statistics."""
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs without a gradient
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.emb_dtype = emb.dtype if emb is not None else None
    ctx.mark_non_differentiable(mean, rstd)


def _gn_setup(ctx, inputs, output):
    x, weight, bias, _eps, emb = inputs
    _save_norm(ctx, x, weight, bias, emb, *output[1:])


def _gn_backward(ctx, dy, _dmean, _drstd):
    dx, dw, db, demb = norm_backward(dy, *ctx.saved_tensors, ctx.emb_dtype)
    return dx, dw, db, None, demb


torch.library.register_autograd("fast_unet::group_norm_relu", _gn_backward, setup_context=_gn_setup)


def group_norm_relu(x, weight, bias, eps=1e-5, emb=None):
    """``relu(GroupNorm(1, C)(x)) + emb[:, :, None, None]`` on the Triton kernels (see fast_unet.ops)."""
    return torch.ops.fast_unet.group_norm_relu(x, weight, bias, float(eps), emb)[0]


def group_norm_relu_reasons(x, weight, bias, eps=1e-5, emb=None):
    out = _device_reasons(x=x, weight=weight, bias=bias, emb=emb)
    for name, p in (("weight", weight), ("bias", bias), ("emb", emb)):
        if p is not None and not p.is_floating_point():
            out.append(f"{name} must be floating point, got {p.dtype}")
    try:
        _gn.check_group_norm(x, weight, bias, emb)
    except (ValueError, TypeError) as e:
        out.append(str(e))
    return out


# ---------------------------------------------------------------------------------------------------
# attention

@torch.library.custom_op("fast_unet::attention", mutates_args=())
def _attn_op(qkv: Tensor) -> tuple[Tensor, Tensor]:
    return _attn.attention_fwd(qkv)


@_attn_op.register_fake
def _(qkv):
    b, n, _, h, d = qkv.shape
    return qkv.new_empty((b, n, h * d)), qkv.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("fast_unet::attention_backward", mutates_args=())
def _attn_bwd_op(do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor) -> Tensor:
    return _attn.attention_bwd(do, qkv, o, lse)


@_attn_bwd_op.register_fake
def _(do, qkv, o, lse):
    return qkv.new_empty(qkv.shape)


def _attn_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs without a gradient
    (qkv,) = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse)
    ctx.mark_non_differentiable(lse)


def _attn_backward(ctx, do, _dlse):
    qkv, o, lse = ctx.saved_tensors
    return torch.ops.fast_unet.attention_backward(do, qkv, o, lse)


torch.library.register_autograd("fast_unet::attention", _attn_backward, setup_context=_attn_setup)


def attention(qkv):
    """Flash attention from the packed (B, N, 3, heads, d) projection -> (B, N, heads * d)."""
    return torch.ops.fast_unet.attention(qkv)[0]


def attention_reasons(qkv):
    out = _device_reasons(qkv=qkv)
    try:
        _attn.check_qkv(qkv)
    except (ValueError, TypeError) as e:
        out.append(str(e))
    return out


# ---------------------------------------------------------------------------------------------------
# time_embedding

@torch.library.custom_op("fast_unet::time_embedding", mutates_args=())
def _temb_op(t: Tensor, dim: int, relu_weight: Tensor, relu_bias: Tensor, silu_weight: Tensor,
             silu_bias: Tensor) -> tuple[Tensor, Tensor]:
    return _temb.time_embedding_fwd(t, dim, relu_weight, relu_bias, silu_weight, silu_bias)


@_temb_op.register_fake
def _(t, dim, relu_weight, relu_bias, silu_weight, silu_bias):
    b = t.shape[0]
    return relu_weight.new_empty((b, relu_weight.shape[0])), relu_weight.new_empty((b, silu_weight.shape[0]))


@torch.library.custom_op("fast_unet::time_embedding_backward", mutates_args=())
def _temb_bwd_op(g_down: Tensor, g_up: Tensor, t: Tensor, dim: int, relu_weight: Tensor,
                 silu_weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _temb.time_embedding_bwd(g_down, g_up, t, dim, relu_weight, silu_weight)


@_temb_bwd_op.register_fake
def _(g_down, g_up, t, dim, relu_weight, silu_weight):
    f32 = dict(dtype=torch.float32)
    return (relu_weight.new_empty(relu_weight.shape, **f32), relu_weight.new_empty(relu_weight.shape[:1], **f32),
            silu_weight.new_empty(silu_weight.shape, **f32), silu_weight.new_empty(silu_weight.shape[:1], **f32))


def _temb_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs without a gradient
    t, dim, relu_weight, _rb, silu_weight, _sb = inputs
    ctx.save_for_backward(t, relu_weight, silu_weight)
    ctx.dim = dim


def _temb_backward(ctx, g_down, g_up):
    t, rw, sw = ctx.saved_tensors
    if g_down is None:
        g_down = rw.new_zeros((t.shape[0], rw.shape[0]))
    if g_up is None:
        g_up = sw.new_zeros((t.shape[0], sw.shape[0]))
    drw, drb, dsw, dsb = torch.ops.fast_unet.time_embedding_backward(g_down, g_up, t, ctx.dim, rw, sw)
    # t holds integer (or non-differentiable) timesteps: no gradient for it, nor for dim.
    return None, None, drw.to(rw.dtype), drb.to(rw.dtype), dsw.to(sw.dtype), dsb.to(sw.dtype)


torch.library.register_autograd("fast_unet::time_embedding", _temb_backward, setup_context=_temb_setup)


def time_embedding(t, dim, relu_weight, relu_bias, silu_weight, silu_bias):
    """Every block's time embedding in one launch -> (down (B, sum C_down), up (B, sum C_up))."""
    down, up = torch.ops.fast_unet.time_embedding(t, int(dim), relu_weight, relu_bias, silu_weight, silu_bias)
    return down, up


def time_embedding_reasons(t, dim, relu_weight, relu_bias, silu_weight, silu_bias):
    out = _device_reasons(t=t, relu_weight=relu_weight, relu_bias=relu_bias, silu_weight=silu_weight,
                          silu_bias=silu_bias)
    if isinstance(t, Tensor) and t.requires_grad:
        out.append("t requires grad; the Triton time embedding gives no gradient for t")
    try:
        _temb.check_time_embedding(t, dim, relu_weight, relu_bias, silu_weight, silu_bias)
    except (ValueError, TypeError) as e:
        out.append(str(e))
    return out


# ---------------------------------------------------------------------------------------------------
# The fused model path (fast_unet/fused.py): the conv3x3 with GroupNorm statistics in its epilogue, which
# normalises its input on load (or concatenates two inputs on load); the normalise + max-pool pass; the
# (normalise +) bilinear upsample. A "lazily normalised" tensor is a conv output y with its partials: its
# consumer applies relu(GroupNorm(1, C)(y)). Backward: cuDNN/ATen for the conv, pool and upsample
# gradients; the Triton GroupNorm kernels recompute the normalised input and take the norm's backward.

def _conv_out_fake(x, weight):
    b, _, h, w = x.shape
    return x.new_empty((b, weight.shape[0], h, w)).contiguous(memory_format=torch.channels_last)


@torch.library.custom_op("fast_unet::conv3x3", mutates_args=())
def _conv3x3_op(x: Tensor, x2: Optional[Tensor], partials_in: Optional[Tensor], gn_weight: Optional[Tensor],
                gn_bias: Optional[Tensor], eps: float, weight: Tensor, bias: Tensor,
                pool: bool) -> tuple[Tensor, Tensor]:
    norm = (partials_in, gn_weight, gn_bias, eps) if partials_in is not None else None
    return _conv.conv3x3_stats(x, weight, bias, x2=x2, norm=norm, pool=pool)


@_conv3x3_op.register_fake
def _(x, x2, partials_in, gn_weight, gn_bias, eps, weight, bias, pool):
    b, _, h, w = x.shape
    if pool:
        h, w = h // 2, w // 2
    bm, bn = _conv.config(x.dtype, weight.shape[1], h * w, pool)[:2]
    p = -(-h * w // bm) * -(-weight.shape[0] // bn)
    y = x.new_empty((b, weight.shape[0], h, w)).contiguous(memory_format=torch.channels_last)
    return y, x.new_empty((b, p, 3), dtype=torch.float32)


@torch.library.custom_op("fast_unet::gn_relu_partials", mutates_args=())
def _gn_partials_op(y: Tensor, partials: Tensor, gn_weight: Tensor, gn_bias: Tensor, eps: float,
                    emb: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(relu(GroupNorm(1, C)(y)) + emb, mean, rstd) from y's partials (one apply launch that folds them):
    a lazily normalised tensor materialised, or recomputed in a backward."""
    return _gn.apply_from_partials(y, partials, eps, gn_weight, gn_bias, emb)


@_gn_partials_op.register_fake
def _(y, partials, gn_weight, gn_bias, eps, emb):
    stats = y.new_empty((y.shape[0],), dtype=torch.float32)
    return torch.empty_like(y), stats, torch.empty_like(stats)


def _gn_partials_setup(ctx, inputs, output):
    y, _partials, gn_weight, gn_bias, _eps, emb = inputs
    _save_norm(ctx, y, gn_weight, gn_bias, emb, *output[1:])


def _gn_partials_backward(ctx, dout, _dmean, _drstd):
    dy, dgw, dgb, demb = norm_backward(dout, *ctx.saved_tensors, ctx.emb_dtype)
    return dy, None, dgw, dgb, None, demb


torch.library.register_autograd("fast_unet::gn_relu_partials", _gn_partials_backward,
                                setup_context=_gn_partials_setup)


def _recompute(y, partials, gn_weight, gn_bias, eps):
    """(relu(GroupNorm(y)), mean, rstd) in a backward (no graph)."""
    return torch.ops.fast_unet.gn_relu_partials(y, partials, gn_weight, gn_bias, eps, None)


def _conv_backward(dy, x, weight):
    """(dx, dweight, dbias) of the 3x3, stride 1, padding 1 convolution (cuDNN on a GPU)."""
    dx, dw, db = torch.ops.aten.convolution_backward(
        dy.to(x.dtype), x, weight, [weight.shape[0]], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, True])
    return dx, dw, db


def _conv3x3_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs without a gradient
    x, x2, partials_in, gn_weight, gn_bias, eps, weight, _bias, pool = inputs
    ctx.save_for_backward(x, x2, partials_in, gn_weight, gn_bias, weight)
    ctx.eps = eps
    ctx.pool = pool
    ctx.mark_non_differentiable(output[1])


def _conv3x3_backward(ctx, dy, _dpartials):
    x, x2, pin, gw, gb, weight = ctx.saved_tensors
    if pin is not None:
        xn, mean, rstd = _recompute(x, pin, gw, gb, ctx.eps)
        dxn, dw, db = _conv_backward(dy, xn, weight)
        dx, dgw, dgb, _ = norm_backward(dxn, x, gw, gb, mean, rstd)
        return dx, None, None, dgw, dgb, None, dw, db, None
    if x2 is not None:
        dcat, dw, db = _conv_backward(dy, torch.cat([x, x2], dim=1), weight)
        dx, dx2 = dcat.split([x.shape[1], x2.shape[1]], dim=1)
        return dx, dx2, None, None, None, None, dw, db, None
    if ctx.pool:
        # the pool's gradient goes to the first maximum of each window, as in max_pool2d's backward
        xp, idx = torch.ops.aten.max_pool2d_with_indices(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
        dxp, dw, db = _conv_backward(dy, xp, weight)
        dx = torch.ops.aten.max_pool2d_with_indices_backward(dxp, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
        return dx, None, None, None, None, None, dw, db, None
    dx, dw, db = _conv_backward(dy, x, weight)
    return dx, None, None, None, None, None, dw, db, None


torch.library.register_autograd("fast_unet::conv3x3", _conv3x3_backward, setup_context=_conv3x3_setup)


@torch.library.custom_op("fast_unet::gn_relu_maxpool", mutates_args=())
def _gn_pool_op(y: Tensor, partials: Tensor, gn_weight: Tensor, gn_bias: Tensor,
                eps: float) -> tuple[Tensor, Tensor]:
    return _resample.gn_relu_maxpool(y, partials, gn_weight, gn_bias, eps)


@_gn_pool_op.register_fake
def _(y, partials, gn_weight, gn_bias, eps):
    b, c, h, w = y.shape
    return (torch.empty_like(y, memory_format=torch.channels_last),
            y.new_empty((b, c, h // 2, w // 2)).contiguous(memory_format=torch.channels_last))


def _gn_pool_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs without a gradient
    y, partials, gn_weight, gn_bias, eps = inputs
    ctx.save_for_backward(y, partials, gn_weight, gn_bias)
    ctx.eps = eps


def _gn_pool_backward(ctx, dx, dpooled):
    y, pin, gw, gb = ctx.saved_tensors
    xn, mean, rstd = _recompute(y, pin, gw, gb, ctx.eps)
    dxn = torch.zeros_like(xn) if dx is None else dx.to(xn.dtype)
    if dpooled is not None:
        # the pool's gradient goes to the first maximum of each window, as in max_pool2d's backward
        _, idx = torch.ops.aten.max_pool2d_with_indices(xn, [2, 2], [2, 2], [0, 0], [1, 1], False)
        dxn = dxn + torch.ops.aten.max_pool2d_with_indices_backward(
            dpooled.to(xn.dtype), xn, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
    dy, dgw, dgb, _ = norm_backward(dxn, y, gw, gb, mean, rstd)
    return dy, None, dgw, dgb, None


torch.library.register_autograd("fast_unet::gn_relu_maxpool", _gn_pool_backward, setup_context=_gn_pool_setup)


@torch.library.custom_op("fast_unet::upsample2x", mutates_args=())
def _upsample_op(x: Tensor, partials: Optional[Tensor], gn_weight: Optional[Tensor], gn_bias: Optional[Tensor],
                 eps: float) -> Tensor:
    return _resample.upsample2x(x, (partials, gn_weight, gn_bias, eps) if partials is not None else None)


@_upsample_op.register_fake
def _(x, partials, gn_weight, gn_bias, eps):
    b, c, h, w = x.shape
    return x.new_empty((b, c, 2 * h, 2 * w)).contiguous(memory_format=torch.channels_last)


def _upsample_grad(dout, x):
    """The gradient of F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True) for ``dout``:
    ATen's upsample backward. With symbolic sizes (torch.compile with dynamic shapes) calling
    upsample_bilinear2d_backward trips an internal assert in torch 2.14's fake tensors (found by opcheck),
    so there it goes through torch.func.vjp of the (linear) forward at zeros of x's shape instead."""
    if all(type(d) is int for d in x.shape):
        return torch.ops.aten.upsample_bilinear2d_backward(dout, list(dout.shape[2:]), list(x.shape), True)
    up = lambda v: torch.nn.functional.interpolate(v, scale_factor=2, mode="bilinear", align_corners=True)  # noqa: E731
    _, vjp = torch.func.vjp(up, dout.new_zeros(x.shape).contiguous(memory_format=torch.channels_last))
    return vjp(dout)[0]


def _upsample_setup(ctx, inputs, output):
    x, partials, gn_weight, gn_bias, eps = inputs
    ctx.save_for_backward(x, partials, gn_weight, gn_bias)
    ctx.eps = eps


def _upsample_backward(ctx, dout):
    x, pin, gw, gb = ctx.saved_tensors
    b, c, h, w = x.shape
    dxn = _upsample_grad(dout, x)
    if pin is None:
        return dxn, None, None, None, None
    _xn, mean, rstd = _recompute(x, pin, gw, gb, ctx.eps)
    dx, dgw, dgb, _ = norm_backward(dxn, x, gw, gb, mean, rstd)
    return dx, None, dgw, dgb, None


torch.library.register_autograd("fast_unet::upsample2x", _upsample_backward, setup_context=_upsample_setup)


def gn_relu_partials(y, partials, gn_weight, gn_bias, eps, emb=None):
    """relu(GroupNorm(1, C)(y)) + emb[:, :, None, None] with y's statistics from its partials."""
    return torch.ops.fast_unet.gn_relu_partials(y, partials, gn_weight, gn_bias, float(eps), emb)[0]


def conv3x3(x, weight, bias, x2=None, norm=None, pool=False):
    """(y, partials): the Triton 3x3 conv (padding 1) of x, of cat([x, x2], 1) (``x2``), of
    relu(GroupNorm(1, C)(x)) normalised on load (``norm`` = (partials, gn_weight, gn_bias, eps) of x), or
    of max_pool2d(x, 2) pooled on load (``pool``); ``partials`` (B, P, 3) float32 are y's GroupNorm
    statistics, for y's consumer."""
    pin, gw, gb, eps = norm if norm is not None else (None, None, None, 0.0)
    return torch.ops.fast_unet.conv3x3(x, x2, pin, gw, gb, float(eps), weight, bias, bool(pool))


def gn_relu_maxpool(y, partials, gn_weight, gn_bias, eps):
    """(x, max_pool2d(x, 2)) with x = relu(GroupNorm(1, C)(y)) from y's partials, in one pass."""
    return torch.ops.fast_unet.gn_relu_maxpool(y, partials, gn_weight, gn_bias, float(eps))


def upsample2x(x, norm=None):
    """Bilinear 2x upsampling (align_corners=True) of x, or of relu(GroupNorm(1, C)(x)) given ``norm``."""
    pin, gw, gb, eps = norm if norm is not None else (None, None, None, 0.0)
    return torch.ops.fast_unet.upsample2x(x, pin, gw, gb, float(eps))


def conv3x3_reasons(x, weight, bias, x2=None, norm=None, pool=False):
    out = _device_reasons(x=x, weight=weight, bias=bias, x2=x2,
                          **(dict(zip(("partials", "gn_weight", "gn_bias"), norm[:3])) if norm else {}))
    try:
        _conv.check_conv(x, weight, bias, x2, norm, pool)
    except (ValueError, TypeError) as e:
        out.append(str(e))
    return out


def fused_conv_reasons(x):
    """Why the fused conv path cannot run the model on input ``x`` (empty: it can)."""
    out = _device_reasons(x=x)
    if isinstance(x, Tensor) and x.dtype not in DTYPES:
        out.append(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    return out


dispatch.register_fused("conv", fused_conv_reasons)
dispatch.register("group_norm_relu", "triton", group_norm_relu, group_norm_relu_reasons)
dispatch.register("attention", "triton", attention, attention_reasons)
dispatch.register("time_embedding", "triton", time_embedding, time_embedding_reasons)


from . import triton_block  # noqa: E402,F401  (the attention block's ops; registers the fused attention path)
