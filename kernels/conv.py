"""3x3 convolution (stride 1, padding 1) as an implicit GEMM over NHWC, with the GroupNorm(1, C)
partial statistics of its output in the epilogue (Triton).

    y[b, h, w, n] = bias[n] + sum_{kh, kw, c} x[b, h + kh - 1, w + kw - 1, c] * weight[n, c, kh, kw]

GEMM view: M = B * H * W output pixels, N = C_out, K = 9 * C_in. The M tiles are per sample (grid
(cdiv(H*W, BLOCK_M), cdiv(C_out, BLOCK_N), B)), so a tile never straddles two samples and its epilogue
can reduce its valid outputs to one float32 (count, mean, M2) partial, stored in ``partials``
(B, P, 3), P = cdiv(HW, BLOCK_M) * cdiv(C_out, BLOCK_N): the layout ``group_norm._gn_combine_kernel``
consumes. ``combine`` + ``apply`` then finish GroupNorm + ReLU + emb without re-reading y for its
statistics.

x: (B, C_in, H, W) channels_last (NHWC in memory); weight: (C_out, C_in, 3, 3) read in place through its
strides (no copy): the model keeps it channels_last, which is (C_out, 3, 3, C_in) in memory, so each
output channel's K = 9 * C_in weights are contiguous in the GEMM's K order; y: (B, C_out, H, W)
channels_last, x's dtype. Padding: masked loads (zeros). bf16/fp16 use the tensor cores with float32 accumulation; float32 uses exact
(``input_precision="ieee"``) dots, to match eager float32. The statistics are those of y as stored
(rounded to its dtype), which is what an unfused GroupNorm reading y sees.
"""
import triton
import triton.language as tl

from ._common import dot as _dot


@triton.jit
def _conv3x3_kernel(
    x_ptr,  # (B, H, W, C_in) in memory
    w_ptr,  # (C_out, C_in, 3, 3), strides below
    bias_ptr,  # (C_out,)
    y_ptr,  # (B, H, W, C_out) in memory
    part_ptr,  # (B, P, 3) float32: count, mean, M2 per (M tile, N tile)
    H, W, C_in, C_out,
    stride_wn, stride_wc, stride_wh, stride_ww,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
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
    x_base = x_ptr + b.to(tl.int64) * HW * C_in
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tap in range(9):
        ih = oh + (tap // 3 - 1)
        iw = ow + (tap % 3 - 1)
        pix_ok = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        pix = (ih * W + iw) * C_in
        w_tap = w_ptr + (tap // 3) * stride_wh + (tap % 3) * stride_ww
        for k0 in range(0, C_in, BLOCK_K):
            c = k0 + kk
            c_ok = c < C_in
            a = tl.load(x_base + pix[:, None] + c[None, :], mask=pix_ok[:, None] & c_ok[None, :], other=0.0)
            wt = tl.load(w_tap + c[:, None] * stride_wc + n[None, :] * stride_wn,
                         mask=c_ok[:, None] & n_mask[None, :], other=0.0)
            acc += _dot(a, wt, IEEE)
    bias = tl.load(bias_ptr + n, mask=n_mask, other=0.0).to(tl.float32)
    out = (acc + bias[None, :]).to(y_ptr.dtype.element_ty)
    mask = m_mask[:, None] & n_mask[None, :]
    y_base = y_ptr + b.to(tl.int64) * HW * C_out
    tl.store(y_base + m[:, None] * C_out + n[None, :], out, mask=mask)
    # GroupNorm(1, C) partial statistics of this tile's valid outputs, as stored (rounded).
    v = out.to(tl.float32)
    cnt = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
    mean = tl.sum(tl.sum(tl.where(mask, v, 0.0), axis=1), axis=0) / cnt
    d = tl.where(mask, v - mean, 0.0)
    m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
    p = part_ptr + ((b * n_m + pid_m) * n_n + pid_n) * 3
    tl.store(p, cnt)
    tl.store(p + 1, mean)
    tl.store(p + 2, m2)


# ----------------------------------------------------------------------------------------------------
# Launcher. Validates, allocates and launches; no autograd here
# (fast_unet/triton_ops.py).

import torch  # noqa: E402

from . import group_norm as _gn  # noqa: E402

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by (dtype kind, variant): "small_hw" where a sample
# has at most 64 output pixels (the 8x8 layers at 64x64: a 128-row tile would be half masked), else
# "wide_k" for C_in >= 32 and "narrow_k" below. Every entry is in the AOT compile report
# (fast_unet/aot.py) and was picked from it (4 warps at 128x64 spilled in bf16; float32 spilled on sm_80
# at BLOCK_K 32, and at 2 stages; 64x64x32 with 4 warps sat at 255 registers in bf16); their speed is a
# guess until a GPU has measured them.
CONFIGS = {
    ("half", "narrow_k"): (128, 64, 16, 8, 3),
    ("half", "wide_k"): (128, 64, 32, 8, 3),
    ("half", "small_hw"): (64, 64, 16, 4, 3),
    ("float32", "narrow_k"): (64, 64, 16, 4, 1),
    ("float32", "wide_k"): (64, 64, 16, 4, 1),
    ("float32", "small_hw"): (64, 64, 16, 4, 1),
}


def config(dtype, c_in, hw):
    kind = "float32" if dtype in (torch.float32, "float32") else "half"
    variant = "small_hw" if hw <= 64 else ("wide_k" if c_in >= 32 else "narrow_k")
    return CONFIGS[(kind, variant)]


def check(x, weight, bias):
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (B, C_in, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    c_in = x.shape[1]
    if weight.dim() != 4 or weight.shape[1:] != (c_in, 3, 3):
        raise ValueError(f"weight must have shape (C_out, {c_in}, 3, 3) for x with {c_in} channels, "
                         f"got {tuple(weight.shape)}")
    if bias is None or bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got "
                         f"{None if bias is None else tuple(bias.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {p.dtype} but x is {x.dtype}")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}")


def conv3x3_stats(x, weight, bias):
    """Returns (y (B, C_out, H, W) channels_last in x's dtype, partials (B, P, 3) float32)."""
    check(x, weight, bias)
    B, C_in, H, W = x.shape
    C_out = weight.shape[0]
    x = x.contiguous(memory_format=torch.channels_last)
    bm, bn, bk, warps, stages = config(x.dtype, C_in, H * W)
    grid = (triton.cdiv(H * W, bm), triton.cdiv(C_out, bn), B)
    y = torch.empty((B, C_out, H, W), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    partials = torch.empty((B, grid[0] * grid[1], 3), device=x.device, dtype=torch.float32)
    if B * H * W * C_out == 0:
        return y, partials
    _conv3x3_kernel[grid](x, weight, bias, y, partials, H, W, C_in, C_out, *weight.stride(), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                          IEEE=x.dtype == torch.float32, num_warps=warps, num_stages=stages)
    return y, partials


def conv3x3_gn_stats(x, weight, bias, eps):
    """Returns (y, mean (B,), rstd (B,)): the conv output and its GroupNorm(1, C_out) statistics."""
    y, partials = conv3x3_stats(x, weight, bias)
    B = y.shape[0]
    mean = torch.empty((B,), device=y.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if y.numel() == 0:
        return y, mean, rstd
    _gn._gn_combine_kernel[(B,)](partials, mean, rstd, partials.shape[1], float(eps), BLOCK_P=128, num_warps=4)
    return y, mean, rstd


def gn_relu_apply(y, mean, rstd, gn_weight, gn_bias, emb=None):
    """relu((y - mean) * rstd * gn_weight + gn_bias) + emb with the given statistics (group_norm's apply)."""
    _gn._check(y, gn_weight, gn_bias, emb)
    B, C, H, W = y.shape
    HW = H * W
    channels_last = _gn.layout_of(y)
    block_c, block_hw = _gn.tile_config(C, HW, channels_last)
    out = torch.empty_like(y)
    if y.numel() == 0:
        return out
    grid = (B, triton.cdiv(C, block_c), triton.cdiv(HW, block_hw))
    _gn._gn_apply_kernel[grid](y, out, gn_weight, gn_bias, emb if emb is not None else mean, mean, rstd, C, HW,
                               emb.stride(0) if emb is not None else 0, emb.stride(1) if emb is not None else 0,
                               HAS_EMB=emb is not None, CHANNELS_LAST=channels_last,
                               BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=_gn.NUM_WARPS)
    return out
