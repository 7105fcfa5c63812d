"""The backward of a LayerNorm folded into a GEMM's prologue (``linear.ln_linear``, ``linear.gn_ln_linear``):
the GEMM that forms the normalised input's gradient, with the LayerNorm's backward as its epilogue (Triton).

Forward (kernels/linear.py): out = h @ W^T + bias, h = (x - mu_r) * rs_r * ln_w + ln_b, rows of K <= 512.
Backward, for the upstream gradient d (M, N_out) (after GELU's backward where there is one):

    dh[r, k]   = sum_n d[r, n] * W[n, k]                      (the GEMM, float32 accumulation)
    g          = dh * ln_w[k];  x_hat = (x - mu_r) * rs_r
    dx[r, k]   = rs_r * (g - mean_k(g) - x_hat * mean_k(g * x_hat))
    d ln_w[k]  = sum_r dh * x_hat,   d ln_b[k] = sum_r dh

One program owns BLOCK_M rows and *all* K columns (K <= 512, padded to a power of two), so the row
reductions of the LayerNorm backward happen in registers on the GEMM's accumulator: dh is never
written to memory (unfused, it is written by a GEMM and read back by ``native_layer_norm_backward``).
mu_r and rs_r are recomputed from x (two passes over the row in float32, as the forward kernel computes
them). Each program writes its rows' partial d ln_w, d ln_b sums (float32, (programs, K)); they are summed
over programs in parallel over rows (``column_sums``): when there are more than ``REDUCE_ROWS`` of them,
``_col_partial_sum_kernel`` (grid (cdiv(K, 64), chunks)) first sums each slice of about sqrt(programs) rows
into one row of column partials, then ``group_norm._gn_bwd_param_kernel`` (a column sum stored in the
weight's dtype) sums those chunks: no program loops over more than about sqrt(programs) rows. (Summed by ``_gn_bwd_param_kernel`` alone, one or two
programs looped over 4096 rows serially at the model's largest block.)

Grid (cdiv(M, BLOCK_M),). Bytes per call: read d (M*N_out), W, x (M*K); write dx (M*K) and the
partials; FLOPs 2*M*N_out*K. float32 inputs use exact dots (TF32 where PyTorch's
matmul setting allows it, ``_common.matmul_ieee``), bf16/fp16 the tensor cores (``_common.dot``).
"""
import math

import triton
import triton.language as tl

from ._common import DTYPE_NAMES, with_fp32_params, with_ones
from ._common import dot as _dot
from ._common import check_param, matmul_ieee, precisions
from ._common import to_dtype as _to


@triton.jit
def _ln_linear_bwd_kernel(
    d_ptr,  # (M, N_out) contiguous: the gradient of the GEMM's output
    w_ptr,  # (N_out, K), strides (stride_wo, stride_wi)
    x_ptr,  # (M, K) contiguous: the LayerNorm's input as stored
    ln_w_ptr,  # (K,)
    dx_ptr,  # (M, K) contiguous, x's dtype
    dlw_ptr, dlb_ptr,  # (programs, K) float32 partial sums of d ln_w, d ln_b
    M, K, N_out, stride_wo, stride_wi, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KF: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    k = tl.arange(0, BLOCK_KF)
    k_ok = k < K
    nn = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_KF], dtype=tl.float32)
    for n0 in range(0, N_out, BLOCK_N):
        n = n0 + nn
        n_ok = n < N_out
        d = tl.load(d_ptr + rows.to(tl.int64)[:, None] * N_out + n[None, :],
                    mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + n[:, None] * stride_wo + k[None, :] * stride_wi,
                     mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += _dot(d, wt, IEEE)
    mask = row_ok[:, None] & k_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * K + k[None, :]
    xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mu = tl.sum(xv, axis=1) / K
    xc = tl.where(mask, xv - mu[:, None], 0.0)
    rs = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / K + eps)
    x_hat = xc * rs[:, None]
    lw = tl.load(ln_w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    g = acc * lw[None, :]  # zero where k >= K (lw) and for rows past M (acc)
    c1 = tl.sum(g, axis=1) / K
    c2 = tl.sum(g * x_hat, axis=1) / K
    dx = rs[:, None] * (g - c1[:, None] - x_hat * c2[:, None])
    tl.store(dx_ptr + offs, _to(dx, dx_ptr.dtype.element_ty), mask=mask)
    tl.store(dlw_ptr + pid * K + k, tl.sum(acc * x_hat, axis=0), mask=k_ok)
    tl.store(dlb_ptr + pid * K + k, tl.sum(acc, axis=0), mask=k_ok)


@triton.jit
def _col_partial_sum_kernel(
    pw_ptr, pb_ptr,  # (R, K) float32: rows to sum (the per-program partial d ln_w, d ln_b)
    ow_ptr, ob_ptr,  # (cdiv(R, ROWS_PER_PROG), K) float32: the column sums of each slice of rows
    R, K, ROWS_PER_PROG,  # ROWS_PER_PROG: a multiple of BLOCK_R
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Stage 1 of the column sums of two (R, K) arrays: program (kb, s) sums rows [s * ROWS_PER_PROG,
    (s + 1) * ROWS_PER_PROG) of columns [kb * BLOCK_K, (kb + 1) * BLOCK_K), BLOCK_R rows at a time."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    s = tl.program_id(1)
    k_ok = k < K
    acc_w = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    r0 = s * ROWS_PER_PROG
    for i in range(0, ROWS_PER_PROG, BLOCK_R):
        r = r0 + i + tl.arange(0, BLOCK_R)
        m = (r < R)[:, None] & k_ok[None, :]
        offs = r.to(tl.int64)[:, None] * K + k[None, :]
        acc_w += tl.load(pw_ptr + offs, mask=m, other=0.0)
        acc_b += tl.load(pb_ptr + offs, mask=m, other=0.0)
    tl.store(ow_ptr + s.to(tl.int64) * K + k, tl.sum(acc_w, axis=0), mask=k_ok)
    tl.store(ob_ptr + s.to(tl.int64) * K + k, tl.sum(acc_b, axis=0), mask=k_ok)


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


REDUCE_ROWS = 32  # up to this many rows of partials, one launch of _gn_bwd_param_kernel sums them
REDUCE_BLOCK = (16, 64)  # (BLOCK_R, BLOCK_K) of _col_partial_sum_kernel


def rows_per_program(R):
    """Rows each program of the first stage sums: about sqrt(R), a multiple of BLOCK_R (so the second
    stage's serial loop over the chunks is about as long as the first's)."""
    br = REDUCE_BLOCK[0]
    return max(br, triton.cdiv(math.isqrt(R - 1) + 1, br) * br)


def column_sums(part_w, part_b, dlw, dlb):
    """dlw, dlb (K,) in their dtype = the column sums of the (R, K) float32 partials, parallel over rows:
    where R > REDUCE_ROWS, ``_col_partial_sum_kernel`` folds slices of ``rows_per_program(R)`` rows, then
    ``group_norm._gn_bwd_param_kernel`` sums the remaining rows of each column."""
    R, K = part_w.shape
    if R > REDUCE_ROWS:
        per_prog = rows_per_program(R)
        chunks = triton.cdiv(R, per_prog)
        pw = torch.empty((chunks, K), device=part_w.device, dtype=torch.float32)
        pb = torch.empty_like(pw)
        br, bk = REDUCE_BLOCK
        _col_partial_sum_kernel[(triton.cdiv(K, bk), chunks)](part_w, part_b, pw, pb, R, K, per_prog,
                                                              BLOCK_R=br, BLOCK_K=bk, num_warps=4)
        part_w, part_b, R = pw, pb, chunks
    _gn._gn_bwd_param_kernel[(triton.cdiv(K, 128),)](part_w, part_b, dlw, dlb, R, K, BLOCK_C=128, num_warps=4)
    return dlw, dlb


def config(dtype, k):
    kind = "float32" if dtype in (torch.float32, "float32") else "half"
    return CONFIGS[(kind, max(64, triton.next_power_of_2(k)))]


def ln_linear_bwd(d, x, ln_weight, ln_eps, weight):
    """(dx (M, K) in x's dtype, d ln_weight (K,), d ln_bias (K,) in ln_weight's dtype) for the gradient d
    (M, N_out) of LayerNorm(x) @ weight^T (+ bias). x (M, K) contiguous rows, K <= 512; d and weight in x's
    dtype; ln_weight float32 or x's dtype."""
    if x.dim() != 2 or d.dim() != 2 or d.shape[0] != x.shape[0]:
        raise ValueError(f"d (M, N_out) and x (M, K) must be 2-D with the same M, got {tuple(d.shape)} and "
                         f"{tuple(x.shape)}")
    M, K = x.shape
    if K > MAX_K:
        raise ValueError(f"x has {K} features; the LayerNorm backward takes at most {MAX_K}")
    if weight.dim() != 2 or weight.shape != (d.shape[1], K):
        raise ValueError(f"weight must have shape ({d.shape[1]}, {K}), got {tuple(weight.shape)}")
    if ln_weight.shape != (K,):
        raise ValueError(f"ln_weight must have shape ({K},), got {tuple(ln_weight.shape)}")
    for name, t in (("d", d), ("weight", weight), ("ln_weight", ln_weight)):
        if (t.dtype != x.dtype and name != "ln_weight") or t.device != x.device:
            raise TypeError(f"{name} ({t.dtype}, {t.device}) must match x ({x.dtype}, {x.device})")
    check_param("ln_weight", ln_weight, x, "x")
    x = x.contiguous()
    d = d.contiguous()
    ln_weight = ln_weight.contiguous()  # read as ptr + k
    bm, bn, warps, stages = config(x.dtype, K)
    programs = triton.cdiv(M, bm)
    dx = torch.empty_like(x)
    part_w = torch.empty((programs, K), device=x.device, dtype=torch.float32)
    part_b = torch.empty_like(part_w)
    dlw = torch.empty((K,), device=x.device, dtype=ln_weight.dtype)
    dlb = torch.empty_like(dlw)
    if M == 0 or K == 0:
        return dx, dlw.zero_(), dlb.zero_()
    _ln_linear_bwd_kernel[(programs,)](d, weight, x, ln_weight, dx, part_w, part_b, M, K, d.shape[1],
                                       weight.stride(0), weight.stride(1), float(ln_eps), BLOCK_M=bm, BLOCK_N=bn,
                                       BLOCK_KF=max(64, triton.next_power_of_2(K)),
                                       IEEE=matmul_ieee(x.dtype), num_warps=warps, num_stages=stages)
    column_sums(part_w, part_b, dlw, dlb)
    return dx, dlw, dlb


# ----------------------------------------------------------------------------------------------------
# Declarations: the pointer arguments each kernel writes (bench.kernels splits a launch's bytes into read
# and written with them), and the builds of the ahead-of-time compile report (fast_unet/aot.py). The
# launcher's second kernel, ``group_norm._gn_bwd_param_kernel``, is declared in group_norm.

WRITES = {
    "_ln_linear_bwd_kernel": {"dx_ptr", "dlw_ptr", "dlb_ptr"},
    "_col_partial_sum_kernel": {"ow_ptr", "ob_ptr"},
}

# Signature hints: float32 pointers (other pointers take the build's dtype), float scalars (other
# scalars are i32), and integers that are multiples of 16 at the model's shapes (K = C in 64, 128, 256;
# N_out in C, 3C; the weight's row stride K).
AOT_FP32_POINTERS = {"dlw_ptr", "dlb_ptr", "pw_ptr", "pb_ptr", "ow_ptr", "ob_ptr"}
# (C,) parameter pointers (and their gradients'): float32 or the build's dtype; the builds take both
# (``_common.with_fp32_params``: float32 is autocast's case).
AOT_PARAM_POINTERS = {"ln_w_ptr"}
AOT_FLOAT_ARGS = {"eps"}
AOT_ALIGNED_INTS = {"K", "N_out", "stride_wo"}
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
        for (kind, kf), (bm, bn, warps, stages) in sorted(CONFIGS.items()):
            if (kind == "float32") != (dt == "float32"):
                continue
            for ieee, tag in precisions(dt):
                out.append(("ln_linear_bwd", _ln_linear_bwd_kernel,
                            f"{dt} K<={kf} {bm}x{bn} w{warps} s{stages}{tag}",
                            dt, dict(stride_wi=1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_KF=kf, IEEE=ieee),
                            dict(num_warps=warps, num_stages=stages)))
    br, bk = REDUCE_BLOCK
    out.append(("ln_param_partial_sum", _col_partial_sum_kernel, f"{br}x{bk} w4", "float32",
                dict(BLOCK_R=br, BLOCK_K=bk), dict(num_warps=4)))
    return with_ones(with_fp32_params(out, AOT_PARAM_POINTERS), AOT_ONE_INTS)
