"""``attention``: multi-head softmax attention over the spatial tokens, read from the packed QKV projection.

| backend | implementation                                                           | devices, dtypes, head dims |
|---------|--------------------------------------------------------------------------|----------------------------|
| triton  | kernels/attention.py: flash attention, exp2 online softmax, LSE saved; one-pass backward (P recomputed once, dQ by atomic adds; the two-kernel path when deterministic algorithms are on) | CUDA (CPU under the interpreter); fp32/bf16/fp16; 16, 32, 64 |
| ext     | csrc/cpu/attention.cpp: flash attention with AVX-512 register tiles; csrc/cpu/attention_amx.cpp: the bf16 forward on AMX tiles (elsewhere the fp32 kernel on an upcast copy; backward: the fp32 kernel) | CPU; fp32/bf16; 16, 32, 64 |
| eager   | fast_unet/eager.py ``attention`` (SDPA on strided views)                  | any                        |

Tests: tests/ops/test_attention.py.
"""
import torch
from torch import Tensor

from .. import backends, dispatch, eager


def attention(qkv):
    """Softmax attention with scale 1/sqrt(d). qkv: (B, N, 3, heads, d), the ``in_proj`` output of N tokens,
    viewed. Returns (B, N, heads * d), the layout ``out_proj`` reads."""
    return dispatch.call("attention", qkv)


def _k():
    return backends.kernel_module("attention")


# --- triton -------------------------------------------------------------------------------------------

@torch.library.custom_op("fast_unet::attention", mutates_args=())
@backends.on_tensor_device
def _attn_op(qkv: Tensor) -> tuple[Tensor, Tensor]:
    return _k().attention_fwd(qkv)


def _attn_fake(qkv):
    """(out (B, N, heads * d), log-sum-exp (B, heads, N) float32), the outputs of both backends' forwards."""
    b, n, _, h, d = qkv.shape
    return qkv.new_empty((b, n, h * d)), qkv.new_empty((b, h, n), dtype=torch.float32)


_attn_op.register_fake(_attn_fake)


@torch.library.custom_op("fast_unet::attention_backward", mutates_args=())
@backends.on_tensor_device
def _attn_bwd_op(do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor) -> Tensor:
    return _k().attention_bwd(do, qkv, o, lse)


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


def triton_attention(qkv):
    return torch.ops.fast_unet.attention(qkv)[0]


def triton_reasons(qkv):
    return backends.triton_reasons(lambda q: _k().check_qkv(q), dict(qkv=qkv), qkv)


# --- ext ----------------------------------------------------------------------------------------------

EXT_HEAD_DIMS = (16, 32, 64)


@torch.library.custom_op("fast_unet::attention_fwd_ext", mutates_args=())
def _ext_fwd(qkv: Tensor) -> tuple[Tensor, Tensor]:
    """qkv (B, N, 3, heads, d), any strides. Returns (out (B, N, heads * d), lse2 (B, heads, N) float32:
    the log2 of each query row's softmax normaliser)."""
    return tuple(backends.ext().attention_fwd_cpu(qkv))


_ext_fwd.register_fake(_attn_fake)


@torch.library.custom_op("fast_unet::attention_bwd_ext", mutates_args=())
def _ext_bwd(dout: Tensor, qkv: Tensor, out: Tensor, lse2: Tensor) -> Tensor:
    """dout, out (B, N, heads * d); returns dqkv (B, N, 3, heads, d) contiguous."""
    return backends.ext().attention_bwd_cpu(dout, qkv, out, lse2)


@_ext_bwd.register_fake
def _(dout, qkv, out, lse2):
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


def _ext_setup(ctx, inputs, output):
    (qkv,) = inputs
    out, lse2 = output
    ctx.mark_non_differentiable(lse2)
    ctx.save_for_backward(qkv, out, lse2)


def _ext_backward(ctx, dout, _dlse2):
    qkv, out, lse2 = ctx.saved_tensors
    return _ext_bwd(dout.contiguous(), qkv, out, lse2)


_ext_fwd.register_autograd(_ext_backward, setup_context=_ext_setup)
ext_attention_fwd = _ext_fwd  # the custom op itself, for opcheck


def ext_attention(qkv):
    return _ext_fwd(qkv)[0]


def ext_reasons(qkv):
    if not isinstance(qkv, torch.Tensor):
        return [f"qkv must be a tensor, got {type(qkv).__name__}"]
    why = []
    if qkv.device.type != "cpu":
        why.append(f"qkv is on {qkv.device}; fast_unet._C has attention kernels for the CPU only")
    if qkv.dtype not in (torch.float32, torch.bfloat16):
        why.append(f"qkv dtype {qkv.dtype} not supported (CPU attention is float32 or bfloat16)")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        why.append(f"qkv must be (B, N, 3, heads, d), got shape {tuple(qkv.shape)}")
    else:
        if qkv.shape[4] not in EXT_HEAD_DIMS:
            why.append(f"head dim {qkv.shape[4]} not in {EXT_HEAD_DIMS}")
        if qkv.shape[1] == 0 or qkv.shape[0] == 0:
            why.append("qkv holds no tokens")
    return why


dispatch.register("attention", "triton", triton_attention, triton_reasons, devices=backends.triton_devices)
dispatch.register("attention", "ext", ext_attention, ext_reasons, devices=lambda: ("cpu",))
dispatch.register("attention", "eager", eager.attention)
dispatch.register_autocast(_attn_op)
dispatch.register_autocast(_ext_fwd)
