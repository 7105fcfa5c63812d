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
from ._common import to_dtype as _to_dtype


@triton.jit
def _load_input(x_base, pix, pix_ok, c, c_ok, stride_xc, gw_ptr, gb_ptr, mean, rstd, off_h, off_w,
                NORM_IN: tl.constexpr, POOL_IN: tl.constexpr):
    """The conv's input at the pixels ``pix`` (offsets from x_base; rows) and channels ``c`` (columns), in
    x's dtype: zeros where not ``pix_ok`` or not ``c_ok`` (padding, masked rows and channels). NORM_IN:
    relu((a - mean) * rstd * gw[c] + gb[c]) of the loaded a, rounded to x's dtype. POOL_IN: the max of the
    2x2 window whose top-left element ``pix`` addresses (``off_h``/``off_w``: x's row and column strides)."""
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
        v = a.to(tl.float32) * scale[None, :] + shift[None, :]  # group_norm._pre_relu's formula
        # Padding is applied after normalisation: padded pixels are zeros of the normalised input, by
        # relu(min(v, bound)) with bound +inf on the image and 0 on padding (NaN-propagating min: v's NaN
        # stays NaN on the image; on padding v is the channel's shift, NaN there only where the whole
        # channel is). Masked channels need nothing: their a, gw and gb load as 0, so v = 0 - mean * 0.
        # One FMNMX per element in float32. A select (tl.where) here is moved by the compiler past the
        # rounding to x's dtype, where it unpacks and repacks each pair (sm_90, bf16, 128x64x32 forward:
        # 238 warp instructions per K step with it, 201 with the bound).
        bound = tl.where(pix_ok, float("inf"), 0.0)
        a = _relu(tl.minimum(v, bound[:, None], propagate_nan=tl.PropagateNan.ALL)).to(a.dtype)
    return a


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
        a = _load_input(x_base, pix, pix_ok, c, c_ok, stride_xc, gw_ptr, gb_ptr, mean, rstd, off_h, off_w,
                        NORM_IN, POOL_IN)
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


@triton.jit
def _conv3x3_dgrad_kernel(
    dy_ptr,  # (B, H, W, C_out) in memory: the gradient of the conv's output, in x's dtype
    w_ptr,  # (C_out, C_in, 3, 3), strides below
    dx_ptr,  # (B, C1, H, W) (POOL_IN: 2H, 2W), strides stride_d*: the gradient of x (NORM_IN: dz, below)
    dx2_ptr,  # HAS_X2: (B, C_in - C1, H, W), channel stride 1: the gradient of x2
    x_ptr,  # NORM_IN, POOL_IN: the forward's x, strides stride_x*
    pin_ptr, gw_ptr, gb_ptr,  # NORM_IN: x's partials (B, P_in, 3), the GroupNorm weight and bias (C_in,)
    mean_ptr, rstd_ptr,  # NORM_IN: (B,) float32, written: x's statistics, for the GroupNorm backward
    part_ptr,  # NORM_IN: (3, B, S, C_in) float32, S = cdiv(H * W, BLOCK_M): column sums of dxn, dz x_hat, dz
    sp_ptr,  # NORM_IN: (B, S * n_n, 2) float32: sum_c gw * (sum dz), sum_c gw * (sum dz x_hat) per tile
    p_ptr, pb_ptr,  # SUM: the weight gradient's group sums, (S_w, C_out * 9 * C_in) and (S_w, C_out) float32
    dw_ptr, db_ptr,  # SUM: d weight (strides stride_w*) and d bias (C_out,), written
    H, W, C1, C_in, C_out, P_in, eps, S_w, SUM_PER_PROG,
    stride_wn, stride_wc, stride_wh, stride_ww,
    stride_db, stride_dh, stride_dw, stride_dc,
    stride_d2b, stride_d2h, stride_d2w,
    stride_xb, stride_xh, stride_xw, stride_xc,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    NORM_IN: tl.constexpr, HAS_X2: tl.constexpr, BLOCK_P: tl.constexpr, POOL_IN: tl.constexpr,
    SUM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """The data gradient: dxn[b, i, j, c] = sum_{kh, kw, n} dy[b, i + 1 - kh, j + 1 - kw, n] w[n, c, kh, kw],
    an implicit GEMM (M = the input's H * W pixels per sample, N = C_in, K = 9 * C_out), rounded to x's
    dtype as eager's convolution backward stores it. Its epilogue undoes the input mode: HAS_X2 splits
    the channels between dx and dx2; POOL_IN routes each pixel's gradient to its 2x2 window's maximum
    (max_pool2d's choice: the first maximum, a NaN wins) and writes the window's other three zeros;
    NORM_IN applies the ReLU mask of the recomputed normalised input (dz) and writes the GroupNorm
    backward's per-tile sums, so that its one apply pass (``group_norm.group_norm_relu_bwd_apply``)
    finishes dx without reading dz for its sums. Grid (SUM + cdiv(H * W, BLOCK_M), cdiv(C_in, BLOCK_N), B).
    SUM (0 or 1): the first row of programs adds the weight gradient's group sums (launched before this
    kernel) into d weight and d bias, SUM_PER_PROG elements each, beside the tiles: no launch of their own."""
    if tl.program_id(0) < SUM:  # the weight gradient's group sums, one range per (n, b) program
        r = tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)
        e0 = r * SUM_PER_PROG
        _wgrad_sum(p_ptr, pb_ptr, dw_ptr, db_ptr, S_w, C_in, C_out, stride_wn, stride_wc, stride_wh, stride_ww,
                   e0, tl.minimum(e0 + SUM_PER_PROG, C_out * 9 * C_in + C_out), BLOCK_S)
    else:
        pid_m = tl.program_id(0) - SUM
        pid_n = tl.program_id(1)
        b = tl.program_id(2)
        n_m = tl.num_programs(0) - SUM
        n_n = tl.num_programs(1)
        HW = H * W
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = m < HW
        c_mask = c < C_in
        ih = m // W
        iw = m % W
        dy_base = dy_ptr + b.to(tl.int64) * HW * C_out
        kk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for tap in range(9):
            oh = ih + (1 - tap // 3)
            ow = iw + (1 - tap % 3)
            ok = m_mask & (oh >= 0) & (oh < H) & (ow >= 0) & (ow < W)
            row = (oh * W + ow) * C_out
            w_tap = w_ptr + (tap // 3) * stride_wh + (tap % 3) * stride_ww + c * stride_wc
            # a padded tap's rows load zeros, and 0 * a non-finite weight must not reach the border pixels
            # (eager's convolution backward never multiplies them): those rows keep the sum before the tap
            # (one select per accumulator element and tap, outside the K loop)
            before = acc
            for k0 in range(0, C_out, BLOCK_K):
                k = k0 + kk
                k_ok = k < C_out
                g = tl.load(dy_base + row[:, None] + k[None, :], mask=ok[:, None] & k_ok[None, :], other=0.0)
                wt = tl.load(w_tap[None, :] + k[:, None] * stride_wn, mask=k_ok[:, None] & c_mask[None, :], other=0.0)
                acc += _dot(g, wt, IEEE)
            acc = tl.where(ok[:, None], acc, before)
        mask = m_mask[:, None] & c_mask[None, :]
        g = _to_dtype(acc, dx_ptr.dtype.element_ty)  # the convolution's input gradient as eager stores it
        b64 = b.to(tl.int64)
        if POOL_IN:
            win = (2 * ih * stride_xh + 2 * iw * stride_xw)[:, None] + c[None, :] * stride_xc
            x_base = x_ptr + b64 * stride_xb + win
            best = tl.load(x_base, mask=mask, other=0.0).to(tl.float32)
            idx = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
            for j in range(1, 4):
                v = tl.load(x_base + (j // 2) * stride_xh + (j % 2) * stride_xw, mask=mask, other=0.0).to(tl.float32)
                take = (v > best) | (v != v)  # max_pool2d's update rule
                best = tl.where(take, v, best)
                idx = tl.where(take, j, idx)
            d_base = dx_ptr + b64 * stride_db + (2 * ih * stride_dh + 2 * iw * stride_dw)[:, None] + c[None, :] * stride_dc
            for j in range(0, 4):
                tl.store(d_base + (j // 2) * stride_dh + (j % 2) * stride_dw, tl.where(idx == j, g, 0.0), mask=mask)
        elif HAS_X2:
            pix = ih * stride_dh + iw * stride_dw
            tl.store(dx_ptr + b64 * stride_db + pix[:, None] + c[None, :] * stride_dc, g,
                     mask=mask & (c < C1)[None, :])
            pix2 = ih * stride_d2h + iw * stride_d2w
            tl.store(dx2_ptr + b64 * stride_d2b + pix2[:, None] + (c - C1)[None, :], g, mask=mask & (c >= C1)[None, :])
        elif NORM_IN:
            mean, rstd = _gn.partials_stats(pin_ptr, b, P_in, eps, BLOCK_P)
            if pid_m == 0 and pid_n == 0:
                tl.store(mean_ptr + b, mean)
                tl.store(rstd_ptr + b, rstd)
            xv = tl.load(x_ptr + b64 * stride_xb + (ih * stride_xh + iw * stride_xw)[:, None] + c[None, :] * stride_xc,
                         mask=mask, other=0.0).to(tl.float32)
            gw = tl.load(gw_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
            scale = gw * rstd
            shift = tl.load(gb_ptr + c, mask=c_mask, other=0.0).to(tl.float32) - mean * scale
            y = _relu(xv * scale[None, :] + shift[None, :]).to(dx_ptr.dtype.element_ty)  # the forward's formula
            gf = g.to(tl.float32)
            dz = tl.where(mask & ~(y <= 0.0), gf, 0.0)  # threshold_backward: 0 where y <= 0 (NaN passes)
            tl.store(dx_ptr + b64 * stride_db + (ih * stride_dh + iw * stride_dw)[:, None] + c[None, :] * stride_dc,
                     dz.to(dx_ptr.dtype.element_ty), mask=mask)
            x_hat = (xv - mean) * rstd
            s_dz = tl.sum(dz, axis=0)
            s_dzx = tl.sum(dz * x_hat, axis=0)
            plane = tl.num_programs(2) * n_m * C_in
            out = part_ptr + (b * n_m + pid_m) * C_in + c
            tl.store(out, tl.sum(tl.where(mask, gf, 0.0), axis=0), mask=c_mask)
            tl.store(out + plane, s_dzx, mask=c_mask)
            tl.store(out + 2 * plane, s_dz, mask=c_mask)
            q = sp_ptr + ((b * n_m + pid_m) * n_n + pid_n) * 2
            tl.store(q, tl.sum(gw * s_dz, axis=0))
            tl.store(q + 1, tl.sum(gw * s_dzx, axis=0))
        else:
            tl.store(dx_ptr + b64 * stride_db + (ih * stride_dh + iw * stride_dw)[:, None] + c[None, :] * stride_dc,
                     g, mask=mask)


@triton.jit(do_not_specialize=["SAMPLES"])  # SAMPLES = 1 made a constant: 16 bytes of stack (float32, sm_90)
def _conv3x3_wgrad_kernel(
    x_ptr, x2_ptr,  # the forward's inputs, as ``_conv3x3_kernel`` reads them
    dy_ptr,  # (B, H, W, C_out) in memory
    pin_ptr, gw_ptr, gb_ptr,  # NORM_IN: x's partials (B, P_in, 3), the GroupNorm weight and bias
    out_ptr,  # SPLIT: (S, C_out * 9 * C_in) float32, (n, tap, c) order; else d weight, strides stride_w*
    db_ptr,  # SPLIT: (S, C_out) float32; else d bias (C_out,)
    B, H, W, C1, C_in, C_out, P_in, eps, SAMPLES,
    stride_xb, stride_xh, stride_xw, stride_xc,
    stride_x2b, stride_x2h, stride_x2w,
    stride_wn, stride_wc, stride_wh, stride_ww,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
    NORM_IN: tl.constexpr, HAS_X2: tl.constexpr, BLOCK_P: tl.constexpr, POOL_IN: tl.constexpr,
    SPLIT: tl.constexpr, TAPS_N: tl.constexpr,
):
    """The weight gradient of one tap: dw[n, c, kh, kw] = sum_{b, i, j} dy[b, i, j, n] a[b, i + kh - 1, j + kw - 1, c],
    an implicit GEMM (M = C_out, N = C_in, K = the pixels of SAMPLES samples), with a the conv's input read
    as the forward reads it (``_load_input``: normalised, max-pooled or from two tensors on load; nothing
    materialised). Grid (n_nb + n_nb * 9 * cdiv(C_in, BLOCK_N), S), n_nb = cdiv(C_out, BLOCK_M): the first
    n_nb programs sum dy's columns (d bias) beside the GEMM tiles; then program_id(0) runs over the
    channel blocks, the taps, the output-channel blocks, so the programs that read the same dy rows run
    side by side (L2); program_id(1) over the S groups of SAMPLES samples. SPLIT: each group's
    float32 sums go to ``out`` for ``_conv3x3_wgrad_sum_kernel``; else (one group) to d weight and d bias.
    TAPS_N (plain input, few channels: the model's 3-channel image): the GEMM's N runs over all 9 * C_in
    (tap, channel) pairs, j = tap * C_in + c, in cdiv(9 * C_in, BLOCK_N) blocks, each element of A
    gathered at its own tap, instead of 9 programs per channel block that each fill C_in of BLOCK_N columns."""
    pid = tl.program_id(0)
    s = tl.program_id(1)
    HW = H * W
    n_nb = tl.cdiv(C_out, BLOCK_M)
    b_first = s * SAMPLES
    kk = tl.arange(0, BLOCK_K)
    if pid < n_nb:  # d bias: dy's column sums over the group, beside the GEMM programs
        n = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        n_ok = n < C_out
        dbacc = tl.zeros([BLOCK_M], dtype=tl.float32)
        for i in range(0, tl.minimum(SAMPLES, B - b_first)):
            dy_base = dy_ptr + (b_first + i).to(tl.int64) * HW * C_out
            for p0 in range(0, HW, BLOCK_K):
                p = p0 + kk
                g = tl.load(dy_base + p[:, None] * C_out + n[None, :], mask=(p < HW)[:, None] & n_ok[None, :],
                            other=0.0)
                dbacc += tl.sum(g.to(tl.float32), axis=0)
        if SPLIT:
            tl.store(db_ptr + s * C_out + n, dbacc, mask=n_ok)
        else:
            tl.store(db_ptr + n, _to_dtype(dbacc, db_ptr.dtype.element_ty), mask=n_ok)
    else:
        t = pid - n_nb
        if TAPS_N:
            tl.static_assert(not (NORM_IN or HAS_X2 or POOL_IN), "TAPS_N reads a plain input")
            n_cb = tl.cdiv(9 * C_in, BLOCK_N)
            nb = t // n_cb
            j = (t % n_cb) * BLOCK_N + tl.arange(0, BLOCK_N)
            tap = j // C_in  # vectors over the columns
            c = j % C_in
            c_ok = j < 9 * C_in
        else:
            n_cb = tl.cdiv(C_in, BLOCK_N)
            cb = t % n_cb
            tap = (t // n_cb) % 9
            nb = t // (9 * n_cb)
        kh = tap // 3
        kw = tap % 3
        n = nb * BLOCK_M + tl.arange(0, BLOCK_M)
        if not TAPS_N:
            c = cb * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < C_out
        if not TAPS_N:
            c_ok = c < C_in
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for i in range(0, tl.minimum(SAMPLES, B - b_first)):
            b = b_first + i
            mean = 0.0
            rstd = 1.0
            if NORM_IN:
                mean, rstd = _gn.partials_stats(pin_ptr, b, P_in, eps, BLOCK_P)
            x_base = x_ptr + b.to(tl.int64) * stride_xb
            x2_base = x2_ptr + b.to(tl.int64) * stride_x2b
            dy_base = dy_ptr + b.to(tl.int64) * HW * C_out
            for p0 in range(0, HW, BLOCK_K):
                p = p0 + kk
                p_ok = p < HW
                # Each branch keeps its own dy load (and below, its own store) on purpose: one shared dy load
                # ahead of the address math, or one shared store form, moves ptxas's register allocation
                # and spills 8-16 bytes in builds of both branches on sm_80 and sm_90 (compile report).
                if TAPS_N:  # each column at its own tap
                    ih = (p // W)[:, None] + (kh - 1)[None, :]
                    iw = (p % W)[:, None] + (kw - 1)[None, :]
                    a_ok = p_ok[:, None] & c_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    g = tl.load(dy_base + p[:, None] * C_out + n[None, :], mask=p_ok[:, None] & n_ok[None, :],
                                other=0.0)
                    a = tl.load(x_base + ih * stride_xh + iw * stride_xw + c[None, :] * stride_xc, mask=a_ok, other=0.0)
                else:
                    ih = p // W + (kh - 1)
                    iw = p % W + (kw - 1)
                    in_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    g = tl.load(dy_base + p[:, None] * C_out + n[None, :], mask=p_ok[:, None] & n_ok[None, :],
                                other=0.0)
                    if POOL_IN:
                        pix = ih * (2 * stride_xh) + iw * (2 * stride_xw)
                    else:
                        pix = ih * stride_xh + iw * stride_xw
                    if HAS_X2:  # one load, each channel's address in x or in x2
                        src = tl.where((c < C1)[None, :], x_base + pix[:, None] + c[None, :] * stride_xc,
                                       x2_base + (ih * stride_x2h + iw * stride_x2w)[:, None] + (c - C1)[None, :])
                        a = tl.load(src, mask=in_ok[:, None] & c_ok[None, :], other=0.0)
                    else:
                        a = _load_input(x_base, pix, in_ok, c, c_ok, stride_xc, gw_ptr, gb_ptr, mean, rstd, stride_xh,
                                        stride_xw, NORM_IN, POOL_IN)
                acc += _dot(tl.trans(g), a, IEEE)
        mask = n_ok[:, None] & c_ok[None, :]
        if SPLIT:
            K9 = 9 * C_in
            if TAPS_N:
                dst = out_ptr + s.to(tl.int64) * (C_out * K9) + n[:, None] * K9 + j[None, :]
            else:
                dst = out_ptr + s.to(tl.int64) * (C_out * K9) + n[:, None] * K9 + tap * C_in + c[None, :]
            tl.store(dst, acc, mask=mask)
        else:
            if TAPS_N:
                dst = out_ptr + n[:, None] * stride_wn + (c * stride_wc + kh * stride_wh + kw * stride_ww)[None, :]
            else:
                dst = out_ptr + n[:, None] * stride_wn + c[None, :] * stride_wc + kh * stride_wh + kw * stride_ww
            tl.store(dst, _to_dtype(acc, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _conv3x3_wgrad_sum_kernel(
    p_ptr,  # (S, C_out * 9 * C_in) float32 from _conv3x3_wgrad_kernel
    pb_ptr,  # (S, C_out) float32 from _conv3x3_wgrad_kernel
    dw_ptr,  # (C_out, C_in, 3, 3), strides below
    db_ptr,  # (C_out,)
    S, C_in, C_out,
    stride_wn, stride_wc, stride_wh, stride_ww,
    BLOCK: tl.constexpr,
):
    """d weight and d bias where no data gradient runs to add them (``_conv3x3_dgrad_kernel``'s SUM)."""
    e0 = tl.program_id(0) * BLOCK
    _wgrad_sum(p_ptr, pb_ptr, dw_ptr, db_ptr, S, C_in, C_out, stride_wn, stride_wc, stride_wh, stride_ww,
               e0, tl.minimum(e0 + BLOCK, C_out * 9 * C_in + C_out), BLOCK)


@triton.jit
def _wgrad_sum(p_ptr, pb_ptr, dw_ptr, db_ptr, S, C_in, C_out, stride_wn, stride_wc, stride_wh, stride_ww, e0, e1,
               BLOCK: tl.constexpr):
    """Elements [e0, e1) of d weight and d bias: the S groups' float32 sums added in a fixed order
    (deterministic), rounded once; elements [0, C_out * 9 * C_in) are d weight's in (n, tap, c) order, the
    last C_out d bias's."""
    K9 = 9 * C_in
    NW = C_out * K9
    for start in range(e0, e1, BLOCK):
        e = start + tl.arange(0, BLOCK)
        ok = e < e1
        is_w = e < NW
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for s in range(0, S):
            acc += tl.load(p_ptr + s * NW + e, mask=ok & is_w, other=0.0)
            acc += tl.load(pb_ptr + s * C_out + (e - NW), mask=ok & ~is_w, other=0.0)
        n = e // K9
        r = e % K9
        tap = r // C_in
        c = r % C_in
        dst = dw_ptr + n * stride_wn + c * stride_wc + (tap // 3) * stride_wh + (tap % 3) * stride_ww
        tl.store(dst, _to_dtype(acc, dw_ptr.dtype.element_ty), mask=ok & is_w)
        tl.store(db_ptr + (e - NW), _to_dtype(acc, db_ptr.dtype.element_ty), mask=ok & ~is_w)


# ----------------------------------------------------------------------------------------------------
# Launcher. Validates, allocates and launches; no autograd here (the glue in fast_unet/ops/).

import torch  # noqa: E402


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by (dtype kind, variant): "small_hw" where a sample
# has at most 64 output pixels (the 8x8 layers at 64x64: a 128-row tile would be half masked), else
# "wide_k" for C_in >= 32 and "narrow_k" below. Every entry is in the AOT compile report
# (``aot_builds`` below) and was picked from it (4 warps at 128x64 spilled in bf16; float32 spilled on sm_80
# at BLOCK_K 32; 64x64x32 with 4 warps sat at 255 registers in bf16); their speed is a guess until a GPU
# has measured them.
CONFIGS = {
    ("half", "narrow_k"): (128, 64, 16, 8, 3),
    # BLOCK_K 64 at 2 stages: per 1,024 MACs (bf16, sm_90) norm-on-load 6.3 -> 4.6 and concat 2.15 -> 1.44
    # warp instructions against 128x64x32 at 3 stages
    ("half", "wide_k"): (128, 64, 64, 8, 2),
    ("half", "small_hw"): (64, 64, 16, 4, 3),
    # C_out >= 128, for the input modes in WIDE_N_MODES: a 128-wide N tile halves what each MAC costs in
    # the A tile's loads, addresses and normalise-on-load math (warp instructions per 1,024 MACs, bf16,
    # sm_90: norm-on-load 7.8 -> 6.0 at 128 rows, 12.1 -> 6.2 at 64 rows; plain 5.3 -> 3.6; pool
    # 5.0 -> 3.9). 128x128x32 issues fewer still (norm-on-load 4.5) but spills on sm_80 with float32
    # parameters (112 bytes) and, at 2-4 stages, in fp16 plain or pool-on-load on sm_90 (24-72 bytes).
    ("half", "wide_n"): (128, 128, 16, 8, 3),
    ("half", "small_hw_wide_n"): (64, 128, 32, 4, 3),
    # float32 at 2 stages: at 1 stage plain spilled 24 bytes on sm_90 and concat 16 on sm_80 once C_out carries
    # the JIT's multiple-of-16 hint (as it does at the model's channels)
    ("float32", "narrow_k"): (64, 64, 16, 4, 2),
    ("float32", "wide_k"): (64, 64, 16, 4, 2),
    ("float32", "small_hw"): (64, 64, 16, 4, 2),
    # float32 with the max-pool read on load: at 1 stage sm_90 capped it at 128 (4 warps) or 80 (8 warps)
    # registers and spilled 8-16 bytes; 2 stages compile to 168 registers, no spill, on both archs
    ("float32", "pool"): (64, 64, 16, 4, 2),
    # float32 normalising on load: once the weight's strides carry the JIT's multiple-of-16 hint, 4 warps
    # spilled 16 bytes on sm_90 at 2 stages (128 registers) and 8 on sm_80 at 3; 8 warps: 80-106, no spill
    ("float32", "norm"): (64, 64, 16, 8, 2),
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
    if kind == "float32" and (pool or norm):
        return CONFIGS[(kind, "pool" if pool else "norm")]
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


# The backward's (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by (dtype kind, name). Data gradient:
# M = input pixels, N = C_in, K = 9 * C_out; "small_hw" where a sample has at most 64 pixels, "wide" the
# 128-wide N tile for C_in >= 128. Weight gradient: M = C_out, N = C_in, K = pixels; "wide" for C_out and
# C_in >= 128, "wide_m" for C_out >= 128 only. The max-pool routing (data gradient) and max-pool on load
# (weight gradient) take their own "_pool" entries where the others spill with them on sm_80 (24 bytes at
# 128x64x32, 72 at 128x128x32). Per 1,024 MACs on sm_90 (bf16, compile report) the wide tiles issue 2.5
# (dgrad) and 2.5-3.6 (wgrad) warp instructions against 3.5 and 4.8-7.1 at the 64-wide ones. Every entry
# compiles without spills on sm_80 and sm_90 with every input mode it takes (``bwd_modes``); their speed
# is a guess until a GPU has measured them.
BWD_CONFIGS = {
    ("half", "dgrad"): (128, 64, 32, 8, 3),
    ("half", "dgrad_wide"): (128, 128, 32, 8, 3),
    ("half", "dgrad_small_hw"): (64, 64, 32, 8, 3),
    ("half", "dgrad_small_hw_wide"): (64, 128, 32, 4, 2),
    # BLOCK_K 64, 4 warps: 4.5 -> 2.0 warp instructions per 1,024 MACs against 64x64x32 with 8 warps
    ("half", "dgrad_pool"): (64, 64, 64, 4, 3),
    ("float32", "dgrad"): (64, 64, 16, 8, 2),
    # BLOCK_K 64 would issue less (split norm-on-load 6.9 -> 5.9, concat 7.3 -> 4.3 per 1,024 MACs on sm_90)
    # but spills on sm_80 at 2 stages (8-40 bytes, 4 warps) and in concat with 8 warps
    ("half", "wgrad"): (64, 64, 32, 4, 2),
    ("half", "wgrad_wide"): (128, 128, 32, 8, 2),
    ("half", "wgrad_wide_pool"): (128, 128, 16, 8, 2),
    ("half", "wgrad_wide_m"): (128, 64, 32, 8, 2),
    ("float32", "wgrad"): (64, 64, 8, 4, 2),
    # float32 plain: 4 warps spilled 8-16 bytes on sm_90 with a channels_last input (stride 1 specialised),
    # at 1, 2 and 3 stages and at BLOCK_K 16; 8 warps at BLOCK_K 8 compile without spills in every plain build
    ("float32", "wgrad_plain"): (64, 64, 8, 8, 2),
    # TAPS_N: 27 of 32 columns busy for a 3-channel input, against 9 programs per column block with 3 of 64
    # busy; 64x32x64 spilled 8 bytes on sm_80 (23.2 against 21.4 warp instructions per 1,024 MACs on
    # sm_90), float32 at 64x32x8 8 bytes on sm_90
    ("half", "wgrad_taps"): (64, 32, 32, 4, 2),
    ("float32", "wgrad_taps"): (64, 32, 16, 4, 2),
}
BWD_WIDE_MIN_C = 128
# A plain input with fewer channels than this (the model's 3-channel image) takes the weight gradient's
# TAPS_N form: its 9 * C_in (tap, channel) pairs fill one column block.
TAPS_BELOW_C = 8
WGRAD_SUM_BLOCK = 1024
# The weight gradient splits the batch into groups (float32 sums, added by a second launch) where its
# tiles alone would not fill the GPU: fewer than WGRAD_SPLIT_BELOW tiles (one per SM of an H100 / H200).
# The choice depends on the channels only, so a step's launches do not change with the batch size; the
# number of groups aims at WGRAD_TARGET_PROGRAMS programs (two per SM).
WGRAD_SPLIT_BELOW = 132
WGRAD_TARGET_PROGRAMS = 264


def bwd_config_name(dtype, kind_of_pass, hw=0, c_in=0, c_out=0, pool=False, plain=False):
    """(dtype kind, name) of a backward launch's entry in ``BWD_CONFIGS``; ``plain``: the input is read as it is
    (no normalisation, concatenation or max-pool on load)."""
    kind = "float32" if dtype in (torch.float32, "float32") else "half"
    if kind_of_pass == "wgrad_taps":
        return kind, kind_of_pass
    if kind == "float32":
        return kind, "wgrad_plain" if kind_of_pass == "wgrad" and plain else kind_of_pass
    if kind_of_pass == "dgrad":
        if pool:
            return kind, "dgrad_pool"
        name = "dgrad_small_hw" if hw <= 64 else "dgrad"
        return kind, name + ("_wide" if c_in >= BWD_WIDE_MIN_C else "")
    if c_out >= BWD_WIDE_MIN_C:
        return kind, ("wgrad_wide_pool" if pool else "wgrad_wide") if c_in >= BWD_WIDE_MIN_C else "wgrad_wide_m"
    return kind, "wgrad"


def bwd_modes(kind, name):
    """The input modes ``bwd_config_name`` launches with ``BWD_CONFIGS[(kind, name)]``."""
    if name in ("wgrad_taps", "wgrad_plain"):
        return ("plain",)
    if (kind, name) == ("float32", "wgrad"):
        return INPUT_MODES[1:]
    if name.endswith("_pool"):
        return ("pool-on-load",)
    if kind == "half" and (name.startswith("dgrad") or name == "wgrad_wide"):
        return INPUT_MODES[:3]
    return INPUT_MODES


def bwd_config(dtype, kind_of_pass, hw=0, c_in=0, c_out=0, pool=False, plain=False):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of a backward launch: ``kind_of_pass`` "dgrad",
    "wgrad" or "wgrad_taps" (``uses_taps``), x's dtype, the conv's pixels per sample, channels and input mode."""
    return BWD_CONFIGS[bwd_config_name(dtype, kind_of_pass, hw, c_in, c_out, pool, plain)]


def is_plain(x2=None, norm=None, pool=False):
    """Whether a conv reads its input as it is: no concatenation, normalisation or max-pool on load."""
    return x2 is None and norm is None and not pool


def uses_taps(C_in, plain):
    """Whether the weight gradient takes its TAPS_N form: a ``plain`` input of fewer than TAPS_BELOW_C channels."""
    return plain and 0 < C_in < TAPS_BELOW_C


def wgrad_col_blocks(C_in, bn, taps):
    """The weight gradient's column blocks of ``bn``: the 9 x C_in (tap, channel) pairs in the TAPS_N form,
    else each tap's C_in channels."""
    return triton.cdiv(9 * C_in, bn) if taps else 9 * triton.cdiv(C_in, bn)


def wgrad_split(B, HW, C_in, C_out, es, config, in_bytes=None, taps=False):
    """(split, S, samples per group) of the weight gradient. ``split``: whether it writes float32 group sums
    for a second launch (fewer than WGRAD_SPLIT_BELOW tiles); S groups: enough programs to fill the GPU, with
    the groups' float32 sums (written and read back: 8 bytes per element) at most twice the bytes the
    launch reads (dy and the input: ``in_bytes``, by default as many as dy's)."""
    bm, bn = config[:2]
    tiles = triton.cdiv(C_out, bm) * wgrad_col_blocks(C_in, bn, taps)
    if tiles >= WGRAD_SPLIT_BELOW:
        return False, 1, max(B, 1)
    dy_bytes = B * HW * C_out * es
    read = dy_bytes + (dy_bytes if in_bytes is None else in_bytes)
    e = C_out * 9 * C_in + C_out
    s = max(1, min(B, triton.cdiv(WGRAD_TARGET_PROGRAMS, tiles), 2 * read // (8 * e)))
    samples = triton.cdiv(B, s)
    return True, triton.cdiv(B, samples), samples


def interpreter_tiles():
    """{module attribute: value}: tile tables with one large tile per small sample, and a large block for the
    weight gradient's group sums, for runs under Triton's interpreter that check the wiring (tests/interpret,
    ``scripts/gpu_check.py --dry``): there each loop iteration of each program costs a few milliseconds.
    Every real config is in ``CONFIGS`` and ``BWD_CONFIGS``, tested in tests/ops/test_conv.py."""
    def px(hw):
        return max(16, min(128, triton.next_power_of_2(hw)))

    return {"config": lambda dtype, c_in, hw, *input_mode: (px(hw), 256, 128, 4, 1),
            "bwd_config": lambda dtype, kind_of_pass, hw=0, c_in=0, c_out=0, pool=False, plain=False:
            (px(hw), 256, 128, 4, 1) if kind_of_pass == "dgrad" else (256, 256, px(hw), 4, 1),
            "WGRAD_SUM_BLOCK": 1 << 16}


def conv3x3_bwd(dy, x, weight, bias_dtype, x2=None, norm=None, pool=False, input_grad=True):
    """The gradients of ``conv3x3_stats(x, weight, bias, x2, norm, pool)`` for dy (B, C_out, H, W):
    (dx, dx2, d weight, d bias, d gn_weight, d gn_bias), each None where it does not apply (dx2 without
    x2, the GroupNorm's without norm; dx and dx2 without ``input_grad``). d weight in weight's dtype, d bias
    in ``bias_dtype``, the others in their tensor's dtype; dx like x (its strides where x is dense),
    dx2 channels_last. Launches: the weight gradient, then the data gradient, which also adds the weight
    gradient's group sums where it split the batch (a launch of their own without ``input_grad``), then
    after a normalised input the GroupNorm backward's apply pass."""
    check_conv(x, weight, torch.empty(weight.shape[0], device=x.device, dtype=bias_dtype), x2, norm, pool)
    B, C1, H, W = x.shape
    if pool:
        H, W = H // 2, W // 2
    C_out, C_in = weight.shape[:2]
    if dy.shape != (B, C_out, H, W):
        raise ValueError(f"dy must have the conv output's shape {(B, C_out, H, W)}, got {tuple(dy.shape)}")
    dy = dy.to(x.dtype).contiguous(memory_format=torch.channels_last)
    if x2 is not None:
        x2 = x2.contiguous(memory_format=torch.channels_last)
    dev = x.device
    HW = H * W
    ieee = conv_ieee(x.dtype)
    if norm is not None:
        pin, gw, gb, eps = norm
        gw, gb = _gn.dense(gw, gb)
    else:
        pin = torch.empty((1, 1, 3), device=dev, dtype=torch.float32)
        gw = gb = torch.empty((1,), device=dev, dtype=torch.float32)  # unread placeholders
        eps = 0.0
    dw = torch.empty_like(weight)
    db = torch.empty((C_out,), device=dev, dtype=bias_dtype)
    dx = dx2 = dgw = dgb = None
    if B * HW * C_out == 0 or C_in == 0:
        dw.zero_()
        db.zero_()
        if input_grad:
            dx = torch.zeros_like(x)
            dx2 = torch.zeros_like(x2) if x2 is not None else None
        if norm is not None:
            dgw, dgb = torch.zeros_like(gw), torch.zeros_like(gb)
        return dx, dx2, dw, db, dgw, dgb
    xs = x.stride()
    wstr = weight.stride()
    # the weight gradient first: where it splits the batch, the data gradient's first row of programs adds
    # its groups' sums (a sum launch of its own only without a data gradient)
    plain = is_plain(x2, norm, pool)
    taps = uses_taps(C_in, plain)
    bm, bn, bk, warps, stages = bwd_config(x.dtype, "wgrad_taps" if taps else "wgrad", HW, C_in, C_out, pool, plain)
    in_bytes = (x.numel() + (x2.numel() if x2 is not None else 0)) * x.element_size()
    split, S, samples = wgrad_split(B, HW, C_in, C_out, x.element_size(), (bm, bn), in_bytes, taps)
    tiles = triton.cdiv(C_out, bm) * (1 + wgrad_col_blocks(C_in, bn, taps))  # d bias programs first
    out, outb = dw, db
    if split:
        out = torch.empty((S, C_out * 9 * C_in), device=dev, dtype=torch.float32)
        outb = torch.empty((S, C_out), device=dev, dtype=torch.float32)
    x2s = x2.stride() if x2 is not None else (0, 0, 0, 0)
    _conv3x3_wgrad_kernel[(tiles, S)](
        x, x2 if x2 is not None else x, dy, pin, gw, gb, out, outb,
        B, H, W, C1, C_in, C_out, pin.shape[1] if norm is not None else 0, float(eps), samples,
        xs[0], xs[2], xs[3], xs[1], x2s[0], x2s[2], x2s[3], *wstr,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=ieee, NORM_IN=norm is not None, HAS_X2=x2 is not None,
        BLOCK_P=NORM_BLOCK_P, POOL_IN=bool(pool), SPLIT=split, TAPS_N=taps, num_warps=warps, num_stages=stages)
    n_sum = C_out * 9 * C_in + C_out
    if split and not input_grad:
        _conv3x3_wgrad_sum_kernel[(triton.cdiv(n_sum, WGRAD_SUM_BLOCK),)](
            out, outb, dw, db, S, C_in, C_out, *wstr, BLOCK=WGRAD_SUM_BLOCK, num_warps=4)
    if input_grad:
        bm, bn, bk, warps, stages = bwd_config(x.dtype, "dgrad", HW, C_in, C_out, pool)
        grid = (int(split) + triton.cdiv(HW, bm), triton.cdiv(C_in, bn), B)
        dx = torch.empty_like(x)  # NORM_IN: dz first
        dx2 = torch.empty_like(x2) if x2 is not None else None
        mean = rstd = part = sp = pin  # unused placeholders (float32, not written) without norm
        if norm is not None:
            mean = torch.empty((B,), device=dev, dtype=torch.float32)
            rstd = torch.empty_like(mean)
            part = torch.empty((3, B, grid[0] - int(split), C_in), device=dev, dtype=torch.float32)
            sp = torch.empty((B, (grid[0] - int(split)) * grid[1], 2), device=dev, dtype=torch.float32)
        d2 = dx2 if dx2 is not None else x  # unread without x2 (HAS_X2 off)
        d2s = dx2.stride() if dx2 is not None else (0, 0, 0, 0)
        per_prog = triton.cdiv(triton.cdiv(n_sum, grid[1] * B), WGRAD_SUM_BLOCK) * WGRAD_SUM_BLOCK
        sums = (out, outb, dw, db) if split else (pin, pin, x, x)  # unread, unwritten placeholders without SUM
        _conv3x3_dgrad_kernel[grid](
            dy, weight, dx, d2, x, pin, gw, gb, mean, rstd, part, sp, *sums,
            H, W, C1, C_in, C_out, pin.shape[1] if norm is not None else 0, float(eps), S, per_prog,
            *wstr, dx.stride(0), dx.stride(2), dx.stride(3), dx.stride(1), d2s[0], d2s[2], d2s[3],
            xs[0], xs[2], xs[3], xs[1],
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=ieee, NORM_IN=norm is not None, HAS_X2=x2 is not None,
            BLOCK_P=NORM_BLOCK_P, POOL_IN=bool(pool), SUM=int(split), BLOCK_S=WGRAD_SUM_BLOCK, num_warps=warps,
            num_stages=stages)
        if norm is not None:
            dx, dgw, dgb = _gn.group_norm_relu_bwd_apply(dx, x, norm[1], norm[2], mean, rstd, part, sp)
    return dx, dx2, dw, db, dgw, dgb


# ----------------------------------------------------------------------------------------------------
# Declarations: the pointer arguments each kernel writes (bench.kernels splits a launch's bytes into read
# and written with them), and the builds of the ahead-of-time compile report (fast_unet/aot.py).

WRITES = {
    "_conv3x3_kernel": {"y_ptr", "part_ptr"},
    "_conv3x3_dgrad_kernel": {"dx_ptr", "dx2_ptr", "mean_ptr", "rstd_ptr", "part_ptr", "sp_ptr", "dw_ptr", "db_ptr"},
    "_conv3x3_wgrad_kernel": {"out_ptr", "db_ptr"},
    "_conv3x3_wgrad_sum_kernel": {"dw_ptr", "db_ptr"},
}

# Signature hints: float32 pointers (other pointers take the build's dtype), float scalars (other
# scalars are i32), and integers that are multiples of 16 at the model's shapes (x's strides are those
# of channels_last activations with C_in >= 64; the channels_last weight's strides are 9, 3 and 1 x C_in),
# which the JIT marks so on a GPU. The plain mode's builds come twice (``_alignments``): as marked, and
# without C1, C_in and the weight strides (``PLAIN_UNALIGNED``) for the model's first conv, on the
# 3-channel image.
AOT_FP32_POINTERS = {"part_ptr", "pin_ptr", "mean_ptr", "rstd_ptr", "sp_ptr", "p_ptr", "pb_ptr"}
# (C,) parameter pointers (and their gradients'): float32 or the build's dtype; the builds take both
# (``_common.with_fp32_params``: float32 is autocast's case).
AOT_PARAM_POINTERS = {"bias_ptr", "gw_ptr", "gb_ptr", "db_ptr"}
AOT_FLOAT_ARGS = {"eps"}
AOT_ALIGNED_INTS = {"C1", "C_in", "C_out", "stride_xb", "stride_xh", "stride_xw", "stride_x2b", "stride_x2h",
                    "stride_x2w", "stride_db", "stride_dh", "stride_dw", "stride_d2b", "stride_d2h", "stride_d2w",
                    "SUM_PER_PROG", "stride_wn", "stride_wh", "stride_ww"}
WEIGHT_STRIDES = ("stride_wn", "stride_wh", "stride_ww")
PLAIN_UNALIGNED = ("C1", "C_in") + WEIGHT_STRIDES
# Ints that are 1 at inputs the launchers take (a 1-pixel side, one input channel, one partial): the JIT specialises them to constants.
AOT_ONE_INTS = {"H", "W", "C1", "C_in", "P_in", "B", "S", "SAMPLES", "S_w"}
# The work of one iteration of each kernel's inner loop, for the compile report's per-1,024 figures
# (fast_unet/aot.py loop_tile): the K loop's BLOCK_M x BLOCK_N x BLOCK_K multiply-adds.
AOT_LOOP_TILES = {"_conv3x3_kernel": (("BLOCK_M", "BLOCK_N", "BLOCK_K"), "MACs"),
                  "_conv3x3_dgrad_kernel": (("BLOCK_M", "BLOCK_N", "BLOCK_K"), "MACs"),
                  "_conv3x3_wgrad_kernel": (("BLOCK_M", "BLOCK_N", "BLOCK_K"), "MACs"),
                  "_conv3x3_wgrad_sum_kernel": (("BLOCK",), "elements")}
# The constexprs that select another body (the input modes): CI's compile set keeps a build of each
# (fast_unet/aot.py, ci_builds).
AOT_CI_FLAGS = ("NORM_IN", "HAS_X2", "POOL_IN", "TAPS_N")


INPUT_MODES = ("plain", "norm-on-load", "concat", "pool-on-load")


def config_modes(kind, name):
    """The input modes ``config`` launches with ``CONFIGS[(kind, name)]``."""
    if name in WIDE_N_MODES:
        return WIDE_N_MODES[name]
    if kind == "float32":  # float32 pool- and norm-on-load have their own configs, the others share one
        return {"pool": ("pool-on-load",), "norm": ("norm-on-load",)}.get(name, ("plain", "concat"))
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
    out += _bwd_builds()
    return [v for b in with_ones(with_fp32_params(out, AOT_PARAM_POINTERS), AOT_ONE_INTS) for v in _alignments(b)]


def _alignments(build):
    """The builds the JIT compiles for ``build``'s launches, by which ``AOT_ALIGNED_INTS`` they pass as
    multiples of 16 (the option ``unaligned_ints`` names the others). The plain mode (the builds without
    ``stride_xc == 1``) is launched three ways: on an NCHW input with C_in a multiple of 16 as built; on a
    channels_last one (a materialised activation, such as the first Down block's pooled input), where the
    JIT specialises ``stride_xc == 1``, in a twin labelled "channels_last"; and on the model's 3-channel
    image, ``PLAIN_UNALIGNED``, in a twin labelled "unaligned". The weight gradient's TAPS_N builds (fewer
    than 16 channels) come unaligned only, on an NCHW image (``stride_xw == 1``) and on a channels_last one.
    At C_in = 1 the weight's strides (9, 3 and 1) are unaligned."""
    label, fn, config, dtype, ce, opts = build

    def variant(names, suffix="", **ones):
        return (label, fn, config + suffix, dtype, dict(ce, **ones),
                dict(opts, unaligned_ints=tuple(sorted(names))) if names else opts)

    weight = set(WEIGHT_STRIDES) if ce.get("C_in") == 1 else set()
    if label not in ("conv3x3_gn", "conv3x3_dgrad", "conv3x3_wgrad") or "stride_xc" in ce:
        return [variant(weight)]
    unaligned = weight | set(PLAIN_UNALIGNED)
    if ce.get("TAPS_N"):  # fewer than 16 channels: an NCHW image (stride_xw == 1) or a channels_last one
        return [variant(unaligned, " unaligned nchw", stride_xw=1),
                variant(unaligned, " unaligned channels_last", stride_xc=1)]
    twin = variant(unaligned, " unaligned")
    if 1 in (ce.get("C_in"), ce.get("C1")):  # plain: C1 = C_in
        return [twin]
    return [variant(weight), variant(weight, " channels_last", stride_xc=1), twin]


_BWD_MODES = (("plain", False, False, False), ("norm-on-load", True, False, False), ("concat", False, True, False),
              ("pool-on-load", False, False, True))


def _bwd_builds():
    """The backward's builds: the data gradient (with and without the weight gradient's group sums) and the
    weight gradient (each split and direct) in each
    config of ``BWD_CONFIGS`` with each input mode it is launched with (``bwd_config_name``), the group sum
    at its block. The channels_last
    activations' and weight's channel strides are 1, as the JIT specialises them (the plain mode also takes
    an NCHW x: its strides stay arguments)."""
    out = []
    for dt in DTYPE_NAMES:
        kind = "float32" if dt == "float32" else "half"
        launched = sorted({(name.split("_")[0], name == "wgrad_taps", c, m)
                           for (k, name), c in BWD_CONFIGS.items() if k == kind
                           for m in _BWD_MODES if m[0] in bwd_modes(k, name)})
        for (name, taps, (bm, bn, bk, warps, stages), (mode, norm, concat, pool)), (ieee, tag) in itertools.product(
                launched, precisions(dt)):
            ce = dict(stride_wc=1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=ieee, NORM_IN=norm, HAS_X2=concat,
                      BLOCK_P=NORM_BLOCK_P, POOL_IN=pool)
            if mode != "plain":
                ce["stride_xc"] = 1
            opts = dict(num_warps=warps, num_stages=stages)
            label = f"{dt} {mode} {bm}x{bn}x{bk} w{warps} s{stages}{tag}"
            if name == "dgrad":
                dce = dict(ce, stride_dc=1, BLOCK_S=WGRAD_SUM_BLOCK) if mode != "plain" else dict(ce, BLOCK_S=WGRAD_SUM_BLOCK)
                out.append(("conv3x3_dgrad", _conv3x3_dgrad_kernel, label, dt, dict(dce, SUM=0), opts))
                out.append(("conv3x3_dgrad", _conv3x3_dgrad_kernel, label + " sum", dt, dict(dce, SUM=1), opts))
            else:
                label += " taps" if taps else ""
                ce["TAPS_N"] = taps
                out.append(("conv3x3_wgrad", _conv3x3_wgrad_kernel, label, dt, dict(ce, SPLIT=False), opts))
                out.append(("conv3x3_wgrad", _conv3x3_wgrad_kernel, label + " split", dt, dict(ce, SPLIT=True),
                            dict(opts, arg_types={"out_ptr": "*fp32", "db_ptr": "*fp32"})))
        out.append(("conv3x3_wgrad_sum", _conv3x3_wgrad_sum_kernel, f"{dt} block {WGRAD_SUM_BLOCK} w4", dt,
                    dict(BLOCK=WGRAD_SUM_BLOCK), dict(num_warps=4)))
    return out
