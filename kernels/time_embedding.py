"""Time embedding of every block in one launch: sinusoidal encoding, ReLU / SiLU, stacked Linear (Triton).

    enc[b, j]       = sin(t[b] * f_j)          for j <  dim/2,   f_j = 10000 ** (-2j / dim)
    enc[b, j]       = cos(t[b] * f_{j-dim/2})  for j >= dim/2
    down[b, o] = sum_j relu(enc[b, j]) * relu_weight[o, j] + relu_bias[o]    (the Down blocks, stacked)
    up[b, o]   = sum_j silu(enc[b, j]) * silu_weight[o, j] + silu_bias[o]    (the Up blocks, stacked)

t: (B,) integer or float timesteps (any stride); weights (C_*, dim) contiguous, biases (C_*,) float32 or
the weights' dtype (both the same), read in float32; outputs
(B, C_*) contiguous in the weights' dtype. The frequencies f_j come from a cached float32 table
(``freq_table``); t * f_j is rounded to float32 as in the eager op. As in the eager op the activated
encoding is rounded to the weights' dtype before the product, which accumulates in float32.

Forward: ``_temb_fwd_kernel``, grid (cdiv(B, BLOCK_B), cdiv(max(C_down, C_up), BLOCK_O), 2); axis 2
picks the ReLU/Down or the SiLU/Up half, so both outputs come from one launch.
Backward (weights and biases only; t has no gradient): ``_temb_bwd_kernel``, grid
(cdiv(max C, BLOCK_O), cdiv(dim, BLOCK_K), 2): d_weight = g^T @ act(enc), d_bias = sum_b g, looping
over the batch; the encoding is recomputed.
"""
import triton
import triton.language as tl

from ._common import DTYPE_NAMES, DTYPES, with_fp32_params, with_ones
from ._common import dot as _dot
from ._common import check_param, matmul_ieee, precisions
from ._common import relu as _relu


@triton.jit
def _sin_reduced(p):
    """sin(p) for p in [-pi, 3*pi/2]: folded into [-pi/2, pi/2], then an odd Taylor polynomial to p^15
    (error below 1e-9 there). Plain arithmetic: no libdevice slow path (its large-argument reduction
    keeps a local array, which shows up as stack use in the compile report)."""
    p = tl.where(p > 3.141592653589793, p - 6.283185307179586, p)
    p = tl.where(p > 1.5707963267948966, 3.141592653589793 - p, p)
    p = tl.where(p < -1.5707963267948966, -3.141592653589793 - p, p)
    p2 = p * p
    s = -7.647163731819816e-13
    s = s * p2 + 1.6059043836821613e-10
    s = s * p2 - 2.505210838544172e-08
    s = s * p2 + 2.7557319223985893e-06
    s = s * p2 - 0.0001984126984126984
    s = s * p2 + 0.008333333333333333
    s = s * p2 - 0.16666666666666666
    return p + p * p2 * s


@triton.jit
def _activated_encoding(t_ptr, stride_t, freq_ptr, rows, cols, B, dim, half, SILU):
    """act(enc) for a [rows, cols] tile, float32; zero outside (B, dim). SILU: SiLU, else ReLU.

    The argument t * f_j is rounded to float32 as in the eager op, then reduced modulo 2*pi in two
    steps (Cody-Waite) to r in [-pi, pi]; cos(r) = sin(r + pi/2)."""
    t = tl.load(t_ptr + rows * stride_t, mask=rows < B, other=0).to(tl.float32)
    j = tl.where(cols < half, cols, cols - half)
    freq = tl.load(freq_ptr + j, mask=cols < dim, other=0.0)
    arg = t[:, None] * freq[None, :]
    k = tl.floor(arg * 0.15915494309189535 + 0.5)
    r = (arg - k * 6.28125) - k * 0.0019353071795864769  # 2*pi = 6.28125 + 0.00193530717958647...
    enc = _sin_reduced(r + tl.where(cols < half, 0.0, 1.5707963267948966)[None, :])
    a = tl.where(SILU, enc / (1.0 + tl.exp(-enc)), _relu(enc))
    return tl.where((rows < B)[:, None] & (cols < dim)[None, :], a, 0.0)


@triton.jit
def _temb_fwd_kernel(
    t_ptr,  # (B,), stride stride_t
    freq_ptr,  # (dim // 2,) float32: f_j
    rw_ptr, rb_ptr, down_ptr,  # (C_down, dim), (C_down,), (B, C_down)
    sw_ptr, sb_ptr, up_ptr,  # (C_up, dim), (C_up,), (B, C_up)
    B, dim, C_down, C_up, stride_t,
    IEEE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    outs = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    which = tl.program_id(2)
    # C as a tensor on both sides: an int argument equal to 1 is a constant on a GPU, and a variable that is a
    # constant on one branch and a tensor on the other does not compile with every Triton
    C = tl.where(which == 0, C_down, C_up)
    if which == 0:
        w_ptr = rw_ptr
        b_ptr = rb_ptr
        o_ptr = down_ptr
    else:
        w_ptr = sw_ptr
        b_ptr = sb_ptr
        o_ptr = up_ptr
    if tl.program_id(1) * BLOCK_O < C:
        half = dim // 2
        acc = tl.zeros([BLOCK_B, BLOCK_O], dtype=tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            a = _activated_encoding(t_ptr, stride_t, freq_ptr, rows, cols, B, dim, half, which == 1)
            wt = tl.load(w_ptr + outs[None, :] * dim + cols[:, None],
                         mask=(outs < C)[None, :] & (cols < dim)[:, None], other=0.0)  # (BLOCK_K, BLOCK_O)
            acc += _dot(a.to(wt.dtype), wt, IEEE)
        bias = tl.load(b_ptr + outs, mask=outs < C, other=0.0).to(tl.float32)
        acc += bias[None, :]
        tl.store(o_ptr + rows[:, None] * C + outs[None, :], acc.to(o_ptr.dtype.element_ty),
                 mask=(rows < B)[:, None] & (outs < C)[None, :])


@triton.jit
def _temb_bwd_kernel(
    t_ptr, freq_ptr,
    gd_ptr, gu_ptr,  # (B, C_down), (B, C_up) contiguous: gradients of the outputs
    drw_ptr, drb_ptr, dsw_ptr, dsb_ptr,  # (C_*, dim), (C_*,) float32
    B, dim, C_down, C_up, stride_t,
    IEEE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):
    outs = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    which = tl.program_id(2)
    C = tl.where(which == 0, C_down, C_up)  # a tensor on both sides (see _temb_fwd_kernel)
    if which == 0:
        g_ptr = gd_ptr
        dw_ptr = drw_ptr
        db_ptr = drb_ptr
    else:
        g_ptr = gu_ptr
        dw_ptr = dsw_ptr
        db_ptr = dsb_ptr
    if tl.program_id(0) * BLOCK_O < C:
        half = dim // 2
        dw = tl.zeros([BLOCK_O, BLOCK_K], dtype=tl.float32)
        db = tl.zeros([BLOCK_O], dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + tl.arange(0, BLOCK_B)
            a = _activated_encoding(t_ptr, stride_t, freq_ptr, rows, cols, B, dim, half, which == 1)
            gt = tl.load(g_ptr + rows[None, :] * C + outs[:, None],
                         mask=(rows < B)[None, :] & (outs < C)[:, None], other=0.0)  # (BLOCK_O, BLOCK_B)
            dw += _dot(gt, a.to(gt.dtype), IEEE)
            db += tl.sum(gt.to(tl.float32), axis=1)
        tl.store(dw_ptr + outs[:, None] * dim + cols[None, :], dw, mask=(outs < C)[:, None] & (cols < dim)[None, :])
        if tl.program_id(1) == 0:
            tl.store(db_ptr + outs, db, mask=outs < C)


# ----------------------------------------------------------------------------------------------------
# Launchers.

import torch  # noqa: E402

# From the compile report: 16x64x64 tiles, or software pipelining, reached 255 registers / spilled.
FWD_CONFIG = dict(BLOCK_B=16, BLOCK_O=64, BLOCK_K=32, num_warps=4, num_stages=1)
BWD_CONFIG = dict(BLOCK_B=16, BLOCK_O=64, BLOCK_K=32, num_warps=4, num_stages=1)


_FREQ = {}


def freq_table(dim, device):
    """f_j = 10000 ** (-2j / dim), j < dim/2, float32 correctly rounded (computed in float64), cached per
    (dim, device). Built on the device itself by torch ops, so no CPU tensor and no host-device copy is
    made, even on the first call; after it nothing is (CUDA-graph capture after a warm-up sees no copy)."""
    device = torch.device(device)
    key = (dim, device)
    table = _FREQ.get(key)
    if table is None:
        j = torch.arange(0, dim, 2, dtype=torch.float64, device=device)
        table = _FREQ[key] = torch.reciprocal(torch.pow(10000.0, j / dim)).to(torch.float32)
    return table


def check_time_embedding(t, dim, relu_weight, relu_bias, silu_weight, silu_bias):
    """Validate the launcher's arguments; errors name the argument."""
    if not isinstance(dim, int) or dim <= 0 or dim % 2:
        raise ValueError(f"dim must be a positive even int, got {dim!r}")
    if t.dim() != 1:
        raise ValueError(f"t must be 1-D (B,) timesteps, got shape {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"t must hold integer or float timesteps, got {t.dtype}")
    for name, w, bias in (("relu_weight", relu_weight, relu_bias), ("silu_weight", silu_weight, silu_bias)):
        bname = name.replace("weight", "bias")
        if w.dim() != 2 or w.shape[1] != dim:
            raise ValueError(f"{name} must be (C, dim={dim}), got shape {tuple(w.shape)}")
        if bias.shape != (w.shape[0],):
            raise ValueError(f"{bname} must have shape ({w.shape[0]},) to match {name}, got {tuple(bias.shape)}")
        if w.dtype not in DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {w.dtype}")
        if w.dtype != relu_weight.dtype:
            raise TypeError(f"{name} must share relu_weight's dtype {relu_weight.dtype}, got {w.dtype}")
        check_param(bname, bias, w, name)
        if bias.dtype != relu_bias.dtype:  # one kernel reads either through one pointer type
            raise TypeError(f"{bname} must share relu_bias's dtype {relu_bias.dtype}, got {bias.dtype}")
        for n, p in ((name, w), (bname, bias)):
            if p.device != t.device:
                raise ValueError(f"{n} is on {p.device} but t is on {t.device}")


def time_embedding_fwd(t, dim, relu_weight, relu_bias, silu_weight, silu_bias):
    """Returns (down (B, C_down), up (B, C_up)) in the weights' dtype."""
    check_time_embedding(t, dim, relu_weight, relu_bias, silu_weight, silu_bias)
    B = t.shape[0]
    rw, rb, sw, sb = (p.contiguous() for p in (relu_weight, relu_bias, silu_weight, silu_bias))
    cd, cu = rw.shape[0], sw.shape[0]
    down = torch.empty((B, cd), device=t.device, dtype=rw.dtype)
    up = torch.empty((B, cu), device=t.device, dtype=rw.dtype)
    if B == 0 or max(cd, cu) == 0:
        return down, up
    cfg = FWD_CONFIG
    grid = (triton.cdiv(B, cfg["BLOCK_B"]), triton.cdiv(max(cd, cu), cfg["BLOCK_O"]), 2)
    _temb_fwd_kernel[grid](t, freq_table(dim, t.device), rw, rb, down, sw, sb, up, B, dim, cd, cu, t.stride(0),
                           IEEE=matmul_ieee(rw.dtype), **cfg)
    return down, up


def time_embedding_bwd(g_down, g_up, t, dim, relu_weight, silu_weight):
    """Returns (d relu_weight, d relu_bias, d silu_weight, d silu_bias), float32."""
    B = t.shape[0]
    cd, cu = relu_weight.shape[0], silu_weight.shape[0]
    g_down = g_down.to(relu_weight.dtype).contiguous()
    g_up = g_up.to(relu_weight.dtype).contiguous()
    dev = t.device
    drw = torch.zeros((cd, dim), device=dev, dtype=torch.float32)
    drb = torch.zeros((cd,), device=dev, dtype=torch.float32)
    dsw = torch.zeros((cu, dim), device=dev, dtype=torch.float32)
    dsb = torch.zeros((cu,), device=dev, dtype=torch.float32)
    if B == 0 or max(cd, cu) == 0:
        return drw, drb, dsw, dsb
    cfg = BWD_CONFIG
    grid = (triton.cdiv(max(cd, cu), cfg["BLOCK_O"]), triton.cdiv(dim, cfg["BLOCK_K"]), 2)
    _temb_bwd_kernel[grid](t, freq_table(dim, t.device), g_down, g_up, drw, drb, dsw, dsb, B, dim, cd, cu, t.stride(0),
                           IEEE=matmul_ieee(relu_weight.dtype), **cfg)
    return drw, drb, dsw, dsb


# ----------------------------------------------------------------------------------------------------
# Declarations: the pointer arguments each kernel writes (bench.kernels splits a launch's bytes into read
# and written with them), and the builds of the ahead-of-time compile report (fast_unet/aot.py).

WRITES = {
    "_temb_fwd_kernel": {"down_ptr", "up_ptr"},
    "_temb_bwd_kernel": {"drw_ptr", "drb_ptr", "dsw_ptr", "dsb_ptr"},
}

# Signature hints: float32 pointers (other pointers take the build's dtype; t_ptr's type is set per
# build), float scalars (other scalars are i32), integers that are multiples of 16 at the model's shapes
# (none: the only stride, t's, is 1).
AOT_FP32_POINTERS = {"freq_ptr", "drw_ptr", "drb_ptr", "dsw_ptr", "dsb_ptr"}
# (C,) parameter pointers (and their gradients'): float32 or the build's dtype; the builds take both
# (``_common.with_fp32_params``: float32 is autocast's case).
AOT_PARAM_POINTERS = {"rb_ptr", "sb_ptr"}
AOT_FLOAT_ARGS = set()
AOT_ALIGNED_INTS = set()
# Ints that are 1 at inputs the launchers take (a batch of one, one output channel, t's unit stride): the JIT specialises them to constants.
AOT_ONE_INTS = {"B", "C_down", "C_up", "stride_t"}
# The work of one iteration of each kernel's inner loop, for the compile report's per-1,024 figures
# (fast_unet/aot.py loop_tile): the GEMM loops' multiply-adds.
AOT_LOOP_TILES = {"_temb_fwd_kernel": (("BLOCK_B", "BLOCK_O", "BLOCK_K"), "MACs"),
                  "_temb_bwd_kernel": (("BLOCK_O", "BLOCK_B", "BLOCK_K"), "MACs")}


def aot_builds():
    """[(kernel label, jit fn, config label, dtype name, constexprs, options)]: ``FWD_CONFIG`` and
    ``BWD_CONFIG`` per weight dtype, for int64, int32 and float32 timesteps (t's dtype is part of the
    JIT's key): the option ``arg_types`` gives t_ptr's type."""
    out = []
    for dt in DTYPE_NAMES:
        for name, fn, tcfg in (("temb_fwd", _temb_fwd_kernel, FWD_CONFIG), ("temb_bwd", _temb_bwd_kernel, BWD_CONFIG)):
            ce = {k: v for k, v in tcfg.items() if k.startswith("BLOCK")}
            opts = {k: v for k, v in tcfg.items() if k.startswith("num_")}
            for t_type in ("i64", "i32", "fp32"):
                for ieee, tag in precisions(dt):
                    label = (f"{dt} t:{t_type} {ce['BLOCK_B']}x{ce['BLOCK_O']}x{ce['BLOCK_K']} "
                             f"w{opts['num_warps']} s{opts['num_stages']}{tag}")
                    out.append((name, fn, label, dt, dict(ce, IEEE=ieee),
                                dict(opts, arg_types={"t_ptr": "*" + t_type})))
    return with_ones(with_fp32_params(out, AOT_PARAM_POINTERS), AOT_ONE_INTS)
