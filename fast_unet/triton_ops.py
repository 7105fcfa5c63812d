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

from kernels import _common
from kernels import attention as _attn
from kernels import conv as _conv
from kernels import group_norm as _gn
from kernels import time_embedding as _temb

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
    c = x.new_empty((x.shape[1],), dtype=torch.float32)
    return torch.empty_like(x), c, torch.empty_like(c), x.new_empty(x.shape[:2], dtype=torch.float32)


def _gn_setup(ctx, inputs, output):
    x, weight, bias, _eps, emb = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.emb_dtype = emb.dtype if emb is not None else None
    ctx.mark_non_differentiable(mean, rstd)


def _gn_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db, demb = torch.ops.fast_unet.group_norm_relu_backward(dy, x, weight, bias, mean, rstd)
    demb = demb.to(ctx.emb_dtype) if ctx.emb_dtype is not None else None
    return dx, dw.to(weight.dtype), db.to(bias.dtype), None, demb


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
        _gn._check(x, weight, bias, emb)
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
        _temb.check(t, dim, relu_weight, relu_bias, silu_weight, silu_bias)
    except (ValueError, TypeError) as e:
        out.append(str(e))
    return out


# ---------------------------------------------------------------------------------------------------
# conv3x3 + GroupNorm(1, C) + ReLU + emb (the optional fused path, FAST_UNET_FUSED_CONV=1)

@torch.library.custom_op("fast_unet::conv3x3_gn_stats", mutates_args=())
def _conv_stats_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    return _conv.conv3x3_gn_stats(x, weight, bias, eps)


def _conv_out_fake(x, weight):
    b, _, h, w = x.shape
    return x.new_empty((b, weight.shape[0], h, w)).contiguous(memory_format=torch.channels_last)


@_conv_stats_op.register_fake
def _(x, weight, bias, eps):
    stats = x.new_empty((x.shape[0],), dtype=torch.float32)
    return _conv_out_fake(x, weight), stats, torch.empty_like(stats)


def _conv_backward(dy, x, weight):
    """(dx, dweight, dbias) of the 3x3, stride 1, padding 1 convolution (cuDNN on a GPU)."""
    dx, dw, db = torch.ops.aten.convolution_backward(
        dy.to(x.dtype), x, weight, [weight.shape[0]], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, True])
    return dx, dw, db


def _conv_stats_setup(ctx, inputs, output):
    x, weight, _bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight)
    ctx.mark_non_differentiable(mean, rstd)


def _conv_stats_backward(ctx, dy, _dmean, _drstd):
    # mean and rstd are non-differentiable outputs: only y carries a gradient.
    x, weight = ctx.saved_tensors
    dx, dw, db = _conv_backward(dy, x, weight)
    return dx, dw, db, None


torch.library.register_autograd("fast_unet::conv3x3_gn_stats", _conv_stats_backward, setup_context=_conv_stats_setup)


@torch.library.custom_op("fast_unet::conv3x3_gn_relu", mutates_args=())
def _conv_gn_relu_op(x: Tensor, weight: Tensor, bias: Tensor, gn_weight: Tensor, gn_bias: Tensor, eps: float,
                     emb: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, mean, rstd = _conv.conv3x3_gn_stats(x, weight, bias, eps)
    return _conv.gn_relu_apply(y, mean, rstd, gn_weight, gn_bias, emb), y, mean, rstd


@_conv_gn_relu_op.register_fake
def _(x, weight, bias, gn_weight, gn_bias, eps, emb):
    stats = x.new_empty((x.shape[0],), dtype=torch.float32)
    y = _conv_out_fake(x, weight)
    return torch.empty_like(y), torch.empty_like(y), stats, torch.empty_like(stats)


def _conv_gn_relu_setup(ctx, inputs, output):
    x, weight, _bias, gn_weight, gn_bias, _eps, emb = inputs
    _out, y, mean, rstd = output
    ctx.save_for_backward(x, weight, y, gn_weight, gn_bias, mean, rstd)
    ctx.emb_dtype = emb.dtype if emb is not None else None
    ctx.mark_non_differentiable(y, mean, rstd)


def _conv_gn_relu_backward(ctx, dout, _dy, _dmean, _drstd):
    x, weight, y, gn_weight, gn_bias, mean, rstd = ctx.saved_tensors
    dy, dgw, dgb, demb = torch.ops.fast_unet.group_norm_relu_backward(dout, y, gn_weight, gn_bias, mean, rstd)
    dx, dw, db = _conv_backward(dy, x, weight)
    demb = demb.to(ctx.emb_dtype) if ctx.emb_dtype is not None else None
    return dx, dw, db, dgw.to(gn_weight.dtype), dgb.to(gn_bias.dtype), None, demb


torch.library.register_autograd("fast_unet::conv3x3_gn_relu", _conv_gn_relu_backward,
                                setup_context=_conv_gn_relu_setup)


def conv3x3_gn_stats(x, weight, bias, eps=1e-5):
    """(y, mean, rstd): the 3x3 conv (padding 1) and its GroupNorm(1, C) statistics from the epilogue."""
    return torch.ops.fast_unet.conv3x3_gn_stats(x, weight, bias, float(eps))


def conv3x3_gn_relu(x, weight, bias, gn_weight, gn_bias, eps=1e-5, emb=None):
    """``relu(GroupNorm(1, C)(conv3x3(x))) + emb``: conv with statistics in its epilogue, combine, apply."""
    return torch.ops.fast_unet.conv3x3_gn_relu(x, weight, bias, gn_weight, gn_bias, float(eps), emb)[0]


def conv3x3_gn_relu_reasons(x, weight, bias, gn_weight, gn_bias, eps=1e-5, emb=None):
    out = _device_reasons(x=x, weight=weight, bias=bias, gn_weight=gn_weight, gn_bias=gn_bias, emb=emb)
    try:
        _conv.check(x, weight, bias)
    except (ValueError, TypeError) as e:
        out.append(str(e))
    if isinstance(x, Tensor) and x.dim() == 4:
        b, _, h, w = x.shape
        try:
            _gn._check(x.new_empty((b, weight.shape[0], h, w), device="meta"), gn_weight.to("meta"),
                       gn_bias.to("meta"), emb.to("meta") if emb is not None else None)
        except (ValueError, TypeError, AttributeError, IndexError) as e:
            out.append(str(e))
    return out


dispatch.register_fused("conv3x3_gn_relu", conv3x3_gn_relu, conv3x3_gn_relu_reasons)


dispatch.register("group_norm_relu", "triton", group_norm_relu, group_norm_relu_reasons)
dispatch.register("attention", "triton", attention, attention_reasons)
dispatch.register("time_embedding", "triton", time_embedding, time_embedding_reasons)
