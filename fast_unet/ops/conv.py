"""``conv3x3``: the model's 3x3 convolution (stride 1, padding 1), which can read its input lazily
normalised, max-pooled or concatenated, and can write its output's GroupNorm statistics.

| backend | implementation                                                                  | devices, dtypes |
|---------|---------------------------------------------------------------------------------|-----------------|
| triton  | kernels/conv.py: implicit GEMM over NHWC; relu(GroupNorm) from the producer's partials, the 2x2 max-pool, or a second tensor's channels applied as it loads its input; bias and GroupNorm(1, C) partial statistics in its epilogue. Backward: Triton data gradient (the pool's routing, the concat's split, the ReLU mask and the GroupNorm backward's sums in its epilogue; then the GroupNorm backward's apply pass) and weight gradient reading the input as the forward does | CUDA (CPU under the interpreter); fp32/bf16/fp16 |
| eager   | fast_unet/eager.py ``conv3x3``: ``group_norm_relu`` (dispatched), cat, max_pool2d, F.conv2d; no statistics | any |

Tests: tests/ops/test_conv.py.
"""
import functools
from typing import Optional

import torch
from torch import Tensor

from .. import backends, dispatch, eager
from .group_norm import checked_partials, group_norm_relu, partials_of


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


@torch.library.custom_op("fast_unet::conv3x3_backward", mutates_args=())
@backends.on_tensor_device
def _conv3x3_bwd_op(dy: Tensor, x: Tensor, x2: Optional[Tensor], partials_in: Optional[Tensor],
                    gn_weight: Optional[Tensor], gn_bias: Optional[Tensor], eps: float, weight: Tensor,
                    bias: Tensor, pool: bool, input_grad: bool) -> list[Tensor]:
    """[dx, dx2, d weight, d bias, d gn_weight, d gn_bias]; an empty tensor for each gradient that does
    not apply (``bias`` is read for its dtype only)."""
    norm = (partials_in, gn_weight, gn_bias, eps) if partials_in is not None else None
    grads = _k().conv3x3_bwd(dy, x, weight, bias.dtype, x2=x2, norm=norm, pool=pool, input_grad=input_grad)
    return [g if g is not None else x.new_empty(0) for g in grads]


@_conv3x3_bwd_op.register_fake
def _(dy, x, x2, partials_in, gn_weight, gn_bias, eps, weight, bias, pool, input_grad):
    def like(t, keep):
        return torch.empty_like(t) if keep and t is not None else x.new_empty(0)

    norm = partials_in is not None
    dx2 = like(x2, input_grad)
    if x2 is not None and input_grad:
        dx2 = dx2.contiguous(memory_format=torch.channels_last)
    return [like(x, input_grad), dx2, torch.empty_like(weight), torch.empty_like(bias),
            like(gn_weight, norm), like(gn_bias, norm)]


def _conv3x3_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs without a gradient
    x, x2, partials_in, gn_weight, gn_bias, eps, weight, bias, pool = inputs
    ctx.save_for_backward(x, x2, partials_in, gn_weight, gn_bias, weight, bias)
    ctx.eps = eps
    ctx.pool = pool
    ctx.mark_non_differentiable(output[1])


def _conv3x3_backward(ctx, dy, _dpartials):
    """The Triton data and weight gradients (kernels/conv.py ``conv3x3_bwd``): the input read as the
    forward read it (normalised, concatenated, max-pooled on load), nothing rebuilt first."""
    x, x2, pin, gw, gb, weight, bias = ctx.saved_tensors
    need = ctx.needs_input_grad
    input_grad = bool(need[0] or need[1] or need[3] or need[4])
    dx, dx2, dw, db, dgw, dgb = torch.ops.fast_unet.conv3x3_backward(dy, x, x2, pin, gw, gb, ctx.eps, weight, bias,
                                                                     ctx.pool, input_grad)
    some = lambda t, applies: t if applies else None  # noqa: E731
    return (some(dx, input_grad), some(dx2, input_grad and x2 is not None), None, some(dgw, pin is not None),
            some(dgb, pin is not None), None, dw, db, None)


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
