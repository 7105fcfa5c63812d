"""3x3 convolution (stride 1, padding 1) as an implicit GEMM over NHWC, with the GroupNorm(1, C)
partial statistics of its output in the epilogue (Triton).

    y[b, h, w, n] = bias[n] + sum_{kh, kw, c} x[b, h + kh - 1, w + kw - 1, c] * weight[n, c, kh, kw]

GEMM view: M = B * H * W output pixels, N = C_out, K = 9 * C_in. The M tiles are per sample (grid
(cdiv(H*W, BLOCK_M), cdiv(C_out, BLOCK_N), B)), so a tile never straddles two samples and its epilogue
can reduce its valid outputs to one float32 (count, mean, M2) partial, stored in ``partials``
(B, P, 3), P = cdiv(HW, BLOCK_M) * cdiv(C_out, BLOCK_N): the layout ``group_norm.partials_stats``
folds. The kernel that reads y next (this conv with ``NORM_IN``, the resampling passes, the token GEMM,
``group_norm._gn_apply_partials_kernel``) folds those partials into mean and rstd in its own prologue
and normalises y as it loads it, so y is never re-read for its statistics.

x: (B, C_in, H, W) channels_last (NHWC in memory); weight: (C_out, C_in, 3, 3) read in place through its
strides (no copy): the model keeps it channels_last, which is (C_out, 3, 3, C_in) in memory, so each
output channel's K = 9 * C_in weights are contiguous in the GEMM's K order; y: (B, C_out, H, W)
channels_last, x's dtype; bias and the normalise-on-load gn_weight, gn_bias (C,) float32 or x's dtype, read
in float32. Padding: masked loads (zeros). bf16/fp16 use the tensor cores with float32 accumulation; float32 follows PyTorch's
cuDNN convolution TF32 setting (``_common.conv_ieee``): TF32 tensor cores where eager's cuDNN would use them
(PyTorch's default), exact (``input_precision="ieee"``) dots where it is off. The statistics are those of y as stored
(rounded to its dtype), which is what an unfused GroupNorm reading y sees.
"""
import itertools

import triton
import triton.language as tl

from . import group_norm as _gn
from ._common import DTYPE_NAMES, DTYPES, with_fp32_params, with_ones
from ._common import check_param, conv_ieee, precisions
from ._common import dot as _dot
from ._common import maximum as _maximum
from ._common import relu as _relu


@triton.jit
def _conv_k_loop(acc, x_base, stride_xc, w_tap, stride_wc, pix, pix_ok, w_noff, n_mask, c_lo, C_part,
                 gw_ptr, gb_ptr, mean, rstd, off_h, off_w,
                 BLOCK_K: tl.constexpr, IEEE: tl.constexpr, NORM_IN: tl.constexpr, POOL_IN: tl.constexpr):
    """acc += A @ Wt over the input channels [0, C_part) of one input tensor for one tap; those are the
    GEMM's channels [c_lo, c_lo + C_part) (the weight's channel index). NORM_IN: A is normalised on load,
    relu((a - mean) * rstd * gw[c] + gb[c]) rounded to the input dtype, zero at padded pixels. POOL_IN:
    A is the 2x2 max-pool of the input, read on load (``pix`` addresses the window's top-left element,
    ``off_h``/``off_w`` are the input's row and column strides); padded pixels are zeros."""
    kk = tl.arange(0, BLOCK_K)
    for k0 in range(0, C_part, BLOCK_K):
        c = k0 + kk
        c_ok = c < C_part
        a_mask = pix_ok[:, None] & c_ok[None, :]
        a_ptr = x_base + pix[:, None] + c[None, :] * stride_xc
        a = tl.load(a_ptr, mask=a_mask, other=0.0)
        if POOL_IN:  # the max in float32 (exact: it picks one of the values; NaN wins, as in max_pool2d)
            m = _maximum(a.to(tl.float32), tl.load(a_ptr + off_w, mask=a_mask, other=0.0).to(tl.float32))
            m = _maximum(m, tl.load(a_ptr + off_h, mask=a_mask, other=0.0).to(tl.float32))
            m = _maximum(m, tl.load(a_ptr + off_h + off_w, mask=a_mask, other=0.0).to(tl.float32))
            a = m.to(a.dtype)
        if NORM_IN:
            scale = tl.load(gw_ptr + c, mask=c_ok, other=0.0).to(tl.float32) * rstd
            shift = tl.load(gb_ptr + c, mask=c_ok, other=0.0).to(tl.float32) - mean * scale
            v = _relu(a.to(tl.float32) * scale[None, :] + shift[None, :])  # group_norm._pre_relu's formula
            # padding is applied after normalisation: padded pixels are zeros of the normalised input
            a = tl.where(a_mask, v, 0.0).to(a.dtype)
        wt = tl.load(w_tap + (c_lo + c)[:, None] * stride_wc + w_noff[None, :],
                     mask=c_ok[:, None] & n_mask[None, :], other=0.0)
        acc += _dot(a, wt, IEEE)
    return acc


@triton.jit
def _conv3x3_kernel(
    x_ptr,  # (B, C1, H, W), any strides (channels_last: NHWC in memory)
    x2_ptr,  # HAS_X2: (B, C_in - C1, H, W), channel stride 1: channels [C1, C_in) of the concatenated input
    w_ptr,  # (C_out, C_in, 3, 3), strides below
    bias_ptr,  # (C_out,)
    y_ptr,  # (B, H, W, C_out) in memory
    part_ptr,  # (B, P, 3) float32: count, mean, M2 per (M tile, N tile)
    pin_ptr,  # NORM_IN: (B, P_in, 3) float32 partials of x's GroupNorm(1, C_in) statistics
    gw_ptr, gb_ptr,  # NORM_IN: GroupNorm weight and bias (C_in,)
    H, W, C1, C_in, C_out, P_in, eps,
    stride_xb, stride_xh, stride_xw, stride_xc,
    stride_x2b, stride_x2h, stride_x2w,
    stride_wn, stride_wc, stride_wh, stride_ww,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    NORM_IN: tl.constexpr, HAS_X2: tl.constexpr, BLOCK_P: tl.constexpr, POOL_IN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    n_m = tl.num_programs(0)
    n_n = tl.num_programs(1)
    HW = H * W
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m < HW
    n_mask = n < C_out
    oh = m // W
    ow = m % W
    mean = 0.0
    rstd = 1.0
    if NORM_IN:
        mean, rstd = _gn.partials_stats(pin_ptr, b, P_in, eps, BLOCK_P)
    x_base = x_ptr + b.to(tl.int64) * stride_xb
    x2_base = x2_ptr + b.to(tl.int64) * stride_x2b
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tap in range(9):
        ih = oh + (tap // 3 - 1)
        iw = ow + (tap % 3 - 1)
        pix_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        w_tap = w_ptr + (tap // 3) * stride_wh + (tap % 3) * stride_ww
        if POOL_IN:  # x is (B, C_in, 2H, 2W): the tap's pixel is the window at (2 ih, 2 iw)
            pix = ih * (2 * stride_xh) + iw * (2 * stride_xw)
        else:
            pix = ih * stride_xh + iw * stride_xw
        acc = _conv_k_loop(acc, x_base, stride_xc, w_tap, stride_wc, pix, pix_ok, n * stride_wn, n_mask, 0, C1,
                           gw_ptr, gb_ptr, mean, rstd, stride_xh, stride_xw, BLOCK_K, IEEE, NORM_IN, POOL_IN)
        if HAS_X2:
            acc = _conv_k_loop(acc, x2_base, 1, w_tap, stride_wc, ih * stride_x2h + iw * stride_x2w, pix_ok,
                               n * stride_wn, n_mask, C1, C_in - C1, gw_ptr, gb_ptr, mean, rstd, 0, 0, BLOCK_K,
                               IEEE, False, False)
    bias = tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
    out = (acc + bias[None, :]).to(y_ptr.dtype.element_ty)
    mask = m_mask[:, None] & n_mask[None, :]
    y_base = y_ptr + b.to(tl.int64) * HW * C_out
    tl.store(y_base + m[:, None] * C_out + n[None, :], out, mask=mask)
    # GroupNorm(1, C) partial statistics of this tile's valid outputs, as stored (rounded).
    v = out.to(tl.float32)
    cnt = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
    tile_mean = tl.sum(tl.sum(tl.where(mask, v, 0.0), axis=1), axis=0) / cnt
    d = tl.where(mask, v - tile_mean, 0.0)
    m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
    p = part_ptr + ((b * n_m + pid_m) * n_n + pid_n) * 3
    tl.store(p, cnt)
    tl.store(p + 1, tile_mean)
    tl.store(p + 2, m2)


# ----------------------------------------------------------------------------------------------------
# Launcher. Validates, allocates and launches; no autograd here (the glue in fast_unet/ops/).

import torch  # noqa: E402


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by (dtype kind, variant): "small_hw" where a sample
# has at most 64 output pixels (the 8x8 layers at 64x64: a 128-row tile would be half masked), else
# "wide_k" for C_in >= 32 and "narrow_k" below. Every entry is in the AOT compile report
# (``aot_builds`` below) and was picked from it (4 warps at 128x64 spilled in bf16; float32 spilled on sm_80
# at BLOCK_K 32, and at 2 stages; 64x64x32 with 4 warps sat at 255 registers in bf16); their speed is a
# guess until a GPU has measured them.
CONFIGS = {
    ("half", "narrow_k"): (128, 64, 16, 8, 3),
    ("half", "wide_k"): (128, 64, 32, 8, 3),
    ("half", "small_hw"): (64, 64, 16, 4, 3),
    # C_out >= 128, for the input modes in WIDE_N_MODES: a 128-wide N tile halves what each MAC costs in
    # the A tile's loads, addresses and normalise-on-load math (warp instructions per 1,024 MACs, bf16,
    # sm_90: norm-on-load 7.8 -> 6.0 at 128 rows, 12.1 -> 6.2 at 64 rows; plain 5.3 -> 3.6; pool
    # 5.0 -> 3.9). 128x128x32 issues fewer still (norm-on-load 4.5) but spills on sm_80 with float32
    # parameters (112 bytes) and, at 2-4 stages, in fp16 plain or pool-on-load on sm_90 (24-72 bytes).
    ("half", "wide_n"): (128, 128, 16, 8, 3),
    ("half", "small_hw_wide_n"): (64, 128, 32, 4, 3),
    ("float32", "narrow_k"): (64, 64, 16, 4, 1),
    ("float32", "wide_k"): (64, 64, 16, 4, 1),
    ("float32", "small_hw"): (64, 64, 16, 4, 1),
    # float32 with the max-pool read on load: at 1 stage sm_90 capped it at 128 (4 warps) or 80 (8 warps)
    # registers and spilled 8-16 bytes; 2 stages compile to 168 registers, no spill, on both archs
    ("float32", "pool"): (64, 64, 16, 4, 2),
}
# The wide-N config of a variant, and the input modes it takes: the others stay on the variant's own
# config where the wide one spills (concat: 88 bytes on sm_90 at 128x128x32; plain, strided: 48 bytes
# at 64x128x32 with 4 warps; concat at 64 rows: 16 bytes on sm_80).
WIDE_N = {("half", "wide_k"): "wide_n", ("half", "small_hw"): "small_hw_wide_n"}
WIDE_N_MODES = {"wide_n": ("plain", "norm-on-load", "pool-on-load"), "small_hw_wide_n": ("norm-on-load",)}
WIDE_N_MIN_C_OUT = 128


NORM_BLOCK_P = 32  # partials folded per step by a normalise-on-load prologue


def input_mode(norm=False, concat=False, pool=False):
    """The compile report's name of a launch's input mode."""
    return "pool-on-load" if pool else "norm-on-load" if norm else "concat" if concat else "plain"


def config(dtype, c_in, hw, pool=False, c_out=0, norm=False, concat=False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of a launch: x's dtype, the GEMM's C_in (both
    inputs' channels), the output pixels per sample, the input mode and C_out."""
    kind = "float32" if dtype in (torch.float32, "float32") else "half"
    if kind == "float32" and pool:
        return CONFIGS[(kind, "pool")]
    variant = "small_hw" if hw <= 64 else ("wide_k" if c_in >= 32 else "narrow_k")
    wide = WIDE_N.get((kind, variant))
    if wide and c_out >= WIDE_N_MIN_C_OUT and input_mode(norm, concat, pool) in WIDE_N_MODES[wide]:
        return CONFIGS[(kind, wide)]
    return CONFIGS[(kind, variant)]


def check_conv(x, weight, bias, x2=None, norm=None, pool=False):
    """Validate the launcher's arguments; errors name the argument."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor (B, C_in, H, W), got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if pool:
        if x2 is not None or norm is not None:
            raise ValueError("pool (max-pool on load) applies to a single input without norm; got x2 or norm too")
        if x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"x's height and width must be even to be max-pooled on load, got {tuple(x.shape[2:])}")
    c_in = x.shape[1]
    if x2 is not None:
        if x2.dim() != 4 or x2.shape[0] != x.shape[0] or x2.shape[2:] != x.shape[2:]:
            raise ValueError(f"x2 must be (B, C2, H, W) = ({x.shape[0]}, C2, {x.shape[2]}, {x.shape[3]}) to be "
                             f"concatenated after x's channels, got {tuple(x2.shape)}")
        if x2.dtype != x.dtype or x2.device != x.device:
            raise TypeError(f"x2 ({x2.dtype}, {x2.device}) must match x ({x.dtype}, {x.device})")
        if norm is not None:
            raise ValueError("norm (normalise on load) applies to a single input; got x2 as well")
        c_in += x2.shape[1]
    if weight.dim() != 4 or weight.shape[1:] != (c_in, 3, 3):
        raise ValueError(f"weight must have shape (C_out, {c_in}, 3, 3) for an input with {c_in} channels, "
                         f"got {tuple(weight.shape)}")
    if bias is None or bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got "
                         f"{None if bias is None else tuple(bias.shape)}")
    params = [("weight", weight), ("bias", bias)]
    if norm is not None:
        partials, gn_weight, gn_bias, _eps = norm
        _gn.check_partials(x, partials, gn_weight, gn_bias, prefix="norm ", x_name="x")
        params += [("norm gn_weight", gn_weight), ("norm gn_bias", gn_bias)]
    if weight.dtype != x.dtype:
        raise TypeError(f"weight has dtype {weight.dtype} but x is {x.dtype}")
    for name, p in params:
        if p.dim() == 1:
            check_param(name, p, x, "x")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}")


def conv3x3_stats(x, weight, bias, x2=None, norm=None, pool=False):
    """The 3x3 conv (stride 1, padding 1) of x, or of cat([x, x2], dim=1) read in place (``x2``), or of
    relu(GroupNorm(1, C_in)(x)) normalised on load (``norm`` = (partials (B, P_in, 3) of x's statistics,
    gn_weight, gn_bias, eps)), or of max_pool2d(x, 2) pooled on load (``pool``: x is (B, C_in, 2H, 2W)).
    x is read through its strides (NCHW or channels_last, no copy).

    Returns (y (B, C_out, H, W) channels_last in x's dtype, partials (B, P, 3) float32 of y)."""
    check_conv(x, weight, bias, x2, norm, pool)
    bias, = _gn.dense(bias)  # read as ptr + n
    if norm is not None:
        norm = (norm[0], *_gn.dense(norm[1], norm[2]), norm[3])
    B, C1, H, W = x.shape
    if pool:
        H, W = H // 2, W // 2
    C_in = weight.shape[1]
    C_out = weight.shape[0]
    if x2 is not None:
        x2 = x2.contiguous(memory_format=torch.channels_last)
    bm, bn, bk, warps, stages = config(x.dtype, C_in, H * W, pool, C_out, norm is not None, x2 is not None)
    grid = (triton.cdiv(H * W, bm), triton.cdiv(C_out, bn), B)
    y = torch.empty((B, C_out, H, W), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    partials = torch.empty((B, grid[0] * grid[1], 3), device=x.device, dtype=torch.float32)
    if B * H * W * C_out == 0:
        return y, partials
    if norm is not None:
        pin, gw, gb, eps = norm
    else:
        # unused placeholders (not NORM_IN), of the types the compile report's builds take (pin: float32,
        # not aliasing the written partials), so that the JIT compiles the build the report describes
        pin = torch.empty((1, 1, 3), device=x.device, dtype=torch.float32)
        gw, gb, eps = bias, bias, 0.0
    xs = x.stride()
    x2s = x2.stride() if x2 is not None else (0, 0, 0, 0)
    _conv3x3_kernel[grid](x, x2 if x2 is not None else x, weight, bias, y, partials, pin, gw, gb,
                          H, W, C1, C_in, C_out, pin.shape[1] if norm is not None else 0, float(eps),
                          xs[0], xs[2], xs[3], xs[1], x2s[0], x2s[2], x2s[3], *weight.stride(),
                          BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=conv_ieee(x.dtype),
                          NORM_IN=norm is not None, HAS_X2=x2 is not None, BLOCK_P=NORM_BLOCK_P, POOL_IN=bool(pool),
                          num_warps=warps, num_stages=stages)
    return y, partials


# ----------------------------------------------------------------------------------------------------
# Declarations: the pointer arguments each kernel writes (bench.kernels splits a launch's bytes into read
# and written with them), and the builds of the ahead-of-time compile report (fast_unet/aot.py).

WRITES = {
    "_conv3x3_kernel": {"y_ptr", "part_ptr"},
}

# Signature hints: float32 pointers (other pointers take the build's dtype), float scalars (other
# scalars are i32), and integers that are multiples of 16 at the model's shapes (x's strides are those
# of channels_last activations with C_in >= 64).
AOT_FP32_POINTERS = {"part_ptr", "pin_ptr"}
# (C,) parameter pointers (and their gradients'): float32 or the build's dtype; the builds take both
# (``_common.with_fp32_params``: float32 is autocast's case).
AOT_PARAM_POINTERS = {"bias_ptr", "gw_ptr", "gb_ptr"}
AOT_FLOAT_ARGS = {"eps"}
AOT_ALIGNED_INTS = {"C1", "C_in", "stride_xb", "stride_xh", "stride_xw", "stride_x2b", "stride_x2h", "stride_x2w"}
# Ints that are 1 at inputs the launchers take (a 1-pixel side, one input channel, one partial): the JIT specialises them to constants.
AOT_ONE_INTS = {"H", "W", "C1", "C_in", "P_in"}
# The work of one iteration of each kernel's inner loop, for the compile report's per-1,024 figures
# (fast_unet/aot.py loop_tile): the K loop's BLOCK_M x BLOCK_N x BLOCK_K multiply-adds.
AOT_LOOP_TILES = {"_conv3x3_kernel": (("BLOCK_M", "BLOCK_N", "BLOCK_K"), "MACs")}


INPUT_MODES = ("plain", "norm-on-load", "concat", "pool-on-load")


def config_modes(kind, name):
    """The input modes ``config`` launches with ``CONFIGS[(kind, name)]``."""
    if name in WIDE_N_MODES:
        return WIDE_N_MODES[name]
    if kind == "float32":  # float32 pool-on-load has its own config ("pool"), the others share one
        return ("pool-on-load",) if name == "pool" else INPUT_MODES[:3]
    return INPUT_MODES


def aot_builds():
    """[(kernel label, jit fn, config label, dtype name, constexprs, options)]: each config in ``CONFIGS``
    with each input mode it is launched with: plain (NCHW model input, strided), normalise on load, concat
    on load, max-pool on load. The channels_last weight's ``stride_wc == 1`` is specialised as the JIT does."""
    out = []
    for dt in DTYPE_NAMES:
        kind = "float32" if dt == "float32" else "half"
        modes = {}  # config -> the input modes launched with it
        for (k, name), c in CONFIGS.items():
            if k == kind:
                modes.setdefault(c, set()).update(config_modes(kind, name))
        for (bm, bn, bk, warps, stages), allowed in sorted(modes.items()):
            variants = [v for v in (("plain", False, False, {}), ("norm-on-load", True, False, dict(stride_xc=1)),
                                    ("concat", False, True, dict(stride_xc=1)),
                                    ("pool-on-load", False, False, dict(stride_xc=1, POOL_IN=True)))
                        if v[0] in allowed]
            for (variant, norm_in, has_x2, ce_x), (ieee, tag) in itertools.product(variants, precisions(dt)):
                out.append(("conv3x3_gn", _conv3x3_kernel,
                            f"{dt} {variant} {bm}x{bn}x{bk} w{warps} s{stages}{tag}", dt,
                            dict(dict(POOL_IN=False), **ce_x, stride_wc=1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                 IEEE=ieee, NORM_IN=norm_in, HAS_X2=has_x2, BLOCK_P=NORM_BLOCK_P),
                            dict(num_warps=warps, num_stages=stages)))
    return with_ones(with_fp32_params(out, AOT_PARAM_POINTERS), AOT_ONE_INTS)
