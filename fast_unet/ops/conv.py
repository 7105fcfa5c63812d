"""``conv3x3``: the model's 3x3 convolution (stride 1, padding 1), which can read its input lazily
normalised, max-pooled or concatenated, and can write its output's GroupNorm statistics.

| backend | implementation                                                                  | devices, dtypes |
|---------|---------------------------------------------------------------------------------|-----------------|
| triton  | kernels/conv.py: implicit GEMM over NHWC; relu(GroupNorm) from the producer's partials, the 2x2 max-pool, or a second tensor's channels applied as it loads its input; bias and GroupNorm(1, C) partial statistics in its epilogue. Backward: cuDNN/ATen convolution and pool gradients, the Triton GroupNorm backward | CUDA (CPU under the interpreter); fp32/bf16/fp16 |
| eager   | fast_unet/eager.py ``conv3x3``: ``group_norm_relu`` (dispatched), cat, max_pool2d, F.conv2d; no statistics | any |

Tests: tests/ops/test_conv.py.
"""
import functools
from typing import Optional

import torch
from torch import Tensor

from .. import backends, dispatch, eager
from .group_norm import checked_partials, group_norm_relu, norm_backward, partials_of, recompute


def conv3x3(x, weight, bias, x2=None, norm=None, pool=False):
    """(y, partials): the 3x3 conv (padding 1) of its input, which is

    - x (B, C_in, H, W), any strides; or
    - ``x2`` given: cat([x, x2], dim=1), read in place; or
    - ``norm`` = (partials or None, gn_weight, gn_bias, eps): relu(GroupNorm(1, C)(x)), normalised as it is
      loaded, with x's statistics from its producer's partials (None: computed here); or
    - ``pool``: max_pool2d(x, 2).

    y: (B, C_out, H, W) channels_last in x's dtype; partials: y's (B, P, 3) float32 GroupNorm statistics
    per tile, for y's consumer, or None when the backend that ran wrote none."""
    pin, gw, gb, eps = norm if norm is not None else (None, None, None, 0.0)
    return dispatch.call("conv3x3", x, x2, pin, gw, gb, float(eps), weight, bias, bool(pool))


def _k():
    return backends.kernel_module("conv")


@torch.library.custom_op("fast_unet::conv3x3", mutates_args=())
@backends.on_tensor_device
def _conv3x3_op(x: Tensor, x2: Optional[Tensor], partials_in: Optional[Tensor], gn_weight: Optional[Tensor],
                gn_bias: Optional[Tensor], eps: float, weight: Tensor, bias: Tensor,
                pool: bool) -> tuple[Tensor, Tensor]:
    norm = (partials_in, gn_weight, gn_bias, eps) if partials_in is not None else None
    return _k().conv3x3_stats(x, weight, bias, x2=x2, norm=norm, pool=pool)


@_conv3x3_op.register_fake
def _(x, x2, partials_in, gn_weight, gn_bias, eps, weight, bias, pool):
    b, _, h, w = x.shape
    if pool:
        h, w = h // 2, w // 2
    bm, bn = _k().config(x.dtype, weight.shape[1], h * w, pool, weight.shape[0], partials_in is not None,
                         x2 is not None)[:2]
    p = -(-h * w // bm) * -(-weight.shape[0] // bn)
    y = x.new_empty((b, weight.shape[0], h, w)).contiguous(memory_format=torch.channels_last)
    return y, x.new_empty((b, p, 3), dtype=torch.float32)


def _conv_backward(dy, x, weight, bias_dtype):
    """(dx, dweight, dbias) of the 3x3, stride 1, padding 1 convolution (cuDNN on a GPU); dbias in
    ``bias_dtype`` (a float32 bias of a lower-precision conv: summed in float32, not rounded to x's dtype)."""
    dy = dy.to(x.dtype)
    if bias_dtype == x.dtype:
        return torch.ops.aten.convolution_backward(
            dy, x, weight, [weight.shape[0]], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, True])
    dx, dw, _ = torch.ops.aten.convolution_backward(
        dy, x, weight, [weight.shape[0]], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
    return dx, dw, dy.sum((0, 2, 3), dtype=bias_dtype)


def _conv3x3_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs without a gradient
    x, x2, partials_in, gn_weight, gn_bias, eps, weight, bias, pool = inputs
    ctx.save_for_backward(x, x2, partials_in, gn_weight, gn_bias, weight)
    ctx.eps = eps
    ctx.pool = pool
    ctx.bias_dtype = bias.dtype
    ctx.mark_non_differentiable(output[1])


def _conv3x3_backward(ctx, dy, _dpartials):
    x, x2, pin, gw, gb, weight = ctx.saved_tensors
    if pin is not None:
        xn, mean, rstd = recompute(x, pin, gw, gb, ctx.eps)
        dxn, dw, db = _conv_backward(dy, xn, weight, ctx.bias_dtype)
        dx, dgw, dgb, _ = norm_backward(dxn, x, gw, gb, mean, rstd)
        return dx, None, None, dgw, dgb, None, dw, db, None
    if x2 is not None:
        dcat, dw, db = _conv_backward(dy, torch.cat([x, x2], dim=1), weight, ctx.bias_dtype)
        dx, dx2 = dcat.split([x.shape[1], x2.shape[1]], dim=1)
        return dx, dx2, None, None, None, None, dw, db, None
    if ctx.pool:
        # the pool's gradient goes to the first maximum of each window, as in max_pool2d's backward
        xp, idx = torch.ops.aten.max_pool2d_with_indices(x, [2, 2], [2, 2], [0, 0], [1, 1], False)
        dxp, dw, db = _conv_backward(dy, xp, weight, ctx.bias_dtype)
        dx = torch.ops.aten.max_pool2d_with_indices_backward(dxp, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
        return dx, None, None, None, None, None, dw, db, None
    dx, dw, db = _conv_backward(dy, x, weight, ctx.bias_dtype)
    return dx, None, None, None, None, None, dw, db, None


torch.library.register_autograd("fast_unet::conv3x3", _conv3x3_backward, setup_context=_conv3x3_setup)


def triton_conv3x3(x, x2, partials_in, gn_weight, gn_bias, eps, weight, bias, pool):
    if gn_weight is not None:
        partials_in = partials_of(x, partials_in)
    return torch.ops.fast_unet.conv3x3(x, x2, partials_in, gn_weight, gn_bias, eps, weight, bias, pool)


def _check_triton(x, x2, partials_in, gn_weight, gn_bias, eps, weight, bias, pool):
    norm = None
    if gn_weight is not None:
        norm = (checked_partials(x, partials_in, "norm: "), gn_weight, gn_bias, eps)
    _k().check_conv(x, weight, bias, x2, norm, pool)


def triton_reasons(x, x2, partials_in, gn_weight, gn_bias, eps, weight, bias, pool):
    tensors = dict(x=x, x2=x2, partials=partials_in, gn_weight=gn_weight, gn_bias=gn_bias, weight=weight, bias=bias)
    return backends.triton_reasons(_check_triton, tensors, x, x2, partials_in, gn_weight, gn_bias, eps, weight,
                                   bias, pool)


dispatch.register("conv3x3", "triton", triton_conv3x3, triton_reasons, devices=backends.triton_devices)
dispatch.register("conv3x3", "eager", functools.partial(eager.conv3x3, normalize=group_norm_relu))
dispatch.autocast_keep("conv3x3", 2)  # partials
dispatch.register_autocast(_conv3x3_op, keep=("partials_in",))
