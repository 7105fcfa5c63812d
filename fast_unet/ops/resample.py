"""``gn_relu_maxpool`` and ``upsample2x``: the UNet's resampling, with the producer's GroupNorm + ReLU
applied as they read a lazily normalised input.

| op              | backend | implementation                                                          |
|-----------------|---------|-------------------------------------------------------------------------|
| gn_relu_maxpool | triton  | kernels/resample.py ``_gn_relu_pool_kernel``: normalise from the partials, write x and its 2x2 max-pool in one pass |
| gn_relu_maxpool | eager   | fast_unet/eager.py: ``group_norm_relu`` (dispatched) + max_pool2d      |
| upsample2x      | triton  | kernels/resample.py ``_upsample2x_kernel``: bilinear 2x (align_corners=True) of x, or of relu(GroupNorm(x)) normalised on load |
| upsample2x      | eager   | fast_unet/eager.py: ``group_norm_relu`` (dispatched) + F.interpolate   |

Backward (triton): ATen's max-pool and upsample gradients, the Triton GroupNorm backward.
Tests: tests/ops/test_resample.py.
"""
import functools
from typing import Optional

import torch
from torch import Tensor

from .. import backends, dispatch, eager
from .group_norm import checked_partials, group_norm_relu, norm_backward, partials_of, recompute


def gn_relu_maxpool(y, partials, gn_weight, gn_bias, eps):
    """(x, max_pool2d(x, 2)) with x = relu(GroupNorm(1, C)(y)), y's statistics from its ``partials`` (or
    computed here when None). y: (B, C, H, W), H and W even. Outputs channels_last."""
    return dispatch.call("gn_relu_maxpool", y, partials, gn_weight, gn_bias, float(eps))


def upsample2x(x, norm=None):
    """Bilinear 2x upsampling (align_corners=True) of x, or of relu(GroupNorm(1, C)(x)) given ``norm`` =
    (partials or None, gn_weight, gn_bias, eps). x: (B, C, h, w) -> (B, C, 2h, 2w) channels_last."""
    pin, gw, gb, eps = norm if norm is not None else (None, None, None, 0.0)
    return dispatch.call("upsample2x", x, pin, gw, gb, float(eps))


def _k():
    return backends.kernel_module("resample")


# --- gn_relu_maxpool (triton) -------------------------------------------------------------------------

@torch.library.custom_op("fast_unet::gn_relu_maxpool", mutates_args=())
@backends.on_tensor_device
def _gn_pool_op(y: Tensor, partials: Tensor, gn_weight: Tensor, gn_bias: Tensor,
                eps: float) -> tuple[Tensor, Tensor]:
    return _k().gn_relu_maxpool(y, partials, gn_weight, gn_bias, eps)


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
    xn, mean, rstd = recompute(y, pin, gw, gb, ctx.eps)
    dxn = torch.zeros_like(xn) if dx is None else dx.to(xn.dtype)
    if dpooled is not None:
        # the pool's gradient goes to the first maximum of each window, as in max_pool2d's backward
        _, idx = torch.ops.aten.max_pool2d_with_indices(xn, [2, 2], [2, 2], [0, 0], [1, 1], False)
        dxn = dxn + torch.ops.aten.max_pool2d_with_indices_backward(
            dpooled.to(xn.dtype), xn, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
    dy, dgw, dgb, _ = norm_backward(dxn, y, gw, gb, mean, rstd)
    return dy, None, dgw, dgb, None


torch.library.register_autograd("fast_unet::gn_relu_maxpool", _gn_pool_backward, setup_context=_gn_pool_setup)


def triton_gn_relu_maxpool(y, partials, gn_weight, gn_bias, eps):
    partials = partials_of(y, partials)
    return torch.ops.fast_unet.gn_relu_maxpool(y, partials, gn_weight, gn_bias, eps)


def _check_norm(x, partials, gn_weight, gn_bias):
    _k().check_norm(x, checked_partials(x, partials), gn_weight, gn_bias)


def _check_pool(y, partials, gn_weight, gn_bias):
    k = _k()
    k.check_input("y", y)
    _check_norm(y, partials, gn_weight, gn_bias)
    if y.shape[2] % 2 or y.shape[3] % 2:
        raise ValueError(f"y's height and width must be even for the 2x2 max-pool, got {tuple(y.shape[2:])}")


def triton_gn_relu_maxpool_reasons(y, partials, gn_weight, gn_bias, eps):
    return backends.triton_reasons(_check_pool, dict(y=y, partials=partials, gn_weight=gn_weight, gn_bias=gn_bias),
                                   y, partials, gn_weight, gn_bias)


# --- upsample2x (triton) ------------------------------------------------------------------------------

@torch.library.custom_op("fast_unet::upsample2x", mutates_args=())
@backends.on_tensor_device
def _upsample_op(x: Tensor, partials: Optional[Tensor], gn_weight: Optional[Tensor], gn_bias: Optional[Tensor],
                 eps: float) -> Tensor:
    return _k().upsample2x(x, (partials, gn_weight, gn_bias, eps) if partials is not None else None)


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
    dxn = _upsample_grad(dout, x)
    if pin is None:
        return dxn, None, None, None, None
    _xn, mean, rstd = recompute(x, pin, gw, gb, ctx.eps)
    dx, dgw, dgb, _ = norm_backward(dxn, x, gw, gb, mean, rstd)
    return dx, None, dgw, dgb, None


torch.library.register_autograd("fast_unet::upsample2x", _upsample_backward, setup_context=_upsample_setup)


def triton_upsample2x(x, partials, gn_weight, gn_bias, eps):
    if gn_weight is not None:
        partials = partials_of(x, partials)
    return torch.ops.fast_unet.upsample2x(x, partials, gn_weight, gn_bias, eps)


def _check_upsample(x, partials, gn_weight, gn_bias):
    _k().check_input("x", x)
    if gn_weight is not None:
        _check_norm(x, partials, gn_weight, gn_bias)


def triton_upsample2x_reasons(x, partials, gn_weight, gn_bias, eps):
    return backends.triton_reasons(_check_upsample, dict(x=x, partials=partials, gn_weight=gn_weight,
                                                         gn_bias=gn_bias), x, partials, gn_weight, gn_bias)


dispatch.register("gn_relu_maxpool", "triton", triton_gn_relu_maxpool, triton_gn_relu_maxpool_reasons, devices=backends.triton_devices)
dispatch.register("gn_relu_maxpool", "eager", functools.partial(eager.gn_relu_maxpool, normalize=group_norm_relu))
dispatch.register("upsample2x", "triton", triton_upsample2x, triton_upsample2x_reasons, devices=backends.triton_devices)
dispatch.register("upsample2x", "eager", functools.partial(eager.upsample2x, normalize=group_norm_relu))
dispatch.autocast_keep("gn_relu_maxpool", 1)  # partials
dispatch.autocast_keep("upsample2x", 1)  # partials
dispatch.register_autocast(_gn_pool_op, keep=("partials",))
dispatch.register_autocast(_upsample_op, keep=("partials",))
