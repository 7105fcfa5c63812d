"""The attention block's token GEMMs with their neighbours fused in: one kernel, constexpr prologues and
epilogues (Triton).

    out[r, n] = epilogue( sum_k A[r, k] * weight[n, k] + bias[n] )

x rows are tokens: (M, K) with K = C channels contiguous (a channels_last (B, C, H, W) activation is
(B*H*W, C) in memory, so the token view costs nothing); weight (N_out, K) as nn.Linear stores it, read
through its strides; out (M, N_out) contiguous in x's dtype; bias and the LayerNorm and GroupNorm weights and
biases (the (C,) parameters) float32 or x's dtype, read in float32. A, by ``PROLOGUE``:

- 0 (``linear_residual``): A = x.
- 1 (``ln_linear``): A = LayerNorm(x) = (x - mu_r) * rs_r * ln_w[k] + ln_b[k], rounded to x's dtype.
- 2 (``gn_ln_linear``): x is y (B, C, H, W) channels_last, a conv output never normalised, with its
  GroupNorm(1, C) statistics as float32 partials (B, P, 3) = (count, mean, M2); then
      t[r, k] = relu((y[r, k] - mean_b) * rstd_b * gn_w[k] + gn_b[k]) + emb[b, k],   b = r // HW,
  rounded to x's dtype and written to ``tok`` (the block's residual; only the pid_n == 0 programs
  write it, so each element once), and A = LayerNorm(t) as in 1. mean_b and rstd_b come from
  ``group_norm.partials_stats`` in the prologue and are stored too (mean, rstd (B,) float32, for the
  backward's GroupNorm kernels).

The LayerNorm row statistics are float32 and two-pass over K chunks of the row tile (mean, then the
centred sum of squares): three sweeps over A's [BLOCK_M, K] tile in all, the third feeding tl.dot; the
re-reads hit L1/L2 (K <= 512). Epilogue: + bias, then exact-erf GELU if ``GELU`` (F.gelu's default),
then + residual[r, n] (M, N_out) if ``RESIDUAL``, all in float32 on the accumulator, one rounding to the
output dtype. float32 inputs follow PyTorch's matmul TF32 setting (``_common.matmul_ieee``: exact
(``input_precision="ieee"``) dots at "highest", the default, TF32 at "high"/"medium"), bf16/fp16 the tensor cores with
float32 accumulation (``_common.dot``).

Grid: (cdiv(N_out, BLOCK_N) * cdiv(rows per group, BLOCK_M), groups). With the GroupNorm prologue a
group is one sample (rows per group = H*W), so a tile never straddles two samples and the sample's
statistics are scalars; otherwise one group of M rows. Axis 0 runs N fastest: the programs that share an
A tile (and redo its prologue) run side by side, and the weight (<= 768 x 256) stays in L2.

Work per call (M = B*HW tokens, K = C, N_out outputs, e bytes per element): 2*M*K*N_out FLOPs; DRAM
traffic about e*(M*K + N_out*K + M*N_out), + e*M*N_out for the residual and + e*M*K for t (A's re-reads,
once per N tile and per prologue pass, should hit L2/L1). E.g. the QKV projection of sa1 at B = 64, 32x32,
bf16 (M = 65536, C = 128, N_out = 384): 6.4 GFLOP, 17 MB of y read, 50 MB of qkv and 17 MB of t written:
about 20 us at the H200's 4.3 TB/s against 8 us of bf16 matmul: these GEMMs are bandwidth-bound, which
is why the norms ride in their prologues instead of making their own round trips.
"""
import itertools

import triton
import triton.language as tl

from ._common import DTYPE_NAMES, DTYPES, with_fp32_params, with_ones
from ._common import dot as _dot
from ._common import check_param, matmul_ieee, precisions
from ._common import relu as _relu
from ._common import to_dtype as _to
from .group_norm import partials_stats as _partials_stats


@triton.jit
def _a_tile(
    x_rows, row_ok, k, K,
    gn_w_ptr, gn_b_ptr, emb_row, stride_ec, gn_mean, gn_rstd,
    GN: tl.constexpr, HAS_EMB: tl.constexpr,
):
    """The [BLOCK_M, BLOCK_K] chunk of the rows before any LayerNorm, float32, zero outside (rows, K):
    x itself, or with ``GN`` t = relu(GroupNorm(y)) + emb rounded to x's dtype (as the unfused path
    stores it)."""
    k_ok = k < K
    mask = row_ok[:, None] & k_ok[None, :]
    v = tl.load(x_rows[:, None] + k[None, :], mask=mask, other=0.0).to(tl.float32)
    if GN:
        w = tl.load(gn_w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        b = tl.load(gn_b_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
        scale = w * gn_rstd
        v = _relu(v * scale[None, :] + (b - gn_mean * scale)[None, :])  # group_norm._pre_relu's formula
        if HAS_EMB:
            e = tl.load(emb_row + k * stride_ec, mask=k_ok, other=0.0).to(tl.float32)
            v = v + e[None, :]
        # zero where k >= K (w, b and emb load 0 there); rows past the tile's end are never stored
        v = _to(v, x_rows.dtype.element_ty).to(tl.float32)
    return v


@triton.jit
def _linear_kernel(
    x_ptr,  # (groups * M_grp, K) contiguous rows: x, or y (B, C, H, W) channels_last with PROLOGUE 2
    w_ptr,  # (N_out, K), strides (stride_wo, stride_wi)
    bias_ptr,  # (N_out,)
    res_ptr,  # (M, N_out) contiguous; read if RESIDUAL
    out_ptr,  # (M, N_out) contiguous
    ln_w_ptr, ln_b_ptr,  # (K,); PROLOGUE >= 1
    part_ptr,  # (B, P, 3) float32 GroupNorm partials; PROLOGUE 2
    gn_w_ptr, gn_b_ptr,  # (K,); PROLOGUE 2
    emb_ptr,  # (B, K), strides (stride_eb, stride_ec); PROLOGUE 2 and HAS_EMB
    tok_ptr,  # (M, K) contiguous: t written here; PROLOGUE 2
    mean_ptr, rstd_ptr,  # (B,) float32: the GroupNorm statistics, written here; PROLOGUE 2
    M_grp, K, N_out, P,
    stride_wo, stride_wi, stride_eb, stride_ec,
    ln_eps, gn_eps,
    PROLOGUE: tl.constexpr, HAS_EMB: tl.constexpr, GELU: tl.constexpr, RESIDUAL: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    n_n = tl.cdiv(N_out, BLOCK_N)
    pid_n = pid % n_n
    pid_m = pid // n_n
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = m < M_grp
    n_ok = n < N_out
    row0 = g.to(tl.int64) * M_grp  # first row of this group
    rows = row0 + m
    x_rows = x_ptr + rows * K
    kk = tl.arange(0, BLOCK_K)
    GN: tl.constexpr = PROLOGUE == 2

    gn_mean = 0.0
    gn_rstd = 0.0
    emb_row = emb_ptr
    if GN:
        gn_mean, gn_rstd = _partials_stats(part_ptr, g, P, gn_eps, BLOCK_P)
        if pid == 0:
            tl.store(mean_ptr + g, gn_mean)
            tl.store(rstd_ptr + g, gn_rstd)
        emb_row = emb_ptr + g.to(tl.int64) * stride_eb

    ln_mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    ln_rstd = tl.zeros([BLOCK_M], dtype=tl.float32)
    if PROLOGUE >= 1:
        # Pass 1: row sums (and, with GN, t written by the pid_n == 0 programs).
        acc_s = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            v = _a_tile(x_rows, row_ok, k, K, gn_w_ptr, gn_b_ptr, emb_row, stride_ec, gn_mean, gn_rstd,
                        GN, HAS_EMB)
            if GN:
                if pid_n == 0:
                    tl.store(tok_ptr + rows[:, None] * K + k[None, :], _to(v, tok_ptr.dtype.element_ty),
                             mask=row_ok[:, None] & (k < K)[None, :])
            acc_s += tl.sum(v, axis=1)
        ln_mean = acc_s / K
        # Pass 2: centred sum of squares.
        acc_q = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            v = _a_tile(x_rows, row_ok, k, K, gn_w_ptr, gn_b_ptr, emb_row, stride_ec, gn_mean, gn_rstd,
                        GN, HAS_EMB)
            d = tl.where((k < K)[None, :], v - ln_mean[:, None], 0.0)
            acc_q += tl.sum(d * d, axis=1)
        ln_rstd = 1.0 / tl.sqrt(acc_q / K + ln_eps)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        k_ok = k < K
        if PROLOGUE >= 1:
            v = _a_tile(x_rows, row_ok, k, K, gn_w_ptr, gn_b_ptr, emb_row, stride_ec, gn_mean, gn_rstd,
                        GN, HAS_EMB)
            lw = tl.load(ln_w_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            lb = tl.load(ln_b_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
            h = (v - ln_mean[:, None]) * ln_rstd[:, None] * lw[None, :] + lb[None, :]
            a = _to(h, x_ptr.dtype.element_ty)  # the LayerNorm output as the unfused path stores it
        else:
            a = tl.load(x_rows[:, None] + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + k[:, None] * stride_wi + n[None, :] * stride_wo,
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += _dot(a, wt, IEEE)

    out = acc + tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        out = 0.5 * out * (1.0 + tl.erf(out * 0.7071067811865476))
    mask = row_ok[:, None] & n_ok[None, :]
    offs = rows[:, None] * N_out + n[None, :]
    if RESIDUAL:
        out += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _to(out, out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers. They validate, allocate and launch; no autograd here (the glue in fast_unet/ops/).

import torch  # noqa: E402

MAX_LN_K = 512  # the LayerNorm prologues re-read the row tile three times: sized for C <= 512
BLOCK_P = 64  # GroupNorm partials per chunk in partials_stats

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by (dtype kind, variant): "narrow_n" for N_out <= 64
# (one N tile: a 128-wide one would be half masked), else "wide_n". Every entry is in the AOT compile
# report (``aot_builds`` below) and was picked from it: at BLOCK_K 64 the GroupNorm prologue
# sat at 128-168 registers with 4 warps and spilled once on sm_80 (fp16); 64x128 with 4 warps needs
# 150-168; float32 stays at BLOCK_K 16, like the conv. Their speed is a guess until a GPU has measured them.
CONFIGS = {
    ("half", "narrow_n"): (64, 64, 32, 4, 3),
    ("half", "wide_n"): (64, 128, 32, 8, 3),
    ("float32", "narrow_n"): (64, 64, 16, 4, 1),
    ("float32", "wide_n"): (64, 64, 16, 4, 1),
}


def config(dtype, n_out):
    kind = "float32" if dtype in (torch.float32, "float32") else "half"
    return CONFIGS[(kind, "narrow_n" if n_out <= 64 else "wide_n")]


def interpreter_tiles():
    """{module attribute: value}: one large tile for runs under Triton's interpreter that check the wiring
    (``fast_unet.backends.interpreter_tiles``), where each loop iteration of each program costs a few
    milliseconds. Every real config is in ``CONFIGS``, tested in tests/ops/test_linear.py."""
    return {"config": lambda dtype, n_out: (128, 256, 128, 4, 1)}


def _same(name, p, x, shape):
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(p).__name__}")
    if tuple(p.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(p.shape)}")
    if p.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {p.dtype} but the input is {x.dtype}")
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but the input is on {x.device}")


def _param(name, p, x, shape):
    """A (C,) parameter: shape, device, and dtype float32 or x's (``_common.check_param``)."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(p).__name__}")
    if tuple(p.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(p.shape)}")
    check_param(name, p, x)
    if p.device != x.device:
        raise ValueError(f"{name} is on {p.device} but the input is on {x.device}")


def _check_x(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")


def check_linear(x, weight, bias, residual=None, name="x"):
    """x (..., K), weight (N_out, K), bias (N_out,), residual (..., N_out) or None; ``name``: x's in errors."""
    _check_x(name, x)
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (..., K)")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight must have shape (N_out, {x.shape[-1]}) for {name} with {x.shape[-1]} features, got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
    _same("weight", weight, x, weight.shape)
    _param("bias", bias, x, (weight.shape[0],))
    if residual is not None:
        _same("residual", residual, x, (*x.shape[:-1], weight.shape[0]))


def check_ln(x, ln_weight, ln_bias, name="x"):
    k = x.shape[-1]
    if k > MAX_LN_K:
        raise ValueError(f"{name} has {k} features; the LayerNorm prologue takes at most {MAX_LN_K}")
    _param("ln_weight", ln_weight, x, (k,))
    _param("ln_bias", ln_bias, x, (k,))


def check_gn(y, partials, gn_weight, gn_bias, emb):
    _check_x("y", y)
    if y.dim() != 4:
        raise ValueError(f"y must be 4-D (B, C, H, W), got shape {tuple(y.shape)}")
    B, C = y.shape[:2]
    if not isinstance(partials, torch.Tensor) or partials.dim() != 3 or partials.shape[0] != B \
            or partials.shape[2] != 3 or partials.shape[1] < 1:
        raise ValueError(f"partials must have shape ({B}, P, 3) (count, mean, M2 per tile of y), got "
                         f"{tuple(partials.shape) if isinstance(partials, torch.Tensor) else type(partials).__name__}")
    if partials.dtype != torch.float32:
        raise TypeError(f"partials must be float32, got {partials.dtype}")
    if partials.device != y.device:
        raise ValueError(f"partials is on {partials.device} but y is on {y.device}")
    _param("gn_weight", gn_weight, y, (C,))
    _param("gn_bias", gn_bias, y, (C,))
    if emb is not None:
        _same("emb", emb, y, (B, C))


def _launch(x2, weight, bias, out, M_grp, groups, *, residual=None, ln=None, gn=None, gelu=False):
    """x2 (groups * M_grp, K) contiguous; out (groups * M_grp, N_out) contiguous."""
    K = x2.shape[1]
    n_out = weight.shape[0]
    if out.numel() == 0:
        return
    # the (N_out,) and (K,) parameters are read as ptr + index: contiguous (a copy only for a strided view)
    bias = bias.contiguous()
    ln = (ln[0].contiguous(), ln[1].contiguous(), ln[2]) if ln is not None else None
    gn = (gn[0], gn[1].contiguous(), gn[2].contiguous(), *gn[3:]) if gn is not None else None
    bm, bn, bk, warps, stages = config(x2.dtype, n_out)
    ln_w, ln_b, ln_eps = ln if ln is not None else (bias, bias, 0.0)
    prologue = 0 if ln is None else (2 if gn is not None else 1)
    if gn is not None:
        partials, gn_w, gn_b, gn_eps, emb, tok, mean, rstd = gn
        P = partials.shape[1]
        e = emb if emb is not None else x2  # a placeholder of emb's dtype
        se = emb.stride() if emb is not None else (0, 1)
    else:
        # unused placeholders: read-only ones alias inputs, written ones the output, so no placeholder
        # aliases a tensor the kernel writes unless it is declared written (``WRITES`` below); the float32
        # pointers (``AOT_FP32_POINTERS``) get a float32 one and emb's stride 1, as the compile report's
        # builds take them, so that the JIT compiles the build the report describes
        f32 = torch.empty((1,), device=x2.device, dtype=torch.float32)
        partials, gn_w, gn_b, gn_eps, e, tok, mean, rstd = (f32, bias, bias, 0.0, x2, out, f32, f32)
        P, se = 1, (0, 1)
    res = residual if residual is not None else x2
    grid = (triton.cdiv(n_out, bn) * triton.cdiv(M_grp, bm), groups)
    _linear_kernel[grid](x2, weight, bias, res, out, ln_w, ln_b, partials, gn_w, gn_b, e, tok, mean, rstd,
                         M_grp, K, n_out, P, weight.stride(0), weight.stride(1), se[0], se[1],
                         float(ln_eps), float(gn_eps),
                         PROLOGUE=prologue, HAS_EMB=gn is not None and gn[4] is not None, GELU=bool(gelu),
                         RESIDUAL=residual is not None, IEEE=matmul_ieee(x2.dtype), BLOCK_M=bm, BLOCK_N=bn,
                         BLOCK_K=bk, BLOCK_P=BLOCK_P, num_warps=warps, num_stages=stages)


def linear_residual(x, weight, bias, residual):
    """x (..., K) @ weight^T + bias + residual (..., N_out) -> (..., N_out) in x's dtype."""
    check_linear(x, weight, bias, residual)
    n_out = weight.shape[0]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    res = residual.reshape(-1, n_out).contiguous()
    out = torch.empty((x2.shape[0], n_out), device=x.device, dtype=x.dtype)
    _launch(x2, weight, bias, out, x2.shape[0], 1, residual=res)
    return out.view(*x.shape[:-1], n_out)


def ln_linear(x, ln_weight, ln_bias, ln_eps, weight, bias, gelu=False):
    """[gelu](LayerNorm(x) @ weight^T + bias): x (..., K), K <= 512 -> (..., N_out) in x's dtype."""
    check_linear(x, weight, bias)
    check_ln(x, ln_weight, ln_bias)
    n_out = weight.shape[0]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty((x2.shape[0], n_out), device=x.device, dtype=x.dtype)
    _launch(x2, weight, bias, out, x2.shape[0], 1, ln=(ln_weight, ln_bias, ln_eps), gelu=gelu)
    return out.view(*x.shape[:-1], n_out)


def gn_ln_linear(y, partials, gn_weight, gn_bias, gn_eps, emb, ln_weight, ln_bias, ln_eps, weight, bias):
    """y (B, C, H, W), channels_last (else copied to it). Returns (out (B, HW, N_out), t (B, C, H, W)
    channels_last, mean (B,) f32, rstd (B,) f32):
    t = relu(GroupNorm(1, C)(y)) + emb (statistics from ``partials``), out = LayerNorm(t) @ weight^T + bias."""
    check_gn(y, partials, gn_weight, gn_bias, emb)
    y = y.contiguous(memory_format=torch.channels_last)  # the model's layout already: no copy
    B, C, H, W = y.shape
    tokens = y.permute(0, 2, 3, 1)  # (B, H, W, C) contiguous: the rows
    check_linear(tokens, weight, bias, name="y (channels)")
    check_ln(tokens, ln_weight, ln_bias, name="y (channels)")
    n_out = weight.shape[0]
    HW = H * W
    out = torch.empty((B, HW, n_out), device=y.device, dtype=y.dtype)
    t = torch.empty_like(y, memory_format=torch.channels_last)
    mean = torch.empty((B,), device=y.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if y.numel() == 0:
        return out, t, mean, rstd
    _launch(tokens.reshape(B * HW, C), weight, bias, out, HW, B, ln=(ln_weight, ln_bias, ln_eps),
            gn=(partials.contiguous(), gn_weight, gn_bias, gn_eps, emb, t, mean, rstd))
    return out, t, mean, rstd


# ----------------------------------------------------------------------------------------------------
# Declarations: the pointer arguments each kernel writes (bench.kernels splits a launch's bytes into read
# and written with them), and the builds of the ahead-of-time compile report (fast_unet/aot.py).

WRITES = {
    "_linear_kernel": {"out_ptr", "tok_ptr", "mean_ptr", "rstd_ptr"},
}

# Signature hints: float32 pointers (other pointers take the build's dtype), float scalars (other
# scalars are i32), and integers that are multiples of 16 at the model's shapes (K = C in 64, 128, 256;
# N_out in C, 3C; the weight's row stride K).
AOT_FP32_POINTERS = {"part_ptr", "mean_ptr", "rstd_ptr"}
# (C,) parameter pointers (and their gradients'): float32 or the build's dtype; the builds take both
# (``_common.with_fp32_params``: float32 is autocast's case).
AOT_PARAM_POINTERS = {"bias_ptr", "ln_w_ptr", "ln_b_ptr", "gn_w_ptr", "gn_b_ptr"}
AOT_FLOAT_ARGS = {"ln_eps", "gn_eps"}
AOT_ALIGNED_INTS = {"K", "N_out", "stride_wo"}
# Ints that are 1 at inputs the launchers take (one token per group, one feature in or out, one partial): the JIT specialises them to constants.
AOT_ONE_INTS = {"M_grp", "K", "N_out", "P"}
# The work of one iteration of each kernel's inner loop, for the compile report's per-1,024 figures
# (fast_unet/aot.py loop_tile): the K loop's BLOCK_M x BLOCK_N x BLOCK_K multiply-adds.
AOT_LOOP_TILES = {"_linear_kernel": (("BLOCK_M", "BLOCK_N", "BLOCK_K"), "MACs")}


def aot_builds():
    """[(kernel label, jit fn, config label, dtype name, constexprs, options)]: each config ``config``
    can pick, for each op's flags (linear_residual, ln_linear with and without GELU, gn_ln_linear with
    and without emb). The weight is read with stride_wi == 1 and emb with stride_ec == 1 (nn.Linear's
    weight; a column slice of the stacked time embedding), specialised as the JIT does."""
    ops = (("linear_residual", dict(PROLOGUE=0, HAS_EMB=False, GELU=False, RESIDUAL=True), ""),
           ("ln_linear", dict(PROLOGUE=1, HAS_EMB=False, GELU=False, RESIDUAL=False), ""),
           ("ln_linear", dict(PROLOGUE=1, HAS_EMB=False, GELU=True, RESIDUAL=False), " gelu"),
           ("gn_ln_linear", dict(PROLOGUE=2, HAS_EMB=True, GELU=False, RESIDUAL=False), " emb"),
           ("gn_ln_linear", dict(PROLOGUE=2, HAS_EMB=False, GELU=False, RESIDUAL=False), ""))
    out = []
    for dt in DTYPE_NAMES:
        kind = "float32" if dt == "float32" else "half"
        for bm, bn, bk, warps, stages in sorted({c for (k, _), c in CONFIGS.items() if k == kind}):
            for (name, flags, tag), (ieee, ptag) in itertools.product(ops, precisions(dt)):
                ce = dict(flags, stride_wi=1, stride_ec=1, IEEE=ieee, BLOCK_M=bm, BLOCK_N=bn,
                          BLOCK_K=bk, BLOCK_P=BLOCK_P)
                out.append((name, _linear_kernel, f"{dt} {bm}x{bn}x{bk} w{warps} s{stages}{tag}{ptag}", dt,
                            ce, dict(num_warps=warps, num_stages=stages)))
    return with_ones(with_fp32_params(out, AOT_PARAM_POINTERS), AOT_ONE_INTS)
