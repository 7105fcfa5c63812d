"""The backward of a LayerNorm folded into a GEMM's prologue (``linear.ln_linear``, ``linear.gn_ln_linear``):
the GEMM that forms the normalised input's gradient, with the LayerNorm's backward as its epilogue and the
GELU's backward, the bias gradient and the normalised input for the weight gradient on the way (Triton).

Forward (kernels/linear.py): out = [gelu](h @ W^T + bias), h = (x - mu_r) * rs_r * ln_w + ln_b rounded to
x's dtype, rows of K <= 512. Backward, for the upstream gradient d (M, N_out):

    d2[r, n]   = d * GELU'(h @ W^T + bias)  (with GELU: the pre-activation recomputed from h)   else d
    dh[r, k]   = sum_n d2[r, n] * W[n, k]                     (the GEMM, float32 accumulation)
    g          = dh * ln_w[k];  x_hat = (x - mu_r) * rs_r
    dx[r, k]   = rs_r * (g - mean_k(g) - x_hat * mean_k(g * x_hat))
    d ln_w[k]  = sum_r dh * x_hat,   d ln_b[k] = sum_r dh,   d bias[n] = sum_r d2
    d W        = d2^T @ h                                     (a torch matmul on the h and d2 written here)

One program owns BLOCK_M rows and *all* K columns (K <= 512, padded to a power of two), so the row
reductions of the LayerNorm backward happen in registers on the GEMM's accumulator: dh is never
written to memory (unfused, it is written by a GEMM and read back by ``native_layer_norm_backward``).
mu_r and rs_r are recomputed from x (two passes over the row in float32, as the forward kernel computes
them), and h is written for d W (unfused: a ``native_layer_norm`` launch). With GELU, each N chunk's
pre-activation is one more dot on the W chunk already loaded, so GELU's backward costs no launch and no
round trip (unfused: an addmm and a ``gelu_backward``). Each program writes its rows' partial d ln_w,
d ln_b and d bias sums (float32, one (programs, 2K + N_out) array); they are summed over programs in
parallel over rows (``column_sums``): when there are more than ``REDUCE_ROWS`` of them,
``_col_partial_sum_kernel`` (grid (cdiv(2K + N_out, 64), chunks)) first sums each slice of about
sqrt(programs) rows into one row of column partials, then ``_col_sum_split_kernel`` sums those chunks
into the three gradients in their dtypes: no program loops over more than about sqrt(programs) rows.

With ``res`` (HAS_RES: a residual's gradient of x, as in ``mlp_residual``), the epilogue adds it to dx in
float32 and its column sums (the residual layer's bias gradient) join the partials as K more columns.

Grid (cdiv(M, BLOCK_M),). Bytes per call: read d (M*N_out), W, x (M*K) [, res (M*K)]; write dx and h (M*K),
d2 (M*N_out) with GELU, and the partials; FLOPs 2*M*N_out*K (twice that with GELU). float32 inputs use exact dots
(TF32 where PyTorch's matmul setting allows it, ``_common.matmul_ieee``), bf16/fp16 the tensor cores
(``_common.dot``).
"""
import math

import triton
import triton.language as tl

from ._common import DTYPE_NAMES, with_fp32_params, with_ones
from ._common import dot as _dot
from ._common import check_param, matmul_ieee, precisions
from ._common import to_dtype as _to


@triton.jit
def _ln_rows(x_ptr, offs, mask, K, eps):
    """(x_hat, rs) of a [BLOCK_M, BLOCK_KF] row tile: the LayerNorm's float32 statistics, two passes over
    the row as the forward kernel computes them; x_hat is zero outside the mask."""
    xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mu = tl.sum(xv, axis=1) / K
    xc = tl.where(mask, xv - mu[:, None], 0.0)
    rs = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / K + eps)
    return xc * rs[:, None], rs


@triton.jit
def _ln_linear_bwd_kernel(
    d_ptr,  # (M, N_out) contiguous: the gradient of the GEMM's output (of the GELU's output with GELU)
    w_ptr,  # (N_out, K), strides (stride_wo, stride_wi)
    bias_ptr,  # (N_out,): the GEMM's bias, read with GELU (the pre-activation is recomputed)
    x_ptr,  # (M, K) contiguous: the LayerNorm's input as stored
    ln_w_ptr, ln_b_ptr,  # (K,)
    dx_ptr,  # (M, K) contiguous, x's dtype
    h_ptr,  # (M, K) contiguous, x's dtype: the LayerNorm's output as the forward's GEMM read it
    d2_ptr,  # (M, N_out) contiguous, x's dtype: the pre-activation's gradient; written with GELU
    res_ptr,  # HAS_RES: (M, K) contiguous, x's dtype: a second gradient of x (a residual's), added to dx (else x, unread)
    part_ptr,  # (programs, 2K + N_out [+ K]) float32: partial sums of d ln_w, d ln_b, d bias [, res] over the rows
    M, K, N_out, stride_wo, stride_wi, eps,
    GELU: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KF: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    k = tl.arange(0, BLOCK_KF)
    k_ok = k < K
    nn = tl.arange(0, BLOCK_N)
    mask = row_ok[:, None] & k_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * K + k[None, :]
    lw = tl.load(ln_w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    lb = tl.load(ln_b_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    x_hat, rs = _ln_rows(x_ptr, offs, mask, K, eps)
    h = _to(x_hat * lw[None, :] + lb[None, :], x_ptr.dtype.element_ty)  # as the forward's prologue rounds it
    tl.store(h_ptr + offs, h, mask=mask)
    if HAS_RES:
        part = part_ptr + pid.to(tl.int64) * (3 * K + N_out)
    else:
        part = part_ptr + pid.to(tl.int64) * (2 * K + N_out)
    acc = tl.zeros([BLOCK_M, BLOCK_KF], dtype=tl.float32)
    for n0 in range(0, N_out, BLOCK_N):
        n = n0 + nn
        n_ok = n < N_out
        dmask = row_ok[:, None] & n_ok[None, :]
        doffs = rows.to(tl.int64)[:, None] * N_out + n[None, :]
        d = tl.load(d_ptr + doffs, mask=dmask, other=0.0)
        wt = tl.load(w_ptr + n[:, None] * stride_wo + k[None, :] * stride_wi,
                     mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        if GELU:
            # the forward's pre-activation, recomputed: h @ W^T + bias (float32 accumulation), then
            # d * GELU'(pre) (exact erf), rounded as an unfused gelu_backward stores it
            pre = _dot(h, tl.trans(wt), IEEE) + tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            cdf = 0.5 * (1.0 + tl.erf(pre * 0.7071067811865476))
            pdf = tl.exp(-0.5 * pre * pre) * 0.3989422804014327
            d = _to(d.to(tl.float32) * (cdf + pre * pdf), d2_ptr.dtype.element_ty)
            tl.store(d2_ptr + doffs, d, mask=dmask)
        tl.store(part + 2 * K + n, tl.sum(d.to(tl.float32), axis=0), mask=n_ok)
        acc += _dot(d, wt, IEEE)
    g = acc * lw[None, :]  # zero where k >= K (lw) and for rows past M (acc)
    c1 = tl.sum(g, axis=1) / K
    c2 = tl.sum(g * x_hat, axis=1) / K
    dx = rs[:, None] * (g - c1[:, None] - x_hat * c2[:, None])
    if HAS_RES:  # the residual's gradient joins in float32 (one rounding), and its column sums
        r = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dx += r
        tl.store(part + 2 * K + N_out + k, tl.sum(r, axis=0), mask=k_ok)
    tl.store(dx_ptr + offs, _to(dx, dx_ptr.dtype.element_ty), mask=mask)
    tl.store(part + k, tl.sum(acc * x_hat, axis=0), mask=k_ok)
    tl.store(part + K + k, tl.sum(acc, axis=0), mask=k_ok)


@triton.jit
def _col_partial_sum_kernel(
    p_ptr,  # (R, W) float32: rows to sum (the per-program partials)
    o_ptr,  # (cdiv(R, ROWS_PER_PROG), W) float32: the column sums of each slice of rows
    R, W, ROWS_PER_PROG,  # ROWS_PER_PROG: a multiple of BLOCK_R
    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Stage 1 of the column sums of an (R, W) array: program (wb, s) sums rows [s * ROWS_PER_PROG,
    (s + 1) * ROWS_PER_PROG) of columns [wb * BLOCK_W, (wb + 1) * BLOCK_W), BLOCK_R rows at a time."""
    c = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    s = tl.program_id(1)
    c_ok = c < W
    acc = tl.zeros([BLOCK_R, BLOCK_W], dtype=tl.float32)
    r0 = s * ROWS_PER_PROG
    for i in range(0, ROWS_PER_PROG, BLOCK_R):
        r = r0 + i + tl.arange(0, BLOCK_R)
        m = (r < R)[:, None] & c_ok[None, :]
        acc += tl.load(p_ptr + r.to(tl.int64)[:, None] * W + c[None, :], mask=m, other=0.0)
    tl.store(o_ptr + s.to(tl.int64) * W + c, tl.sum(acc, axis=0), mask=c_ok)


@triton.jit
def _col_sum_split_kernel(
    p_ptr,  # (R, 2K + N + N2) float32
    dlw_ptr, dlb_ptr,  # (K,) in the LayerNorm parameters' dtype: columns [0, K) and [K, 2K)
    db_ptr,  # (N,) in the bias's dtype: columns [2K, 2K + N)
    db2_ptr,  # (N2,): columns [2K + N, 2K + N + N2) (N2 = 0: unused)
    R, K, N, N2,
    BLOCK_W: tl.constexpr,
):
    """Stage 2 (or the only stage, for R <= REDUCE_ROWS): the column sums of the remaining rows, stored
    into the gradients in their dtypes."""
    W = 2 * K + N + N2
    c = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    c_ok = c < W
    acc = tl.zeros([BLOCK_W], dtype=tl.float32)
    for r in range(0, R):
        acc += tl.load(p_ptr + r * W + c, mask=c_ok, other=0.0)
    tl.store(dlw_ptr + c, acc.to(dlw_ptr.dtype.element_ty), mask=c < K)
    tl.store(dlb_ptr + (c - K), acc.to(dlb_ptr.dtype.element_ty), mask=(c >= K) & (c < 2 * K))
    tl.store(db_ptr + (c - 2 * K), acc.to(db_ptr.dtype.element_ty), mask=(c >= 2 * K) & (c < 2 * K + N))
    tl.store(db2_ptr + (c - 2 * K - N), acc.to(db2_ptr.dtype.element_ty), mask=(c >= 2 * K + N) & c_ok)


# ----------------------------------------------------------------------------------------------------
# Launcher. Validates, allocates and launches; no autograd here (the glue in fast_unet/ops/).

import torch  # noqa: E402

from . import group_norm as _gn  # noqa: E402

MAX_K = 512
# (BLOCK_M, BLOCK_N, num_warps, num_stages) by (dtype kind, padded K): a program holds BLOCK_M x K
# float32 accumulators plus x and x_hat, so the row block shrinks as K grows. Every entry is in the
# compile report (``aot_builds`` below); speed unmeasured until a GPU has run them. Half precision: 64-row
# blocks take wgmma on sm_90 (up to K 128 at 128 registers); at K 256 a 64-row block sat at 255
# registers, so 32 rows (mma.sync, 128 registers); at K 512, 64 rows spilled 1.1-1.4 KB.
CONFIGS = {
    ("half", 64): (64, 64, 4, 3), ("half", 128): (64, 32, 8, 3), ("half", 256): (32, 32, 8, 3),
    ("half", 512): (16, 32, 8, 3),
    ("float32", 64): (32, 32, 4, 1), ("float32", 128): (32, 32, 4, 1), ("float32", 256): (16, 32, 4, 1),
    ("float32", 512): (16, 16, 8, 1),
}


REDUCE_ROWS = 32  # up to this many rows of partials, one launch of _col_sum_split_kernel sums them
REDUCE_BLOCK = (16, 64)  # (BLOCK_R, BLOCK_W) of _col_partial_sum_kernel
SPLIT_BLOCK_W = 128  # BLOCK_W of _col_sum_split_kernel


def rows_per_program(R):
    """Rows each program of the first stage sums: about sqrt(R), a multiple of BLOCK_R (so the second
    stage's serial loop over the chunks is about as long as the first's)."""
    br = REDUCE_BLOCK[0]
    return max(br, triton.cdiv(math.isqrt(R - 1) + 1, br) * br)


def column_sums(part, dlw, dlb, db, db2=None):
    """dlw, dlb (K,), db (N,) [and db2 (N2,)] in their dtypes = the column sums of the (R, 2K + N [+ N2]) float32 partials,
    parallel over rows: where R > REDUCE_ROWS, ``_col_partial_sum_kernel`` folds slices of
    ``rows_per_program(R)`` rows, then ``_col_sum_split_kernel`` sums the remaining rows of each column."""
    R, W = part.shape
    if R > REDUCE_ROWS:
        per_prog = rows_per_program(R)
        chunks = triton.cdiv(R, per_prog)
        p = torch.empty((chunks, W), device=part.device, dtype=torch.float32)
        br, bw = REDUCE_BLOCK
        _col_partial_sum_kernel[(triton.cdiv(W, bw), chunks)](part, p, R, W, per_prog, BLOCK_R=br, BLOCK_W=bw,
                                                              num_warps=4)
        part, R = p, chunks
    K, N = dlw.shape[0], db.shape[0]
    _col_sum_split_kernel[(triton.cdiv(W, SPLIT_BLOCK_W),)](part, dlw, dlb, db, db2 if db2 is not None else db, R, K,
                                                            N, W - 2 * K - N, BLOCK_W=SPLIT_BLOCK_W, num_warps=4)


# With GELU a program also holds the chunk's pre-activation and its GELU terms: where the plain config
# spilled or sat at 255 registers (half K 64: 255 and 16-88 bytes spilled on sm_80; float32 K 256: 5.6-6.4 KB
# spilled), a narrower N chunk or more warps.
GELU_CONFIGS = {("half", 64): (64, 32, 4, 3), ("float32", 256): (16, 16, 8, 1)}


def config(dtype, k, gelu=False):
    key = ("float32" if dtype in (torch.float32, "float32") else "half", max(64, triton.next_power_of_2(k)))
    return GELU_CONFIGS.get(key, CONFIGS[key]) if gelu else CONFIGS[key]


def ln_linear_bwd(d, x, ln_weight, ln_bias, ln_eps, weight, bias, gelu=False, res=None, res_bias=None):
    """The backward of [gelu](LayerNorm(x) @ weight^T + bias) for its output's gradient d (M, N_out), except
    d weight. x (M, K) contiguous rows, K <= 512; d and weight in x's dtype; the (C,) parameters float32
    or x's dtype. Returns (dx (M, K) in x's dtype, d ln_weight (K,), d ln_bias (K,), d bias (N_out,) in
    their parameters' dtypes, h (M, K): LayerNorm(x) in x's dtype as the forward's GEMM read it, d2
    (M, N_out): the gradient of the pre-activation in x's dtype, with ``gelu`` (without, d2 is d: an empty
    tensor is returned), d res_bias); d weight = d2^T @ h.

    ``res`` (M, K) in x's dtype: a second gradient of x (a residual connection's), added to dx in float32
    as the epilogue stores it; with it, ``res_bias`` (K,) is the bias of the layer whose output gradient
    res is (``x + linear(...) + res_bias``), and the last output is its gradient, res's column sums, in
    res_bias's dtype (an empty tensor without res)."""
    if x.dim() != 2 or d.dim() != 2 or d.shape[0] != x.shape[0]:
        raise ValueError(f"d (M, N_out) and x (M, K) must be 2-D with the same M, got {tuple(d.shape)} and "
                         f"{tuple(x.shape)}")
    M, K = x.shape
    N = d.shape[1]
    if K > MAX_K:
        raise ValueError(f"x has {K} features; the LayerNorm backward takes at most {MAX_K}")
    if weight.dim() != 2 or weight.shape != (N, K):
        raise ValueError(f"weight must have shape ({N}, {K}), got {tuple(weight.shape)}")
    for name, p, n in (("ln_weight", ln_weight, K), ("ln_bias", ln_bias, K), ("bias", bias, N)):
        if p.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(p.shape)}")
    for name, t in (("d", d), ("weight", weight), ("ln_weight", ln_weight), ("ln_bias", ln_bias), ("bias", bias)):
        if (t.dtype != x.dtype and t.dim() == 2) or t.device != x.device:
            raise TypeError(f"{name} ({t.dtype}, {t.device}) must match x ({x.dtype}, {x.device})")
        if t.dim() == 1:
            check_param(name, t, x, "x")
    if res is not None:
        if res.shape != x.shape or res.dtype != x.dtype or res.device != x.device:
            raise ValueError(f"res must be like x ({tuple(x.shape)}, {x.dtype}, {x.device}), got "
                             f"({tuple(res.shape)}, {res.dtype}, {res.device})")
        if res_bias is None or res_bias.shape != (K,):
            raise ValueError(f"res_bias must have shape ({K},) with res, got "
                             f"{None if res_bias is None else tuple(res_bias.shape)}")
        check_param("res_bias", res_bias, x, "x")
        res = res.contiguous()
    x = x.contiguous()
    d = d.contiguous()
    ln_weight, ln_bias, bias = (p.contiguous() for p in (ln_weight, ln_bias, bias))  # read as ptr + k
    bm, bn, warps, stages = config(x.dtype, K, gelu)
    programs = triton.cdiv(M, bm)
    dx = torch.empty_like(x)
    h = torch.empty_like(x)
    d2 = torch.empty_like(d) if gelu else d.new_empty((0,))
    n2 = K if res is not None else 0
    part = torch.empty((programs, 2 * K + N + n2), device=x.device, dtype=torch.float32)
    dlw = torch.empty((K,), device=x.device, dtype=ln_weight.dtype)
    dlb = torch.empty((K,), device=x.device, dtype=ln_bias.dtype)
    db = torch.empty((N,), device=x.device, dtype=bias.dtype)
    db2 = torch.empty((n2,), device=x.device, dtype=res_bias.dtype if res is not None else bias.dtype)
    if M == 0 or K == 0:
        return dx.zero_() if res is None else dx.copy_(res), dlw.zero_(), dlb.zero_(), db.zero_(), h, d2, db2.zero_()
    _ln_linear_bwd_kernel[(programs,)](d, weight, bias, x, ln_weight, ln_bias, dx, h, d2 if gelu else d,
                                       res if res is not None else x, part, M, K, N, weight.stride(0),
                                       weight.stride(1), float(ln_eps), GELU=bool(gelu), HAS_RES=res is not None,
                                       BLOCK_M=bm, BLOCK_N=bn, BLOCK_KF=max(64, triton.next_power_of_2(K)),
                                       IEEE=matmul_ieee(x.dtype), num_warps=warps, num_stages=stages)
    column_sums(part, dlw, dlb, db, db2 if res is not None else None)
    return dx, dlw, dlb, db, h, d2, db2


# ----------------------------------------------------------------------------------------------------
# Declarations: the pointer arguments each kernel writes (bench.kernels splits a launch's bytes into read
# and written with them), and the builds of the ahead-of-time compile report (fast_unet/aot.py).

WRITES = {
    "_ln_linear_bwd_kernel": {"dx_ptr", "h_ptr", "d2_ptr", "part_ptr"},
    "_col_partial_sum_kernel": {"o_ptr"},
    "_col_sum_split_kernel": {"dlw_ptr", "dlb_ptr", "db_ptr", "db2_ptr"},
}

# Signature hints: float32 pointers (other pointers take the build's dtype), float scalars (other
# scalars are i32), and integers that are multiples of 16 at the model's shapes (K = C in 64, 128, 256;
# N_out in C, 3C; the weight's row stride K).
AOT_FP32_POINTERS = {"part_ptr", "p_ptr", "o_ptr"}
# (C,) parameter pointers (and their gradients'): float32 or the build's dtype; the builds take both
# (``_common.with_fp32_params``: float32 is autocast's case).
AOT_PARAM_POINTERS = {"ln_w_ptr", "ln_b_ptr", "bias_ptr", "dlw_ptr", "dlb_ptr", "db_ptr", "db2_ptr"}
AOT_FLOAT_ARGS = {"eps"}
AOT_ALIGNED_INTS = {"K", "N_out", "stride_wo", "N", "N2"}
# Ints that are 1 at inputs the launchers take (one row, one feature in or out, one row of partials): the JIT specialises them to constants.
AOT_ONE_INTS = {"M", "K", "N_out", "R"}
# The work of one iteration of each kernel's inner loop, for the compile report's per-1,024 figures
# (fast_unet/aot.py loop_tile): the N_out loop's BLOCK_M x BLOCK_N x BLOCK_KF multiply-adds.
AOT_LOOP_TILES = {"_ln_linear_bwd_kernel": (("BLOCK_M", "BLOCK_N", "BLOCK_KF"), "MACs")}


def aot_builds():
    """[(kernel label, jit fn, config label, dtype name, constexprs, options)]: each (dtype kind, padded
    K) config of ``CONFIGS``; the weight's ``stride_wi == 1`` specialised as the JIT does."""
    out = []
    for dt in DTYPE_NAMES:
        for (kind, kf) in sorted(CONFIGS):
            if (kind == "float32") != (dt == "float32"):
                continue
            for ieee, tag in precisions(dt):
                # the MLP's first layer (mlp_residual) runs with GELU and the residual's gradient
                for gelu, res in ((False, False), (True, False), (True, True)):
                    bm, bn, warps, stages = config(dt, kf, gelu)
                    out.append(("ln_linear_bwd", _ln_linear_bwd_kernel,
                                f"{dt} K<={kf} {bm}x{bn} w{warps} s{stages}{tag}{' gelu' if gelu else ''}"
                                f"{' res' if res else ''}",
                                dt, dict(stride_wi=1, GELU=gelu, HAS_RES=res, BLOCK_M=bm, BLOCK_N=bn, BLOCK_KF=kf,
                                         IEEE=ieee),
                                dict(num_warps=warps, num_stages=stages)))
        out.append(("ln_param_split_sum", _col_sum_split_kernel, f"{dt} {SPLIT_BLOCK_W} w4", dt,
                    dict(BLOCK_W=SPLIT_BLOCK_W), dict(num_warps=4)))
    br, bw = REDUCE_BLOCK
    out.append(("ln_param_partial_sum", _col_partial_sum_kernel, f"{br}x{bw} w4", "float32",
                dict(BLOCK_R=br, BLOCK_W=bw), dict(num_warps=4)))
    return with_ones(with_fp32_params(out, AOT_PARAM_POINTERS), AOT_ONE_INTS)
