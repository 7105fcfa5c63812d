"""Glue of the compiled extension ``fast_unet._C`` (csrc/): custom ops, autograd, dispatch registration.

Importing this module (``fast_unet.dispatch`` does it on first use of the ``ext`` backend) wraps each
``_C`` kernel as a ``torch.library.custom_op`` named ``fast_unet::<op>_ext`` (with ``register_fake`` so
``torch.compile`` can trace it, and ``register_autograd`` for the backward kernel), then registers it
with ``fast_unet.dispatch`` together with a ``reasons(*args)`` check that says why it cannot take given
inputs (device the build does not cover, dtype, layout, head dim, ...).

A missing or broken ``_C`` is one ``RuntimeWarning`` here, never an ImportError: every op then answers
the load error as its reason and dispatch falls back to eager.
"""
import warnings
from typing import Optional

import torch

from . import dispatch, eager

LOAD_ERROR = None
try:
    from . import _C  # noqa: N812

    BUILD_INFO = dict(_C.build_info())  # a stale _C without it counts as broken
except Exception as e:  # ImportError, OSError (undefined symbol), ...: fall back, warn once
    _C = None
    BUILD_INFO = {}
    LOAD_ERROR = f"fast_unet._C is not available ({type(e).__name__}: {e}); build it with `pip install --no-build-isolation -e .`"
    warnings.warn(f"fast_unet: ext backend disabled, eager fallback: {LOAD_ERROR}", RuntimeWarning, stacklevel=4)

CUDA_BUILT = bool(BUILD_INFO.get("cuda"))
ATTENTION_HEAD_DIMS = (16, 32, 64)
_GN_DTYPES = {"cpu": (torch.float32,), "cuda": (torch.float32, torch.bfloat16, torch.float16)}


def build_info():
    """How ``_C`` was built ({} when it is not): CUDA archs, CPU ISA, torch version."""
    return dict(BUILD_INFO)


# --- fused GroupNorm(1, C) + ReLU + embedding --------------------------------------------------------

@torch.library.custom_op("fast_unet::group_norm_relu_fwd_ext", mutates_args=())
def group_norm_relu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, emb: Optional[torch.Tensor],
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (B, C, H, W) NCHW or channels_last; weight, bias (C,); emb (B, C) or None.
    Returns (y like x, mean (B,) float32, rstd (B,) float32)."""
    return tuple(_C.gn_relu_fwd(x, weight, bias, emb, eps))


@group_norm_relu_fwd.register_fake
def _(x, weight, bias, emb, eps):
    b = x.shape[0]
    return torch.empty_like(x), x.new_empty((b,), dtype=torch.float32), x.new_empty((b,), dtype=torch.float32)


@torch.library.custom_op("fast_unet::group_norm_relu_bwd_ext", mutates_args=())
def group_norm_relu_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        mean: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx like x, dweight (C,), dbias (C,), demb (B, C))."""
    return tuple(_C.gn_relu_bwd(dy, x, weight, bias, mean, rstd, True))


@group_norm_relu_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd):
    b, c = x.shape[:2]
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias), x.new_empty((b, c))


def _gn_setup(ctx, inputs, output):
    x, weight, bias, emb, _eps = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)  # statistics for the backward, not outputs to train through
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.has_emb = emb is not None


def _gn_backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db, demb = group_norm_relu_bwd(dy, x, weight, bias, mean, rstd)
    return dx, dw, db, (demb if ctx.has_emb else None), None


group_norm_relu_fwd.register_autograd(_gn_backward, setup_context=_gn_setup)


def group_norm_relu(x, weight, bias, eps=1e-5, emb=None):
    """The ext implementation of ``fast_unet.ops.group_norm_relu``."""
    return group_norm_relu_fwd(x, weight, bias, emb, float(eps))[0]


def group_norm_relu_reasons(x, weight, bias, eps=1e-5, emb=None):
    if _C is None:
        return [LOAD_ERROR]
    why = []
    if not isinstance(x, torch.Tensor):
        return [f"x must be a tensor, got {type(x).__name__}"]
    dev = x.device.type
    if dev not in _GN_DTYPES or (dev == "cuda" and not CUDA_BUILT):
        why.append(f"x is on {x.device}; this build of fast_unet._C runs group_norm_relu on "
                   + ("cpu and cuda" if CUDA_BUILT else "cpu only (built without CUDA)"))
    elif x.dtype not in _GN_DTYPES[dev]:
        why.append(f"x dtype {x.dtype} not supported on {dev} (supported: {', '.join(map(str, _GN_DTYPES[dev]))})")
    if x.dim() != 4:
        why.append(f"x must be 4-D (B, C, H, W), got {x.dim()}-D")
    elif not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        why.append("x must be NCHW-contiguous or channels_last")
    c = x.shape[1] if x.dim() >= 2 else None
    for name, t in (("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            why.append(f"{name} must be a tensor (GroupNorm with affine=True), got {type(t).__name__}")
        elif t.shape != (c,) or t.dtype != x.dtype or t.device != x.device:
            why.append(f"{name} must be ({c},) {x.dtype} on {x.device}, got {tuple(t.shape)} {t.dtype} on {t.device}")
    if emb is not None and (emb.shape != (x.shape[0], c) or emb.dtype != x.dtype or emb.device != x.device):
        why.append(f"emb must be ({x.shape[0]}, {c}) {x.dtype} on {x.device}, got {tuple(emb.shape)} {emb.dtype}")
    return why


# --- attention ------------------------------------------------------------------------------------

@torch.library.custom_op("fast_unet::attention_fwd_ext", mutates_args=())
def attention_fwd(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, N, 3, heads, d), any strides. Returns (out (B, N, heads * d), lse2 (B, heads, N) float32:
    the log2 of each query row's softmax normaliser)."""
    return tuple(_C.attention_fwd_cpu(qkv))


@attention_fwd.register_fake
def _(qkv):
    b, n, _, h, d = qkv.shape
    return qkv.new_empty((b, n, h * d)), qkv.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("fast_unet::attention_bwd_ext", mutates_args=())
def attention_bwd(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """dout, out (B, N, heads * d); returns dqkv (B, N, 3, heads, d) contiguous."""
    return _C.attention_bwd_cpu(dout, qkv, out, lse2)


@attention_bwd.register_fake
def _(dout, qkv, out, lse2):
    return torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)


def _attn_setup(ctx, inputs, output):
    (qkv,) = inputs
    out, lse2 = output
    ctx.mark_non_differentiable(lse2)
    ctx.save_for_backward(qkv, out, lse2)


def _attn_backward(ctx, dout, _dlse2):
    qkv, out, lse2 = ctx.saved_tensors
    return attention_bwd(dout.contiguous(), qkv, out, lse2)


attention_fwd.register_autograd(_attn_backward, setup_context=_attn_setup)


def attention(qkv):
    """The ext implementation of ``fast_unet.ops.attention``."""
    return attention_fwd(qkv)[0]


def attention_reasons(qkv):
    if _C is None:
        return [LOAD_ERROR]
    if not isinstance(qkv, torch.Tensor):
        return [f"qkv must be a tensor, got {type(qkv).__name__}"]
    why = []
    if qkv.device.type != "cpu":
        why.append(f"qkv is on {qkv.device}; fast_unet._C has attention kernels for the CPU only")
    if qkv.dtype != torch.float32:
        why.append(f"qkv dtype {qkv.dtype} not supported (CPU attention is float32)")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        why.append(f"qkv must be (B, N, 3, heads, d), got shape {tuple(qkv.shape)}")
    else:
        if qkv.shape[4] not in ATTENTION_HEAD_DIMS:
            why.append(f"head dim {qkv.shape[4]} not in {ATTENTION_HEAD_DIMS}")
        if qkv.shape[1] == 0 or qkv.shape[0] == 0:
            why.append("qkv holds no tokens")
    return why


# --- time embedding: two small GEMMs; nothing to fuse on the CPU, so ext runs the eager composition.

def time_embedding_reasons(t, dim, relu_weight, relu_bias, silu_weight, silu_bias):
    return [LOAD_ERROR] if _C is None else []


if _C is not None:
    dispatch.register("group_norm_relu", "ext", group_norm_relu, group_norm_relu_reasons)
    dispatch.register("attention", "ext", attention, attention_reasons)
    dispatch.register("time_embedding", "ext", eager.time_embedding, time_embedding_reasons)
else:
    # The backend as a whole is unavailable: dispatch reports this reason for every op and info shows it.
    dispatch._load_errors["ext"] = LOAD_ERROR
