"""``time_embedding``: the sinusoidal encoding of the timesteps and every block's activation + Linear, in one op.

| backend | implementation                                                                  | devices, dtypes |
|---------|---------------------------------------------------------------------------------|-----------------|
| triton  | kernels/time_embedding.py: encoding, ReLU/SiLU and both stacked GEMMs in one launch; one backward launch | CUDA (CPU under the interpreter); fp32/bf16/fp16 |
| eager   | fast_unet/eager.py ``time_embedding`` (two F.linear)                              | any             |

The extension has no kernel for it (two small GEMMs: nothing to fuse on the CPU).
Tests: tests/ops/test_time_embedding.py.
"""
import torch
from torch import Tensor

from .. import backends, dispatch, eager


def time_embedding(t, dim, relu_weight, relu_bias, silu_weight, silu_bias):
    """Sinusoidal encoding of t (B,) followed by every block's activation + Linear.

    ``relu_weight`` (sum of the Down blocks' C, dim) is the Down blocks' Linear weights stacked along their
    outputs (their activation is ReLU); ``silu_*`` likewise for the Up blocks. Returns
    (down (B, sum C_down), up (B, sum C_up)) in the weights' dtype."""
    return dispatch.call("time_embedding", t, dim, relu_weight, relu_bias, silu_weight, silu_bias)


def _k():
    return backends.kernel_module("time_embedding")


@torch.library.custom_op("fast_unet::time_embedding", mutates_args=())
@backends.on_tensor_device
def _temb_op(t: Tensor, dim: int, relu_weight: Tensor, relu_bias: Tensor, silu_weight: Tensor,
             silu_bias: Tensor) -> tuple[Tensor, Tensor]:
    return _k().time_embedding_fwd(t, dim, relu_weight, relu_bias, silu_weight, silu_bias)


@_temb_op.register_fake
def _(t, dim, relu_weight, relu_bias, silu_weight, silu_bias):
    b = t.shape[0]
    return relu_weight.new_empty((b, relu_weight.shape[0])), relu_weight.new_empty((b, silu_weight.shape[0]))


@torch.library.custom_op("fast_unet::time_embedding_backward", mutates_args=())
@backends.on_tensor_device
def _temb_bwd_op(g_down: Tensor, g_up: Tensor, t: Tensor, dim: int, relu_weight: Tensor,
                 silu_weight: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _k().time_embedding_bwd(g_down, g_up, t, dim, relu_weight, silu_weight)


@_temb_bwd_op.register_fake
def _(g_down, g_up, t, dim, relu_weight, silu_weight):
    f32 = dict(dtype=torch.float32)
    return (relu_weight.new_empty(relu_weight.shape, **f32), relu_weight.new_empty(relu_weight.shape[:1], **f32),
            silu_weight.new_empty(silu_weight.shape, **f32), silu_weight.new_empty(silu_weight.shape[:1], **f32))


def _temb_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs without a gradient
    t, dim, relu_weight, relu_bias, silu_weight, silu_bias = inputs
    ctx.save_for_backward(t, relu_weight, silu_weight)
    ctx.dim = dim
    ctx.bias_dtypes = (relu_bias.dtype, silu_bias.dtype)


def _temb_backward(ctx, g_down, g_up):
    t, rw, sw = ctx.saved_tensors
    if g_down is None:
        g_down = rw.new_zeros((t.shape[0], rw.shape[0]))
    if g_up is None:
        g_up = sw.new_zeros((t.shape[0], sw.shape[0]))
    drw, drb, dsw, dsb = torch.ops.fast_unet.time_embedding_backward(g_down, g_up, t, ctx.dim, rw, sw)
    # t holds integer (or non-differentiable) timesteps: no gradient for it, nor for dim.
    rb_dtype, sb_dtype = ctx.bias_dtypes
    return None, None, drw.to(rw.dtype), drb.to(rb_dtype), dsw.to(sw.dtype), dsb.to(sb_dtype)


torch.library.register_autograd("fast_unet::time_embedding", _temb_backward, setup_context=_temb_setup)


def triton_time_embedding(t, dim, relu_weight, relu_bias, silu_weight, silu_bias):
    return torch.ops.fast_unet.time_embedding(t, int(dim), relu_weight, relu_bias, silu_weight, silu_bias)


def _check_triton(t, dim, relu_weight, relu_bias, silu_weight, silu_bias):
    if isinstance(t, Tensor) and t.requires_grad:
        raise ValueError("t requires grad; the Triton time embedding gives no gradient for t")
    _k().check_time_embedding(t, dim, relu_weight, relu_bias, silu_weight, silu_bias)


def triton_reasons(t, dim, relu_weight, relu_bias, silu_weight, silu_bias):
    return backends.triton_reasons(
        _check_triton, dict(t=t, relu_weight=relu_weight, relu_bias=relu_bias, silu_weight=silu_weight,
                            silu_bias=silu_bias), t, dim, relu_weight, relu_bias, silu_weight, silu_bias)


dispatch.register("time_embedding", "triton", triton_time_embedding, triton_reasons, devices=backends.triton_devices)
dispatch.register("time_embedding", "eager", eager.time_embedding)
dispatch.autocast_keep("time_embedding", 0)  # t: the encoding is float32, as in eager autocast
dispatch.register_autocast(_temb_op, keep=("t",))
