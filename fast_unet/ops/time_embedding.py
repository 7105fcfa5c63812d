"""``time_embedding``: the sinusoidal encoding of the timesteps and every block's activation + Linear, in one op.

| backend | implementation                                                                  | devices, dtypes |
|---------|---------------------------------------------------------------------------------|-----------------|
| triton  | kernels/time_embedding.py: encoding, ReLU/SiLU and every block's GEMM in one launch, the weights read where they are; one backward launch | CUDA (CPU under the interpreter); fp32/bf16/fp16 |
| eager   | fast_unet/eager.py ``time_embedding`` (one F.linear per block)                    | any             |

The extension has no kernel for it (two small GEMMs: nothing to fuse on the CPU).
Tests: tests/ops/test_time_embedding.py.
"""
import torch
from torch import Tensor

from .. import backends, dispatch, eager


def time_embedding(t, dim, relu_weight, relu_bias, silu_weight, silu_bias):
    """Sinusoidal encoding of t (B,) followed by every block's activation + Linear.

    ``relu_weight``/``relu_bias``: the Down blocks' Linear weights (C_i, dim) and biases (C_i,) (their
    activation is ReLU), either one tensor each (the blocks stacked along their outputs) or a list with one
    tensor per block, read where they are; ``silu_*`` likewise for the Up blocks. Returns (down, up) in the
    weights' dtype: (B, sum C) tensors for tensor arguments, lists of (B, C_i) tensors for lists."""
    single = isinstance(relu_weight, Tensor)
    as_list = (lambda x: [x]) if single else list
    down, up = dispatch.call("time_embedding", t, dim, *map(as_list, (relu_weight, relu_bias, silu_weight,
                                                                      silu_bias)))
    return (down[0], up[0]) if single else (list(down), list(up))


def _k():
    return backends.kernel_module("time_embedding")


@torch.library.custom_op("fast_unet::time_embedding", mutates_args=())
@backends.on_tensor_device
def _temb_op(t: Tensor, dim: int, relu_weights: list[Tensor], relu_biases: list[Tensor],
             silu_weights: list[Tensor], silu_biases: list[Tensor]) -> list[Tensor]:
    down, up = _k().time_embedding_fwd(t, dim, relu_weights, relu_biases, silu_weights, silu_biases)
    return down + up


@_temb_op.register_fake
def _(t, dim, relu_weights, relu_biases, silu_weights, silu_biases):
    return [w.new_empty((t.shape[0], w.shape[0])) for w in list(relu_weights) + list(silu_weights)]


@torch.library.custom_op("fast_unet::time_embedding_backward", mutates_args=())
@backends.on_tensor_device
def _temb_bwd_op(grads: list[Tensor], t: Tensor, dim: int, relu_weights: list[Tensor], relu_biases: list[Tensor],
                 silu_weights: list[Tensor], silu_biases: list[Tensor]) -> list[Tensor]:
    nd = len(relu_weights)
    drw, drb, dsw, dsb = _k().time_embedding_bwd(grads[:nd], grads[nd:], t, dim, relu_weights, relu_biases,
                                                 silu_weights, silu_biases)
    return drw + drb + dsw + dsb


@_temb_bwd_op.register_fake
def _(grads, t, dim, relu_weights, relu_biases, silu_weights, silu_biases):
    return [p.new_empty(p.shape) for p in list(relu_weights) + list(relu_biases) + list(silu_weights)
            + list(silu_biases)]


def _temb_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs without a gradient
    t, dim, rws, rbs, sws, sbs = inputs
    ctx.save_for_backward(t, *rws, *rbs, *sws, *sbs)
    ctx.dim = dim
    ctx.counts = (len(rws), len(sws))


def _temb_backward(ctx, grads):
    t, *params = ctx.saved_tensors
    nd, nu = ctx.counts
    rws, rbs, sws, sbs = params[:nd], params[nd:2 * nd], params[2 * nd:2 * nd + nu], params[2 * nd + nu:]
    ws = rws + sws
    grads = [w.new_zeros((t.shape[0], w.shape[0])) if g is None else g for g, w in zip(grads, ws)]
    out = torch.ops.fast_unet.time_embedding_backward(grads, t, ctx.dim, rws, rbs, sws, sbs)
    # t holds integer (or non-differentiable) timesteps: no gradient for it, nor for dim.
    return (None, None, out[:nd], out[nd:2 * nd], out[2 * nd:2 * nd + nu], out[2 * nd + nu:])


torch.library.register_autograd("fast_unet::time_embedding", _temb_backward, setup_context=_temb_setup)


def triton_time_embedding(t, dim, relu_weights, relu_biases, silu_weights, silu_biases):
    out = torch.ops.fast_unet.time_embedding(t, int(dim), relu_weights, relu_biases, silu_weights, silu_biases)
    return out[:len(relu_weights)], out[len(relu_weights):]


def _check_triton(t, dim, relu_weights, relu_biases, silu_weights, silu_biases):
    if isinstance(t, Tensor) and t.requires_grad:
        raise ValueError("t requires grad; the Triton time embedding gives no gradient for t")
    _k().check_time_embedding(t, dim, relu_weights, relu_biases, silu_weights, silu_biases)


def triton_reasons(t, dim, relu_weights, relu_biases, silu_weights, silu_biases):
    tensors = dict(t=t)
    for name, ps in (("relu_weight", relu_weights), ("relu_bias", relu_biases), ("silu_weight", silu_weights),
                     ("silu_bias", silu_biases)):
        tensors.update(zip(_k_names(name, len(ps)), ps))
    return backends.triton_reasons(_check_triton, tensors, t, dim, relu_weights, relu_biases, silu_weights,
                                   silu_biases)


def _k_names(name, n):
    return [name if n == 1 else f"{name}[{i}]" for i in range(n)]


dispatch.register("time_embedding", "triton", triton_time_embedding, triton_reasons, devices=backends.triton_devices)
dispatch.register("time_embedding", "eager", eager.time_embedding)
dispatch.autocast_keep("time_embedding", 0)  # t: the encoding is float32, as in eager autocast
dispatch.register_autocast(_temb_op, keep=("t",))
