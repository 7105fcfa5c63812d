"""GroupNorm(1, C) + ReLU + time-embedding broadcast-add, forward and backward (Triton).

    y[b, c, h, w] = relu((x[b, c, h, w] - mean[b]) * rstd[b] * weight[c] + bias[c]) + emb[b, c]

Layouts: x, y, dy, dx are (B, C, H, W) and either NCHW-contiguous or channels_last (NHWC in memory);
every kernel sees one sample as a (C, HW) tile grid and takes ``CHANNELS_LAST`` (constexpr) to address
it: NCHW ``c * HW + hw``, channels_last ``hw * C + c``. weight, bias: (C,); emb: (B, C) with any
strides (the model passes column slices of one (B, sum C) tensor). weight and bias are float32 or x's dtype
(read in float32; their gradients come in their dtype). Statistics are float32.

Forward, three launches:
1. ``_gn_stats_kernel``, grid (B * S, cdiv(C, BLOCK_C)): each program folds its (BLOCK_C x HW/S) part
   of one sample into a partial (count, mean, M2) (Welford/Chan, float32) and stores it in
   ``partials`` (B, P, 3), P = cdiv(C, BLOCK_C) * S. Any producer that writes that layout (for example
   a conv epilogue writing one partial per output tile) can replace this kernel.
2. ``_gn_combine_kernel``, grid (B,): Chan's parallel formula over the P partials -> mean, rstd (B,).
3. ``_gn_apply_kernel``, grid (B * cdiv(HW, BLOCK_HW), cdiv(C, BLOCK_C)): normalise, affine, ReLU, + emb.
(The big dimensions are on grid axis 0, whose limit is 2^31 - 1: axes 1 and 2 stop at 65535.)

Backward, two launches (recomputing x_hat and the ReLU mask from the saved mean/rstd):
1. ``_gn_bwd_reduce_kernel``, same grid as the stats: per (b, split, c) partial sums of dy (-> d emb),
   dz * x_hat (-> d weight) and dz (-> d bias), where dz = dy where not y <= 0 (threshold_backward: NaN
   passes), y = relu(z) as the forward stored it, z recomputed with the forward's formula (``_pre_relu``);
   and per program the two scalars dx needs, sum_c w * dz and sum_c w * dz * x_hat over its range.
2. ``_gn_bwd_dx_kernel``, apply's grid plus one program per channel block: the tiles fold their sample's
   scalar partials into s1 = sum(w * dz) and s2 = sum(w * dz * x_hat) (as the forward's apply folds the
   statistics' partials), then dx = rstd * (w * dz - (s1 + x_hat * s2) / (C * HW)); the programs of the
   first HW block also sum the splits' d emb partials for their (b, channel block); the extra program of
   each channel block (scheduled first) sums every (b, split) row of the d weight and d bias partials.
Both tiled kernels take an optional second upstream gradient ``dy2`` (another consumer's gradient of the
same output), added as it is loaded. No atomics: deterministic.
"""
import triton
import triton.language as tl

from ._common import DTYPE_NAMES, DTYPES, check_param, with_fp32_params, with_ones
from ._common import maximum as _maximum
from ._common import relu as _relu


@triton.jit
def _tile_offsets(c, hw, C, HW, CHANNELS_LAST: tl.constexpr):
    """Element offsets of a [BLOCK_C, BLOCK_HW] tile inside one sample."""
    if CHANNELS_LAST:
        return hw[None, :] * C + c[:, None]
    else:
        return c[:, None] * HW + hw[None, :]


@triton.jit
def _gn_stats_kernel(
    x_ptr,  # (B, C, H, W), NCHW or channels_last
    part_ptr,  # (B, P, 3) float32: count, mean, M2 per program
    C, HW, HW_PER_PROG,  # HW_PER_PROG: a multiple of BLOCK_HW; S = cdiv(HW, HW_PER_PROG)
    CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n_sp = tl.cdiv(HW, HW_PER_PROG)
    b = tl.program_id(0) // n_sp  # grid (B * S, n_cb): the big dimensions on axis 0 (dims 1, 2 stop at 65535)
    sp = tl.program_id(0) % n_sp
    cb = tl.program_id(1)
    n_cb = tl.num_programs(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    x_base = x_ptr + b.to(tl.int64) * C * HW
    count = 0.0
    mean = 0.0
    m2 = 0.0
    hw_start = sp * HW_PER_PROG
    for i in range(0, HW_PER_PROG, BLOCK_HW):
        hw = hw_start + i + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        xv = tl.load(x_base + _tile_offsets(c, hw, C, HW, CHANNELS_LAST), mask=mask, other=0.0).to(tl.float32)
        n_b = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
        mean_b = tl.sum(tl.sum(xv, axis=1), axis=0) / tl.maximum(n_b, 1.0)
        d = tl.where(mask, xv - mean_b, 0.0)
        m2_b = tl.sum(tl.sum(d * d, axis=1), axis=0)
        # Chan: fold (n_b, mean_b, m2_b) into (count, mean, m2). The first tile is never empty.
        n_new = count + n_b
        delta = mean_b - mean
        frac = n_b / tl.maximum(n_new, 1.0)
        mean = mean + delta * frac
        m2 = m2 + m2_b + delta * delta * count * frac
        count = n_new
    out = part_ptr + ((b * n_cb + cb) * n_sp + sp) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def partials_stats(part_ptr, b, P, eps, BLOCK_P: tl.constexpr):
    """(mean, rstd) of sample ``b`` from its P (count, mean, M2) float32 partials at part_ptr (B, P, 3).

    Chan's parallel combination in two passes over the partials (the mean first, then the M2 terms
    around it), so nothing cancels. Any kernel that consumes a lazily normalised tensor calls this in
    its prologue instead of a separate combine launch: P is small (tiles per sample), so it is cheap."""
    base = part_ptr + b.to(tl.int64) * P * 3
    total = tl.zeros([BLOCK_P], dtype=tl.float32)
    weighted = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = p < P
        n_i = tl.load(base + p * 3, mask=m, other=0.0)
        mu_i = tl.load(base + p * 3 + 1, mask=m, other=0.0)
        total += n_i
        weighted += n_i * mu_i
    n = tl.sum(total, axis=0)
    mean = tl.sum(weighted, axis=0) / n
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        m = p < P
        n_i = tl.load(base + p * 3, mask=m, other=0.0)
        mu_i = tl.load(base + p * 3 + 1, mask=m, other=0.0)
        m2_i = tl.load(base + p * 3 + 2, mask=m, other=0.0)
        d = mu_i - mean
        acc += m2_i + n_i * d * d
    var = _maximum(tl.sum(acc, axis=0) / n, 0.0)  # NaN stays NaN
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _gn_combine_kernel(
    part_ptr,  # (B, P, 3) float32
    mean_ptr, rstd_ptr,  # (B,) float32
    P, eps,
    BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0)
    mean, rstd = partials_stats(part_ptr, b, P, eps, BLOCK_P)
    tl.store(mean_ptr + b, mean)
    tl.store(rstd_ptr + b, rstd)


@triton.jit
def _scale_shift(w_ptr, bias_ptr, c, c_mask, mean, rstd):
    """Per-channel (scale, shift) = (w * rstd, bias - mean * scale), float32, as PyTorch's GroupNorm kernel
    forms them: the pre-ReLU value is ``_pre_relu(x, scale, shift)``."""
    w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    bb = tl.load(bias_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
    scale = w * rstd
    return scale, bb - mean * scale


@triton.jit
def _pre_relu(xv, scale, shift):
    """z = x * scale + shift for a [BLOCK_C, BLOCK_HW] tile: the one formula (and order of operations) of
    the forward's normalisation, which the backward recomputes for its ReLU mask."""
    return xv * scale[:, None] + shift[:, None]


@triton.jit
def _relu_mask_grad(xv, dy, scale, shift, y_dtype: tl.constexpr):
    """dz = threshold_backward(dy, y, 0) (dy where not y <= 0: NaN passes, as in PyTorch) with y = relu(z)
    in y's dtype (what an unfused ReLU stores), z recomputed exactly as the forward computed it."""
    y = _relu(_pre_relu(xv, scale, shift)).to(y_dtype)
    return tl.where(y <= 0.0, 0.0, dy)


@triton.jit
def _tile_ids(HW, BLOCK_HW: tl.constexpr):
    """(b, hw block, c block) of a tiled program: grid (B * cdiv(HW, BLOCK_HW), cdiv(C, BLOCK_C)), the big
    dimensions on axis 0 (grid dims 1 and 2 stop at 65535)."""
    n_hw = tl.cdiv(HW, BLOCK_HW)
    return tl.program_id(0) // n_hw, tl.program_id(0) % n_hw, tl.program_id(1)


@triton.jit
def _apply_tile(x_ptr, y_ptr, w_ptr, bias_ptr, emb_ptr, mean, rstd, b, hwb, cb, C, HW, stride_eb, stride_ec,
                HAS_EMB: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Normalise, affine, ReLU, + emb for the (BLOCK_C x BLOCK_HW) tile (cb, hwb) of sample b."""
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    hw = hwb * BLOCK_HW + tl.arange(0, BLOCK_HW)
    c_mask = c < C
    mask = c_mask[:, None] & (hw < HW)[None, :]
    scale, shift = _scale_shift(w_ptr, bias_ptr, c, c_mask, mean, rstd)
    offs = b.to(tl.int64) * C * HW + _tile_offsets(c, hw, C, HW, CHANNELS_LAST)
    xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = _relu(_pre_relu(xv, scale, shift))
    if HAS_EMB:
        e = tl.load(emb_ptr + b.to(tl.int64) * stride_eb + c * stride_ec, mask=c_mask, other=0.0).to(tl.float32)
        y = y + e[:, None]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gn_apply_kernel(
    x_ptr, y_ptr,  # (B, C, H, W), same layout
    w_ptr, bias_ptr,  # (C,)
    emb_ptr,  # (B, C) with strides (stride_eb, stride_ec); unused when not HAS_EMB
    mean_ptr, rstd_ptr,  # (B,) float32
    C, HW, stride_eb, stride_ec,
    HAS_EMB: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    b, hwb, cb = _tile_ids(HW, BLOCK_HW)
    _apply_tile(x_ptr, y_ptr, w_ptr, bias_ptr, emb_ptr, tl.load(mean_ptr + b), tl.load(rstd_ptr + b), b, hwb, cb,
                C, HW, stride_eb, stride_ec, HAS_EMB, CHANNELS_LAST, BLOCK_C, BLOCK_HW)


@triton.jit(do_not_specialize=["P"])  # P = 1 (one partial) made a constant: 8 bytes of stack on sm_90
def _gn_apply_partials_kernel(
    x_ptr, y_ptr,  # (B, C, H, W), same layout
    w_ptr, bias_ptr,  # (C,)
    emb_ptr,  # (B, C) with strides (stride_eb, stride_ec); unused when not HAS_EMB
    pin_ptr,  # (B, P, 3) float32 partials of x's statistics (a conv epilogue's)
    mean_ptr, rstd_ptr,  # (B,) float32, written (by each sample's first program)
    C, HW, P, eps, stride_eb, stride_ec,
    HAS_EMB: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """The apply pass with the combine folded into its prologue: each program folds its sample's partials
    (``partials_stats``), and the sample's first program stores mean and rstd for a backward."""
    b, hwb, cb = _tile_ids(HW, BLOCK_HW)
    mean, rstd = partials_stats(pin_ptr, b, P, eps, BLOCK_P)
    if (cb == 0) & (hwb == 0):
        tl.store(mean_ptr + b, mean)
        tl.store(rstd_ptr + b, rstd)
    _apply_tile(x_ptr, y_ptr, w_ptr, bias_ptr, emb_ptr, mean, rstd, b, hwb, cb, C, HW, stride_eb, stride_ec,
                HAS_EMB, CHANNELS_LAST, BLOCK_C, BLOCK_HW)


@triton.jit
def _grad_tile(dy_ptr, dy2_ptr, offs, mask, HAS_DY2: tl.constexpr):
    """The upstream gradient of a tile in float32: dy, or dy + dy2 (a second consumer's gradient of the same
    output, summed as it is loaded instead of by a separate add)."""
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DY2:
        dy += tl.load(dy2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return dy


@triton.jit
def _gn_bwd_reduce_kernel(
    x_ptr, dy_ptr, dy2_ptr,  # (B, C, H, W), same layout (dy2 unread without HAS_DY2)
    w_ptr, bias_ptr, mean_ptr, rstd_ptr,
    part_ptr,  # (3, B, S, C) float32: sum dy, sum dz * x_hat, sum dz over this program's HW range
    sp_ptr,  # (B, S * n_cb, 2) float32: this program's sum_c w * (sum dz) and sum_c w * (sum dz * x_hat)
    B, C, HW, HW_PER_PROG,
    HAS_DY2: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    n_sp = tl.cdiv(HW, HW_PER_PROG)
    b = tl.program_id(0) // n_sp  # grid (B * S, n_cb), as the stats kernel's
    sp = tl.program_id(0) % n_sp
    cb = tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    mean = tl.load(mean_ptr + b)
    rstd = tl.load(rstd_ptr + b)
    scale, shift = _scale_shift(w_ptr, bias_ptr, c, c_mask, mean, rstd)
    base = b.to(tl.int64) * C * HW
    s_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
    s_dzx = tl.zeros([BLOCK_C], dtype=tl.float32)
    s_dz = tl.zeros([BLOCK_C], dtype=tl.float32)
    hw_start = sp * HW_PER_PROG
    for i in range(0, HW_PER_PROG, BLOCK_HW):
        hw = hw_start + i + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        offs = base + _tile_offsets(c, hw, C, HW, CHANNELS_LAST)
        xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = _grad_tile(dy_ptr, dy2_ptr, offs, mask, HAS_DY2)
        x_hat = (xv - mean) * rstd
        dz = _relu_mask_grad(xv, dy, scale, shift, x_ptr.dtype.element_ty)
        s_dy += tl.sum(dy, axis=1)
        s_dzx += tl.sum(dz * x_hat, axis=1)
        s_dz += tl.sum(dz, axis=1)
    plane = B * n_sp * C
    out = part_ptr + (b * n_sp + sp) * C + c
    tl.store(out, s_dy, mask=c_mask)
    tl.store(out + plane, s_dzx, mask=c_mask)
    tl.store(out + 2 * plane, s_dz, mask=c_mask)
    q = sp_ptr + ((b * n_sp + sp) * tl.num_programs(1) + cb) * 2  # scale / rstd = w: no second load of w
    tl.store(q, tl.sum(scale * s_dz, axis=0) / rstd)
    tl.store(q + 1, tl.sum(scale * s_dzx, axis=0) / rstd)


@triton.jit
def _param_sums(part_ptr, dw_ptr, db_ptr, c, c_mask, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """d weight and d bias of the channels c: the (B * S) rows of per-split partial sums (planes 1 and 2 of
    ``part``) summed in float32, BLOCK_R rows at a time, stored in the weight's dtype."""
    rr = tl.arange(0, BLOCK_R)
    plane = R * C
    dw = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + rr
        m = (r < R)[:, None] & c_mask[None, :]
        src = part_ptr + plane + r[:, None] * C + c[None, :]
        dw += tl.load(src, mask=m, other=0.0)
        db += tl.load(src + plane, mask=m, other=0.0)
    tl.store(dw_ptr + c, tl.sum(dw, axis=0).to(dw_ptr.dtype.element_ty), mask=c_mask)
    tl.store(db_ptr + c, tl.sum(db, axis=0).to(db_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _gn_bwd_dx_kernel(
    x_ptr, dy_ptr, dy2_ptr, dx_ptr,  # (B, C, H, W), same layout (dy2 unread without HAS_DY2)
    w_ptr, bias_ptr, mean_ptr, rstd_ptr,
    sp_ptr,  # (B, P, 2) float32 from _gn_bwd_reduce_kernel, P = S * n_cb
    part_ptr,  # (3, B, S, C) float32 from _gn_bwd_reduce_kernel
    demb_ptr,  # (B, C) in x's dtype: d emb
    dw_ptr, db_ptr,  # (C,) in the weight's dtype: d weight, d bias
    B, C, HW, S, P,
    HAS_DY2: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """Grid (1 + B * cdiv(HW, BLOCK_HW), cdiv(C, BLOCK_C)): the first program of each channel block sums
    the batch's partials into d weight and d bias (first, so it overlaps the tiles); the others are the
    apply grid's tiles, shifted by one."""
    cb = tl.program_id(1)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    if tl.program_id(0) == 0:
        _param_sums(part_ptr, dw_ptr, db_ptr, c, c_mask, B * S, C, BLOCK_HW, BLOCK_C)
    else:
        n_hw = tl.cdiv(HW, BLOCK_HW)
        b = (tl.program_id(0) - 1) // n_hw
        hwb = (tl.program_id(0) - 1) % n_hw
        hw = hwb * BLOCK_HW + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        # s1 = sum(w * dz), s2 = sum(w * dz * x_hat) over the sample: its P scalar partials, folded here
        q = sp_ptr + b.to(tl.int64) * P * 2
        a1 = tl.zeros([BLOCK_P], dtype=tl.float32)
        a2 = tl.zeros([BLOCK_P], dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            pm = p < P
            a1 += tl.load(q + p * 2, mask=pm, other=0.0)
            a2 += tl.load(q + p * 2 + 1, mask=pm, other=0.0)
        inv_m = 1.0 / (C * HW * 1.0)  # float32; not (C * HW).to(): C and HW are constants when both are 1
        s1 = tl.sum(a1, axis=0) * inv_m
        s2 = tl.sum(a2, axis=0) * inv_m
        mean = tl.load(mean_ptr + b)
        rstd = tl.load(rstd_ptr + b)
        w = tl.load(w_ptr + c, mask=c_mask, other=0.0).to(tl.float32)
        scale, shift = _scale_shift(w_ptr, bias_ptr, c, c_mask, mean, rstd)
        offs = b.to(tl.int64) * C * HW + _tile_offsets(c, hw, C, HW, CHANNELS_LAST)
        xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = _grad_tile(dy_ptr, dy2_ptr, offs, mask, HAS_DY2)
        x_hat = (xv - mean) * rstd
        dz = _relu_mask_grad(xv, dy, scale, shift, x_ptr.dtype.element_ty)
        dx = rstd * (dz * w[:, None] - (s1 + x_hat * s2))
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if hwb == 0:  # one program per (sample, channel block) sums the S splits' d emb partials
            s_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
            for sp in range(0, S):
                s_dy += tl.load(part_ptr + (b * S + sp) * C + c, mask=c_mask, other=0.0)
            tl.store(demb_ptr + b * C + c, s_dy.to(demb_ptr.dtype.element_ty), mask=c_mask)


# ----------------------------------------------------------------------------------------------------
# Launchers. They validate, allocate and launch; they hold no autograd logic (the glue in fast_unet/ops/).

import torch  # noqa: E402

TILE = 2048  # elements per [BLOCK_C, BLOCK_HW] tile
TILES_PER_PROGRAM = 8  # stats / backward-reduce programs each fold about this many tiles
NUM_WARPS = 4
BWD_BLOCK_P = 16  # the backward's dx programs fold their sample's S * n_cb scalar partials this many at a time


def tile_config(C, HW, channels_last):
    """(BLOCK_C, BLOCK_HW) for a sample of C x HW. The contiguous axis gets the wide side.

    The launcher only ever picks from ``TILE_CONFIGS`` (the AOT report compiles each of them)."""
    if channels_last:
        block_c = 64 if C <= 64 else 128
        return block_c, TILE // block_c
    block_hw = 64 if HW <= 64 else 256
    return TILE // block_hw, block_hw


TILE_CONFIGS = {False: [(32, 64), (8, 256)], True: [(64, 32), (128, 16)]}  # channels_last -> tiles


def _split(HW, block_hw, n_cblocks):
    """(S, HW_PER_PROG): split each sample's HW range so a program folds ~TILES_PER_PROGRAM tiles."""
    tiles = triton.cdiv(HW, block_hw)
    per_prog = max(1, min(tiles, TILES_PER_PROGRAM))
    hw_per_prog = per_prog * block_hw
    return triton.cdiv(HW, hw_per_prog), hw_per_prog


def layout_of(x):
    """True for channels_last, False for NCHW-contiguous; ValueError for anything else."""
    if x.is_contiguous():
        return False
    if x.is_contiguous(memory_format=torch.channels_last):
        return True
    raise ValueError(f"x must be NCHW-contiguous or channels_last, got strides {tuple(x.stride())}")


def dense(*params):
    """The (C,) parameters as the kernels read them, ``ptr + c``: contiguous (a copy only for a strided view,
    such as ``w[::2]``; the shapes alone are checked)."""
    return tuple(p.contiguous() for p in params)


def check_group_norm(x, weight, bias, emb):
    """Validate x (B, C, H, W), weight and bias (C,) (float32 or x's dtype), emb (B, C) or None; errors name
    the argument.
    Returns x's layout (``layout_of``)."""
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    B, C = x.shape[:2]
    for name, p in (("weight", weight), ("bias", bias)):
        if p.shape != (C,):
            raise ValueError(f"{name} must have shape ({C},) to match x's channels, got {tuple(p.shape)}")
        check_param(name, p, x, "x")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
    if emb is not None:
        if emb.shape != (B, C):
            raise ValueError(f"emb must have shape ({B}, {C}) (batch, channels of x), got {tuple(emb.shape)}")
        if emb.device != x.device:
            raise ValueError(f"emb is on {emb.device} but x is on {x.device}")
    return layout_of(x)


def combine(partials, eps, mean=None, rstd=None):
    """(mean, rstd) (B,) float32 from (B, P, 3) partials: one ``_gn_combine_kernel`` launch."""
    B = partials.shape[0]
    mean = torch.empty((B,), device=partials.device, dtype=torch.float32) if mean is None else mean
    rstd = torch.empty_like(mean) if rstd is None else rstd
    if B and partials.shape[1]:
        _gn_combine_kernel[(B,)](partials, mean, rstd, partials.shape[1], float(eps), BLOCK_P=128, num_warps=4)
    return mean, rstd


def partials(x):
    """x's (B, P, 3) float32 (count, mean, M2) GroupNorm(1, C) statistics per tile: one ``_gn_stats_kernel``
    launch, for a lazily normalised input whose producer wrote none."""
    channels_last = layout_of(x)
    B, C, H, W = x.shape
    HW = H * W
    block_c, block_hw = tile_config(C, HW, channels_last)
    n_cb = triton.cdiv(C, block_c)
    S, hw_per_prog = _split(HW, block_hw, n_cb)
    out = torch.empty((B, n_cb * S, 3), device=x.device, dtype=torch.float32)  # P = 0 when the sample is empty
    if B and C and HW:
        _gn_stats_kernel[(B * S, n_cb)](x, out, C, HW, hw_per_prog, CHANNELS_LAST=channels_last,
                                       BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=NUM_WARPS)
    return out


def apply(x, mean, rstd, weight, bias, emb=None, out=None):
    """relu((x - mean) * rstd * weight + bias) + emb with given (B,) statistics: one ``_gn_apply_kernel``."""
    channels_last = check_group_norm(x, weight, bias, emb)
    weight, bias = dense(weight, bias)
    B, C, H, W = x.shape
    HW = H * W
    block_c, block_hw = tile_config(C, HW, channels_last)
    y = torch.empty_like(x) if out is None else out
    if x.numel() == 0:
        return y
    e = emb if emb is not None else x  # a dummy pointer when there is no embedding (of emb's dtype)
    grid = (B * triton.cdiv(HW, block_hw), triton.cdiv(C, block_c))  # the big dimensions on axis 0
    _gn_apply_kernel[grid](x, y, weight, bias, e, mean, rstd, C, HW,
                           emb.stride(0) if emb is not None else 0, emb.stride(1) if emb is not None else 0,
                           HAS_EMB=emb is not None, CHANNELS_LAST=channels_last,
                           BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=NUM_WARPS)
    return y


def check_partials(x, partials, gn_weight, gn_bias, prefix="", x_name="the input"):
    """Validate the GroupNorm arguments of a lazily normalised input x (B, C, ...): float32 (B, P, 3)
    partials on x's device, (C,) weight and bias. ValueError naming the argument (``prefix`` + name)."""
    if partials.dim() != 3 or partials.shape[0] != x.shape[0] or partials.shape[2] != 3 \
            or partials.dtype != torch.float32:
        raise ValueError(f"{prefix}partials must be float32 (B, P, 3) with B={x.shape[0]}, got "
                         f"{partials.dtype} {tuple(partials.shape)}")
    for name, p in (("gn_weight", gn_weight), ("gn_bias", gn_bias)):
        if p.shape != (x.shape[1],):
            raise ValueError(f"{prefix}{name} must have shape ({x.shape[1]},), got {tuple(p.shape)}")
    if partials.device != x.device:
        raise ValueError(f"{prefix}partials are on {partials.device} but {x_name} is on {x.device}")


def apply_from_partials(x, partials, eps, weight, bias, emb=None):
    """(relu((x - mean) * rstd * weight + bias) + emb, mean, rstd) with x's statistics folded from its
    (B, P, 3) partials inside the apply kernel: one launch (``_gn_apply_partials_kernel``)."""
    channels_last = check_group_norm(x, weight, bias, emb)
    weight, bias = dense(weight, bias)
    B, C, H, W = x.shape
    HW = H * W
    block_c, block_hw = tile_config(C, HW, channels_last)
    y = torch.empty_like(x)
    mean = torch.empty((B,), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return y, mean, rstd
    e = emb if emb is not None else x  # a dummy pointer when there is no embedding (of emb's dtype)
    grid = (B * triton.cdiv(HW, block_hw), triton.cdiv(C, block_c))  # the big dimensions on axis 0
    _gn_apply_partials_kernel[grid](x, y, weight, bias, e, partials, mean, rstd, C, HW, partials.shape[1], float(eps),
                                    emb.stride(0) if emb is not None else 0, emb.stride(1) if emb is not None else 0,
                                    HAS_EMB=emb is not None, CHANNELS_LAST=channels_last, BLOCK_C=block_c,
                                    BLOCK_HW=block_hw, BLOCK_P=PARTIALS_BLOCK_P, num_warps=NUM_WARPS)
    return y, mean, rstd


PARTIALS_BLOCK_P = 32


def group_norm_relu_fwd(x, weight, bias, eps, emb=None):
    """Returns (y, mean, rstd): y like x (dtype and memory format), mean and rstd (B,) float32."""
    check_group_norm(x, weight, bias, emb)
    B = x.shape[0]
    mean = torch.empty((B,), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    y = torch.empty_like(x)  # preserves the memory format of a dense x
    if x.numel() == 0:
        return y, mean, rstd
    combine(partials(x), eps, mean, rstd)
    apply(x, mean, rstd, weight, bias, emb, out=y)
    return y, mean, rstd


def group_norm_relu_bwd(dy, x, weight, bias, mean, rstd, dy2=None):
    """Returns (dx like x, d_weight (C,), d_bias (C,) in weight's dtype, d_emb (B, C) in x's dtype).

    dy may have any strides; it is brought to x's memory format first. ``dy2`` (like dy, or None): a second
    gradient of the same output, added to dy as the kernels load it."""
    channels_last = check_group_norm(x, weight, bias, None)
    weight, bias = dense(weight, bias)
    B, C, H, W = x.shape
    HW = H * W
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dy = dy.contiguous(memory_format=fmt)
    if dy2 is not None:
        if dy2.shape != x.shape:
            raise ValueError(f"dy2 must have x's shape {tuple(x.shape)}, got {tuple(dy2.shape)}")
        dy2 = dy2.contiguous(memory_format=fmt)
    block_c, block_hw = tile_config(C, HW, channels_last)
    n_cb = triton.cdiv(C, block_c)
    S, hw_per_prog = _split(HW, block_hw, n_cb)
    dev = x.device
    part = torch.empty((3, B, S, C), device=dev, dtype=torch.float32)
    sp = torch.empty((B, S * n_cb, 2), device=dev, dtype=torch.float32)
    demb = torch.empty((B, C), device=dev, dtype=x.dtype)
    dw = torch.empty((C,), device=dev, dtype=weight.dtype)
    db = torch.empty_like(dw)
    dx = torch.empty_like(x)
    if B == 0 or C == 0 or HW == 0:
        z = torch.zeros((C,), device=dev, dtype=weight.dtype)
        return dx.zero_(), z, z.clone(), demb.zero_()
    d2 = dy2 if dy2 is not None else dy  # a dummy pointer without dy2
    _gn_bwd_reduce_kernel[(B * S, n_cb)](x, dy, d2, weight, bias, mean, rstd, part, sp, B, C, HW, hw_per_prog,
                                        HAS_DY2=dy2 is not None, CHANNELS_LAST=channels_last, BLOCK_C=block_c,
                                        BLOCK_HW=block_hw, num_warps=NUM_WARPS)
    _bwd_apply(x, dy, dy2, weight, bias, mean, rstd, part, sp, dx, demb, dw, db)
    return dx, dw, db, demb


def _bwd_apply(x, dy, dy2, weight, bias, mean, rstd, part, sp, dx, demb, dw, db):
    """The GroupNorm + ReLU backward's second launch: dx, d weight, d bias, d emb from the per-split sums
    ``part`` (3, B, S, C) and ``sp`` (B, P, 2) that a first pass wrote (``_gn_bwd_reduce_kernel``, or a
    kernel whose epilogue produced dy and summed it, as the conv's data gradient does)."""
    B, C, H, W = x.shape
    HW = H * W
    channels_last = layout_of(x)
    block_c, block_hw = tile_config(C, HW, channels_last)
    grid = (1 + B * triton.cdiv(HW, block_hw), triton.cdiv(C, block_c))
    _gn_bwd_dx_kernel[grid](x, dy, dy2 if dy2 is not None else dy, dx, weight, bias, mean, rstd, sp, part, demb,
                            dw, db, B, C, HW, part.shape[2], sp.shape[1], HAS_DY2=dy2 is not None,
                            CHANNELS_LAST=channels_last, BLOCK_C=block_c, BLOCK_HW=block_hw, BLOCK_P=BWD_BLOCK_P,
                            num_warps=NUM_WARPS)


def group_norm_relu_bwd_apply(dz, x, weight, bias, mean, rstd, part, sp):
    """(dx, d weight, d bias) of relu(GroupNorm(1, C)(x)) from dz (the gradient with the ReLU mask applied,
    laid out like x) and its per-split sums, as the conv's data-gradient epilogue writes them: ``part``
    (3, B, S, C) float32 column sums of dz's source, of dz * x_hat and of dz; ``sp`` (B, P, 2) float32
    sum_c w * (sum dz) and sum_c w * (sum dz * x_hat); mean, rstd (B,) float32. One launch."""
    weight, bias = dense(weight, bias)
    dx = torch.empty_like(x)
    dw = torch.empty((x.shape[1],), device=x.device, dtype=weight.dtype)
    db = torch.empty_like(dw)
    demb = torch.empty((x.shape[0], x.shape[1]), device=x.device, dtype=x.dtype)  # unused: no emb here
    _bwd_apply(x, dz, None, weight, bias, mean, rstd, part, sp, dx, demb, dw, db)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------------
# Declarations: the pointer arguments each kernel writes (bench.kernels splits a launch's bytes into read
# and written with them), and the builds of the ahead-of-time compile report (fast_unet/aot.py).

WRITES = {
    "_gn_stats_kernel": {"part_ptr"},
    "_gn_combine_kernel": {"mean_ptr", "rstd_ptr"},
    "_gn_apply_kernel": {"y_ptr"},
    "_gn_apply_partials_kernel": {"y_ptr", "mean_ptr", "rstd_ptr"},
    "_gn_bwd_reduce_kernel": {"part_ptr", "sp_ptr"},
    "_gn_bwd_dx_kernel": {"dx_ptr", "demb_ptr", "dw_ptr", "db_ptr"},
}

# Signature hints: float32 pointers (other pointers take the build's dtype), float scalars (other
# scalars are i32), and integers that are multiples of 16 at the model's shapes (the channels).
AOT_FP32_POINTERS = {"part_ptr", "pin_ptr", "mean_ptr", "rstd_ptr", "sp_ptr"}
# (C,) parameter pointers (and their gradients'): float32 or the build's dtype; the builds take both
# (``_common.with_fp32_params``: float32 is autocast's case).
AOT_PARAM_POINTERS = {"w_ptr", "bias_ptr", "dw_ptr", "db_ptr"}
AOT_FLOAT_ARGS = {"eps"}
AOT_ALIGNED_INTS = {"C"}
# Ints that are 1 at inputs the launchers take (a batch of one, one channel, a 1x1 image, one partial or split): the JIT specialises them to constants.
AOT_ONE_INTS = {"B", "C", "HW", "P", "S"}
# The work of one iteration of each kernel's inner loop, for the compile report's per-1,024 figures
# (fast_unet/aot.py loop_tile), where it is not the product of all BLOCK_* constexprs: the loop over the
# partials (BLOCK_P of them) in the apply pass's prologue.
AOT_LOOP_TILES = {"_gn_apply_partials_kernel": (("BLOCK_P",), "partials")}


def aot_builds():
    """[(kernel label, jit fn, config label, dtype name, constexprs, options)]: the tiled kernels in each
    tile of ``TILE_CONFIGS`` per layout (the partials-folding apply in channels_last only, the fused
    path's layout), the per-channel reductions and the combine at their fixed blocks."""
    out = []
    for dt in DTYPE_NAMES:
        for cl, tiles in TILE_CONFIGS.items():
            lay = "channels_last" if cl else "nchw"
            for bc, bhw in tiles:
                tile = f"{dt} {lay} {bc}x{bhw} w{NUM_WARPS}"
                common = dict(CHANNELS_LAST=cl, BLOCK_C=bc, BLOCK_HW=bhw)
                opts = dict(num_warps=NUM_WARPS)
                out.append(("gn_stats", _gn_stats_kernel, tile, dt, dict(common), opts))
                for has_emb in (True, False):
                    out.append(("gn_apply", _gn_apply_kernel, tile + (" emb" if has_emb else ""), dt,
                                dict(common, HAS_EMB=has_emb), opts))
                    if cl:
                        out.append(("gn_apply_partials", _gn_apply_partials_kernel,
                                    tile + (" emb" if has_emb else ""), dt,
                                    dict(common, HAS_EMB=has_emb, BLOCK_P=PARTIALS_BLOCK_P), opts))
                for has_dy2 in (False, True):
                    label = tile + (" dy2" if has_dy2 else "")
                    out.append(("gn_bwd_reduce", _gn_bwd_reduce_kernel, label, dt,
                                dict(common, HAS_DY2=has_dy2), opts))
                    out.append(("gn_bwd_dx", _gn_bwd_dx_kernel, label, dt,
                                dict(common, HAS_DY2=has_dy2, BLOCK_P=BWD_BLOCK_P), opts))
    out.append(("gn_combine", _gn_combine_kernel, "128 w4", "float32", dict(BLOCK_P=128), dict(num_warps=4)))
    return with_ones(with_fp32_params(out, AOT_PARAM_POINTERS), AOT_ONE_INTS)
