"""``group_norm_relu``: relu(GroupNorm(1, C)(x)) + emb, the model's normalisation, and the materialisation
of a lazily normalised tensor (``partials`` given: the statistics come from its producer's epilogue).

| backend | implementation                                                        | devices, dtypes              |
|---------|-----------------------------------------------------------------------|------------------------------|
| triton  | kernels/group_norm.py: split statistics + apply, or one apply that folds the given partials; three-kernel backward (a second upstream gradient summed on load) | CUDA (CPU under the interpreter); fp32/bf16/fp16 |
| ext     | csrc/cpu/group_norm.cpp, csrc/cuda/group_norm.cu (computes its own statistics) | CPU fp32/bf16 (parameters, emb and statistics in fp32); CUDA fp32/bf16/fp16 |
| eager   | fast_unet/eager.py ``group_norm_relu`` (two-pass float32 statistics)  | any                          |

Tests: tests/ops/test_group_norm.py. ``norm_backward`` here is the GroupNorm backward that every Triton op
folding a GroupNorm (conv, resample, linear) returns its gradient through.
"""
from typing import Optional

import torch
from torch import Tensor

from .. import backends, dispatch, eager


def group_norm_relu(x, weight, bias, eps=1e-5, emb=None, partials=None):
    """``relu(GroupNorm(1, C)(x)) + emb[:, :, None, None]``.

    x: (B, C, H, W), NCHW or channels_last; weight, bias: (C,); emb: (B, C) or None; partials: x's (B, P, 3)
    float32 (count, mean, M2) statistics per tile as a conv epilogue writes them, or None. A backend may
    use the partials or recompute the statistics. Statistics in float32; output in x's dtype and memory
    format."""
    return dispatch.call("group_norm_relu", x, weight, bias, eps, emb, partials)


def _k():
    return backends.kernel_module("group_norm")


# --- triton -------------------------------------------------------------------------------------------

@torch.library.custom_op("fast_unet::group_norm_relu", mutates_args=())
@backends.on_tensor_device
def _gn_relu_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                emb: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return _k().group_norm_relu_fwd(x, weight, bias, eps, emb)


@_gn_relu_op.register_fake
def _(x, weight, bias, eps, emb):
    stats = x.new_empty((x.shape[0],), dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("fast_unet::gn_relu_partials", mutates_args=())
@backends.on_tensor_device
def _gn_partials_op(y: Tensor, partials: Tensor, gn_weight: Tensor, gn_bias: Tensor, eps: float,
                    emb: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(relu(GroupNorm(1, C)(y)) + emb, mean, rstd) from y's partials: one apply launch that folds them."""
    return _k().apply_from_partials(y, partials, eps, gn_weight, gn_bias, emb)


@_gn_partials_op.register_fake
def _(y, partials, gn_weight, gn_bias, eps, emb):
    stats = y.new_empty((y.shape[0],), dtype=torch.float32)
    return torch.empty_like(y), stats, torch.empty_like(stats)


@torch.library.custom_op("fast_unet::group_norm_relu_backward", mutates_args=())
@backends.on_tensor_device
def _gn_relu_bwd_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, rstd: Tensor,
                    dy2: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _k().group_norm_relu_bwd(dy, x, weight, bias, mean, rstd, dy2)


@_gn_relu_bwd_op.register_fake
def _(dy, x, weight, bias, mean, rstd, dy2=None):
    c = x.new_empty((x.shape[1],), dtype=weight.dtype)
    return torch.empty_like(x), c, torch.empty_like(c), x.new_empty(x.shape[:2])


@torch.library.custom_op("fast_unet::gn_partials", mutates_args=())
@backends.on_tensor_device
def _gn_stats_op(x: Tensor) -> Tensor:
    return _k().partials(x)


@_gn_stats_op.register_fake
def _(x):
    k = _k()
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    b, c, h, w = x.shape
    block_c, block_hw = k.tile_config(c, h * w, channels_last)
    n_cb = -(-c // block_c)
    s, _ = k._split(h * w, block_hw, n_cb)
    return x.new_empty((b, n_cb * s, 3), dtype=torch.float32)


def partials_of(x, partials):
    """``partials`` if given, else x's (B, P, 3) GroupNorm statistics per tile from one Triton stats launch
    (for a fused op whose input's producer wrote none). Not differentiable."""
    if partials is not None:
        return partials
    return torch.ops.fast_unet.gn_partials(x.detach().contiguous(memory_format=torch.channels_last))


def checked_partials(x, partials, prefix=""):
    """The partials a Triton op folds for the lazily normalised x, for its reasons check: those given (which
    must not require grad), or, when None, a stand-in of the layout ``partials_of`` computes by one stats
    launch first."""
    if partials is None:
        return torch.zeros((x.shape[0], 1, 3), device=x.device)
    if partials.requires_grad:
        raise ValueError(f"{prefix}partials requires grad; the GroupNorm statistics are not differentiable")
    return partials


def norm_backward(dout, x, weight, bias, mean, rstd, emb_dtype=None, dout2=None):
    """(dx, d weight, d bias, d emb) of relu(GroupNorm(1, C)(x)) + emb for the gradient ``dout`` (+ ``dout2``,
    a second gradient of the same output, summed as the kernels load it), on the Triton GroupNorm backward;
    d weight and d bias come in the weight's dtype, d emb in ``emb_dtype`` (None: there was no emb). Every
    Triton op that folds a GroupNorm takes its backward through here."""
    dx, dw, db, demb = torch.ops.fast_unet.group_norm_relu_backward(dout, x, weight, bias, mean, rstd, dout2)
    return dx, dw, db, demb.to(emb_dtype) if emb_dtype is not None else None


def recompute(y, partials, gn_weight, gn_bias, eps):
    """(relu(GroupNorm(y)), mean, rstd) from y's partials, in a backward (no graph)."""
    return torch.ops.fast_unet.gn_relu_partials(y, partials, gn_weight, gn_bias, eps, None)


def save_norm(ctx, x, weight, bias, emb, mean, rstd):
    """setup_context of an op whose outputs include relu(GroupNorm(x)) + emb and its (B,) statistics."""
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs without a gradient
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.emb_dtype = emb.dtype if emb is not None else None
    ctx.mark_non_differentiable(mean, rstd)


def _gn_setup(ctx, inputs, output):
    x, weight, bias, _eps, emb = inputs
    save_norm(ctx, x, weight, bias, emb, *output[1:])


def _gn_backward(ctx, dy, _dmean, _drstd):
    dx, dw, db, demb = norm_backward(dy, *ctx.saved_tensors, ctx.emb_dtype)
    return dx, dw, db, None, demb


torch.library.register_autograd("fast_unet::group_norm_relu", _gn_backward, setup_context=_gn_setup)


def _gn_partials_setup(ctx, inputs, output):
    y, _partials, gn_weight, gn_bias, _eps, emb = inputs
    save_norm(ctx, y, gn_weight, gn_bias, emb, *output[1:])


def _gn_partials_backward(ctx, dout, _dmean, _drstd):
    dy, dgw, dgb, demb = norm_backward(dout, *ctx.saved_tensors, ctx.emb_dtype)
    return dy, None, dgw, dgb, None, demb


torch.library.register_autograd("fast_unet::gn_relu_partials", _gn_partials_backward,
                                setup_context=_gn_partials_setup)


def triton_group_norm_relu(x, weight, bias, eps=1e-5, emb=None, partials=None):
    if partials is not None:
        return torch.ops.fast_unet.gn_relu_partials(x, partials, weight, bias, float(eps), emb)[0]
    return torch.ops.fast_unet.group_norm_relu(x, weight, bias, float(eps), emb)[0]


def _check_triton(x, weight, bias, emb, partials):
    k = _k()
    k.check_group_norm(x, weight, bias, emb)
    for name, p in (("weight", weight), ("bias", bias), ("emb", emb)):
        if p is not None and not p.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {p.dtype}")
    if partials is not None:
        k.check_partials(x, checked_partials(x, partials), weight, bias, x_name="x")


def triton_reasons(x, weight, bias, eps=1e-5, emb=None, partials=None):
    return backends.triton_reasons(_check_triton, dict(x=x, weight=weight, bias=bias, emb=emb, partials=partials),
                                   x, weight, bias, emb, partials)


# --- ext ----------------------------------------------------------------------------------------------

@torch.library.custom_op("fast_unet::group_norm_relu_fwd_ext", mutates_args=())
def _ext_fwd(x: Tensor, weight: Tensor, bias: Tensor, emb: Optional[Tensor],
             eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, C, H, W) NCHW or channels_last; weight, bias (C,) (float32 or x's dtype: the CPU kernels read them
    as they are, in float32; the CUDA kernels take them in x's dtype, cast here); emb (B, C) or None.
    Returns (y like x, mean (B,) float32, rstd (B,) float32)."""
    return tuple(backends.ext().gn_relu_fwd(x, *_ext_params(x, weight, bias), emb, eps))


def _ext_params(x, weight, bias):
    if x.device.type == "cpu":
        return weight, bias
    return weight.to(x.dtype), bias.to(x.dtype)


@_ext_fwd.register_fake
def _(x, weight, bias, emb, eps):
    b = x.shape[0]
    return torch.empty_like(x), x.new_empty((b,), dtype=torch.float32), x.new_empty((b,), dtype=torch.float32)


@torch.library.custom_op("fast_unet::group_norm_relu_bwd_ext", mutates_args=())
def _ext_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor,
             rstd: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx like x, dweight (C,) in weight's dtype, dbias (C,) in bias's dtype, demb (B, C))."""
    dx, dw, db, demb = backends.ext().gn_relu_bwd(dy, x, *_ext_params(x, weight, bias), mean, rstd, True)
    return dx, dw.to(weight.dtype), db.to(bias.dtype), demb.to(x.dtype)


@_ext_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd):
    b, c = x.shape[:2]
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias), x.new_empty((b, c))


def _ext_setup(ctx, inputs, output):
    x, weight, bias, emb, _eps = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)  # statistics for the backward, not outputs to train through
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.emb_dtype = emb.dtype if emb is not None else None


def _ext_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db, demb = _ext_bwd(dy, x, weight, bias, mean, rstd)
    return dx, dw, db, (demb.to(ctx.emb_dtype) if ctx.emb_dtype is not None else None), None


_ext_fwd.register_autograd(_ext_backward, setup_context=_ext_setup)
ext_group_norm_relu_fwd = _ext_fwd  # the custom op itself, for opcheck


def ext_group_norm_relu(x, weight, bias, eps=1e-5, emb=None, partials=None):
    """The extension's kernel; it computes its own statistics (``partials`` unused)."""
    return _ext_fwd(x, weight, bias, emb, float(eps))[0]


_EXT_DTYPES = {"cpu": (torch.float32, torch.bfloat16), "cuda": (torch.float32, torch.bfloat16, torch.float16)}


def ext_reasons(x, weight, bias, eps=1e-5, emb=None, partials=None):
    if not isinstance(x, torch.Tensor):
        return [f"x must be a tensor, got {type(x).__name__}"]
    why = []
    dev = x.device.type
    cuda = backends.ext_cuda_built()
    if dev not in _EXT_DTYPES or (dev == "cuda" and not cuda):
        why.append(f"x is on {x.device}; this build of fast_unet._C runs group_norm_relu on "
                   + ("cpu and cuda" if cuda else "cpu only (built without CUDA)"))
    elif x.dtype not in _EXT_DTYPES[dev]:
        why.append(f"x dtype {x.dtype} not supported on {dev} (supported: {', '.join(map(str, _EXT_DTYPES[dev]))})")
    if x.dim() != 4:
        why.append(f"x must be 4-D (B, C, H, W), got {x.dim()}-D")
    elif not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        why.append("x must be NCHW-contiguous or channels_last")
    c = x.shape[1] if x.dim() >= 2 else None
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            why.append(f"{name} must be a tensor (GroupNorm with affine=True), got {type(t).__name__}")
        elif t.shape != (c,) or t.dtype not in (x.dtype, torch.float32) or t.device != x.device:
            why.append(f"{name} must be ({c},) float32 or {x.dtype} on {x.device}, got {tuple(t.shape)} {t.dtype} "
                       f"on {t.device}")
    emb_dtypes = (x.dtype, torch.float32) if dev == "cpu" else (x.dtype,)
    if emb is not None and (emb.shape != (x.shape[0], c) or emb.dtype not in emb_dtypes or emb.device != x.device):
        why.append(f"emb must be ({x.shape[0]}, {c}) {' or '.join(map(str, emb_dtypes))} on {x.device}, got "
                   f"{tuple(emb.shape)} {emb.dtype} on {emb.device}")
    return why


dispatch.register("group_norm_relu", "triton", triton_group_norm_relu, triton_reasons, devices=backends.triton_devices)
dispatch.register("group_norm_relu", "ext", ext_group_norm_relu, ext_reasons, devices=lambda: ("cpu", "cuda") if backends.ext_cuda_built() else ("cpu",))
dispatch.register("group_norm_relu", "eager", eager.group_norm_relu)
dispatch.autocast_keep("group_norm_relu", 5)  # partials
dispatch.register_autocast(_gn_relu_op)
dispatch.register_autocast(_gn_partials_op, keep=("partials",))
dispatch.register_autocast(_gn_stats_op)
dispatch.register_autocast(_ext_fwd)
