"""The UNet's resampling passes, with the GroupNorm(1, C) + ReLU of their input folded in (Triton).

Both read a tensor that may still be *lazily normalised*: a conv output y whose GroupNorm statistics are
(count, mean, M2) float32 partials (B, P, 3) written by the conv's epilogue (kernels/conv.py). With
``NORM_IN`` each value is normalised as it is loaded, ``relu((y - mean) * rstd * gw[c] + gb[c])``,
rounded to the dtype (what the unfused GroupNorm pass would have stored), with mean and rstd folded
from the partials in the prologue (``group_norm.partials_stats``): no separate combine or apply launch.

1. ``_gn_relu_pool_kernel``: the normalise + 2x2 max-pool pass in one. It writes the normalised tensor
   (the UNet keeps it as a skip connection) and its 2x2 max-pool (the next Down block's input), so y is
   read once and the normalised tensor is not read back. Grid (B * cdiv(H/2 * W/2, BLOCK_P),
   cdiv(C, BLOCK_C)) (the big dimensions on axis 0: axes 1 and 2 stop at 65535); each program owns BLOCK_P pooled pixels x BLOCK_C channels and their 4 source
   pixels. Bytes per call: read B*H*W*C, write 1.25 * B*H*W*C elements.
2. ``_upsample2x_kernel``: bilinear 2x upsampling with align_corners=True (nn.Upsample in the Up
   blocks), optionally normalising on load. Grid (B * cdiv(2h * 2w, BLOCK_P), cdiv(C, BLOCK_C)). The
   interpolation follows ATen's order of operations in float32: ``h0l * (w0l * v00 + w1l * v01) +
   h1l * (w0l * v10 + w1l * v11)`` with ``src = dst * (in - 1) / (out - 1)``. Bytes: read B*h*w*C
   (each source pixel is gathered by up to 9 programs' lanes, from L1/L2), write 4 * B*h*w*C.

Layouts: channels_last (NHWC in memory) in and out; the input is read through its strides.
"""
import triton
import triton.language as tl

from . import group_norm as _gn
from ._common import DTYPE_NAMES, DTYPES, check_param, with_fp32_params, with_ones
from ._common import maximum as _maximum
from ._common import relu as _relu


@triton.jit
def _norm_load(ptr, mask, scale, shift, NORM_IN: tl.constexpr):
    """Load a (BLOCK_P, BLOCK_C) tile in float32, normalised on load (rounded to the dtype) if NORM_IN, with
    ``group_norm._pre_relu``'s formula."""
    v = tl.load(ptr, mask=mask, other=0.0)
    if NORM_IN:
        v = _relu(v.to(tl.float32) * scale[None, :] + shift[None, :]).to(v.dtype)
    return v.to(tl.float32)


@triton.jit
def _scale_shift(pin_ptr, gw_ptr, gb_ptr, b, c, c_mask, P_in, eps, NORM_IN: tl.constexpr, BLOCK_P_IN: tl.constexpr):
    """(scale, shift) of the normalise on load: x * scale + shift, then ReLU (group_norm._pre_relu)."""
    if NORM_IN:
        mean, rstd = _gn.partials_stats(pin_ptr, b, P_in, eps, BLOCK_P_IN)
        scale = tl.load(gw_ptr + c, mask=c_mask, other=0.0).to(tl.float32) * rstd
        shift = tl.load(gb_ptr + c, mask=c_mask, other=0.0).to(tl.float32) - mean * scale
    else:
        scale = tl.full(c.shape, 1.0, tl.float32)
        shift = tl.zeros(c.shape, tl.float32)
    return scale, shift


@triton.jit
def _gn_relu_pool_kernel(
    y_ptr,  # (B, H, W, C) in memory: the conv output
    x_ptr,  # (B, H, W, C): relu(GroupNorm(y)), written
    pool_ptr,  # (B, H/2, W/2, C): its 2x2 max-pool, written
    pin_ptr, gw_ptr, gb_ptr,  # partials (B, P_in, 3) float32 of y; GroupNorm weight, bias (C,)
    H, W, C, P_in, eps,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P_IN: tl.constexpr,
):
    Wo = W // 2
    HWo = (H // 2) * Wo
    n_p = tl.cdiv(HWo, BLOCK_P)
    b = tl.program_id(0) // n_p  # grid (B * n_p, n_c): the big dimensions on axis 0 (dims 1, 2 stop at 65535)
    p = (tl.program_id(0) % n_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = p < HWo
    c_mask = c < C
    mask = p_mask[:, None] & c_mask[None, :]
    scale, shift = _scale_shift(pin_ptr, gw_ptr, gb_ptr, b, c, c_mask, P_in, eps, True, BLOCK_P_IN)
    oh = p // Wo
    ow = p % Wo
    base = b.to(tl.int64) * H * W * C
    best = tl.full([BLOCK_P, BLOCK_C], float("-inf"), tl.float32)
    for i in range(4):
        pix = (2 * oh + i // 2) * W + (2 * ow + i % 2)
        offs = base + pix[:, None] * C + c[None, :]
        v = _norm_load(y_ptr + offs, mask, scale, shift, True)
        tl.store(x_ptr + offs, v.to(x_ptr.dtype.element_ty), mask=mask)
        best = _maximum(best, v)  # NaN wins, as in max_pool2d
    tl.store(pool_ptr + b.to(tl.int64) * HWo * C + p[:, None] * C + c[None, :],
             best.to(pool_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _upsample2x_kernel(
    x_ptr,  # (B, C, h, w) with the strides below
    out_ptr,  # (B, 2h, 2w, C) in memory
    pin_ptr, gw_ptr, gb_ptr,  # NORM_IN: partials (B, P_in, 3) float32 of x; GroupNorm weight, bias (C,)
    h, w, C, P_in, eps, scale_h, scale_w,
    stride_xb, stride_xc, stride_xh, stride_xw,
    NORM_IN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P_IN: tl.constexpr,
):
    Ho = 2 * h
    Wo = 2 * w
    n_p = tl.cdiv(Ho * Wo, BLOCK_P)
    b = tl.program_id(0) // n_p  # grid (B * n_p, n_c), as the pool pass's
    p = (tl.program_id(0) % n_p) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = p < Ho * Wo
    c_mask = c < C
    mask = p_mask[:, None] & c_mask[None, :]
    scale, shift = _scale_shift(pin_ptr, gw_ptr, gb_ptr, b, c, c_mask, P_in, eps, NORM_IN, BLOCK_P_IN)
    oh = p // Wo
    ow = p % Wo
    src_h = oh.to(tl.float32) * scale_h
    src_w = ow.to(tl.float32) * scale_w
    h0 = src_h.to(tl.int32)  # src >= 0: truncation is floor
    w0 = src_w.to(tl.int32)
    h1 = tl.minimum(h0 + 1, h - 1)
    w1 = tl.minimum(w0 + 1, w - 1)
    h1l = src_h - h0.to(tl.float32)
    w1l = src_w - w0.to(tl.float32)
    h0l = 1.0 - h1l
    w0l = 1.0 - w1l
    base = x_ptr + b.to(tl.int64) * stride_xb + c[None, :] * stride_xc
    v00 = _norm_load(base + (h0 * stride_xh + w0 * stride_xw)[:, None], mask, scale, shift, NORM_IN)
    v01 = _norm_load(base + (h0 * stride_xh + w1 * stride_xw)[:, None], mask, scale, shift, NORM_IN)
    v10 = _norm_load(base + (h1 * stride_xh + w0 * stride_xw)[:, None], mask, scale, shift, NORM_IN)
    v11 = _norm_load(base + (h1 * stride_xh + w1 * stride_xw)[:, None], mask, scale, shift, NORM_IN)
    out = (h0l[:, None] * (w0l[:, None] * v00 + w1l[:, None] * v01)
           + h1l[:, None] * (w0l[:, None] * v10 + w1l[:, None] * v11))
    tl.store(out_ptr + b.to(tl.int64) * Ho * Wo * C + p[:, None] * C + c[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers. Validate, allocate and launch; no autograd here (the glue in fast_unet/ops/).

import torch  # noqa: E402

# (BLOCK_P, BLOCK_C, num_warps): 64 pixels x 64 channels per program; both kernels are memory-bound
# elementwise passes. In the compile report (``aot_builds`` below); speed unmeasured until a GPU has run it.
CONFIG = (64, 64, 4)
BLOCK_P_IN = 32


def check_norm(y, partials, gn_weight, gn_bias):
    """Validate the GroupNorm arguments of a lazily normalised input y (``group_norm.check_partials``),
    and gn_weight, gn_bias float32 or y's dtype, on y's device; errors name the argument."""
    _gn.check_partials(y, partials, gn_weight, gn_bias)
    for name, p in (("gn_weight", gn_weight), ("gn_bias", gn_bias)):
        check_param(name, p, y)
        if p.device != y.device:
            raise ValueError(f"{name} is on {p.device} but the input is on {y.device}")


def check_input(name, x):
    """Validate a 4-D float32 / bfloat16 / float16 input; errors call it ``name``."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor (B, C, H, W), got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def gn_relu_maxpool(y, partials, gn_weight, gn_bias, eps):
    """(x, pooled): x = relu(GroupNorm(1, C)(y)) with y's statistics from ``partials``, and
    max_pool2d(x, 2). y: (B, C, H, W) channels_last, H and W even. Both outputs channels_last."""
    check_input("y", y)
    check_norm(y, partials, gn_weight, gn_bias)
    B, C, H, W = y.shape
    if H % 2 or W % 2:
        raise ValueError(f"y's height and width must be even for the 2x2 max-pool, got {H}x{W}")
    y = y.contiguous(memory_format=torch.channels_last)
    gn_weight, gn_bias = _gn.dense(gn_weight, gn_bias)  # read as ptr + c
    x = torch.empty_like(y)
    pooled = torch.empty((B, C, H // 2, W // 2), device=y.device, dtype=y.dtype, memory_format=torch.channels_last)
    if y.numel() == 0:
        return x, pooled
    bp, bc, warps = CONFIG
    grid = (B * triton.cdiv((H // 2) * (W // 2), bp), triton.cdiv(C, bc))
    _gn_relu_pool_kernel[grid](y, x, pooled, partials, gn_weight, gn_bias, H, W, C, partials.shape[1], float(eps),
                               BLOCK_P=bp, BLOCK_C=bc, BLOCK_P_IN=BLOCK_P_IN, num_warps=warps)
    return x, pooled


def upsample2x(x, norm=None):
    """Bilinear 2x upsampling (align_corners=True) of x, or of relu(GroupNorm(1, C)(x)) normalised on load
    (``norm`` = (partials, gn_weight, gn_bias, eps)). x: (B, C, h, w), any strides -> (B, C, 2h, 2w)
    channels_last."""
    check_input("x", x)
    if norm is not None:
        check_norm(x, *norm[:3])
        norm = (norm[0], *_gn.dense(norm[1], norm[2]), norm[3])  # read as ptr + c
    B, C, h, w = x.shape
    out = torch.empty((B, C, 2 * h, 2 * w), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    pin, gw, gb, eps = norm if norm is not None else (x, x, x, 0.0)  # unused placeholders (not NORM_IN)
    bp, bc, warps = CONFIG
    grid = (B * triton.cdiv(4 * h * w, bp), triton.cdiv(C, bc))
    scale_h = (h - 1) / (2 * h - 1)
    scale_w = (w - 1) / (2 * w - 1)
    _upsample2x_kernel[grid](x, out, pin, gw, gb, h, w, C, pin.shape[1] if norm is not None else 0, float(eps),
                             scale_h, scale_w, *x.stride(), NORM_IN=norm is not None, BLOCK_P=bp, BLOCK_C=bc,
                             BLOCK_P_IN=BLOCK_P_IN, num_warps=warps)
    return out


# ----------------------------------------------------------------------------------------------------
# Declarations: the pointer arguments each kernel writes (bench.kernels splits a launch's bytes into read
# and written with them), and the builds of the ahead-of-time compile report (fast_unet/aot.py).

WRITES = {
    "_gn_relu_pool_kernel": {"x_ptr", "pool_ptr"},
    "_upsample2x_kernel": {"out_ptr"},
}

# Signature hints: float32 pointers (other pointers take the build's dtype), float scalars (other
# scalars are i32), and integers that are multiples of 16 at the model's shapes (the channels, and the
# strides of a channels_last input with C >= 64).
AOT_FP32_POINTERS = {"pin_ptr"}
# (C,) parameter pointers (and their gradients'): float32 or the build's dtype; the builds take both
# (``_common.with_fp32_params``: float32 is autocast's case).
AOT_PARAM_POINTERS = {"gw_ptr", "gb_ptr"}
AOT_FLOAT_ARGS = {"eps", "scale_h", "scale_w"}
AOT_ALIGNED_INTS = {"C", "stride_xb", "stride_xh", "stride_xw"}
# Ints that are 1 at inputs the launchers take (one partial, a 1-pixel side to upsample): the JIT specialises them to constants.
AOT_ONE_INTS = {"P_in", "h", "w"}
# The work of one iteration of each kernel's inner loop, for the compile report's per-1,024 figures
# (fast_unet/aot.py loop_tile): the pool pass's loop over the 2x2 window (a BLOCK_P x BLOCK_C tile each),
# the upsample's over the input's partials (BLOCK_P_IN of them, NORM_IN only).
AOT_LOOP_TILES = {"_gn_relu_pool_kernel": (("BLOCK_P", "BLOCK_C"), "elements"),
                  "_upsample2x_kernel": (("BLOCK_P_IN",), "partials")}


def aot_builds():
    """[(kernel label, jit fn, config label, dtype name, constexprs, options)]: ``CONFIG`` for the pool
    pass and for the upsample with and without normalise on load; the channels_last input's
    ``stride_xc == 1`` specialised as the JIT does."""
    out = []
    bp, bc, warps = CONFIG
    for dt in DTYPE_NAMES:
        out.append(("gn_relu_pool", _gn_relu_pool_kernel, f"{dt} {bp}x{bc} w{warps}", dt,
                    dict(BLOCK_P=bp, BLOCK_C=bc, BLOCK_P_IN=BLOCK_P_IN), dict(num_warps=warps)))
        for norm_in in (False, True):
            out.append(("upsample2x", _upsample2x_kernel,
                        f"{dt} {'norm-on-load ' if norm_in else ''}{bp}x{bc} w{warps}", dt,
                        dict(stride_xc=1, NORM_IN=norm_in, BLOCK_P=bp, BLOCK_C=bc, BLOCK_P_IN=BLOCK_P_IN),
                        dict(num_warps=warps)))
    return with_ones(with_fp32_params(out, AOT_PARAM_POINTERS), AOT_ONE_INTS)
