"""Time embedding of every block in one launch: sinusoidal encoding, ReLU / SiLU, each block's Linear (Triton).

    enc[b, j]       = sin(t[b] * f_j)          for j <  dim/2,   f_j = 10000 ** (-2j / dim)
    enc[b, j]       = cos(t[b] * f_{j-dim/2})  for j >= dim/2
    down_i[b, o] = sum_j relu(enc[b, j]) * relu_weight[i][o, j] + relu_bias[i][o]    (Down block i)
    up_i[b, o]   = sum_j silu(enc[b, j]) * silu_weight[i][o, j] + silu_bias[i][o]    (Up block i)

t: (B,) integer or float timesteps (any stride); weights: one (C_i, dim) tensor per block, contiguous,
all of one dtype, read where they are (no stacked copy); biases (C_i,) float32 or the weights' dtype (all
the same), read in float32; outputs one (B, C_i) contiguous tensor per block in the weights' dtype. The
frequencies f_j come from a cached float32 table (``freq_table``); t * f_j is rounded to float32 as in
the eager op. As in the eager op the encoding is rounded to the weights' dtype, then activated and the
activation rounded to that dtype again before the product, which accumulates in float32.

Each launch takes six slots of pointers: three Down blocks (ReLU) and three Up blocks (SiLU); a slot
with C_i = 0 is empty, and more than three blocks per side take one launch per three (the model's three
and three: one launch each way).
Forward: ``_temb_fwd_kernel``, grid (cdiv(B, BLOCK_B), cdiv(max C_i, BLOCK_O), 6); axis 2 picks the slot.
Backward (weights and biases only; t has no gradient): ``_temb_bwd_kernel``, grid
(cdiv(max C_i, BLOCK_O), cdiv(dim, BLOCK_K), 6): d_weight_i = g_i^T @ act(enc), d_bias_i = sum_b g_i,
looping over the batch (the encoding recomputed), each stored whole in its parameter's dtype.
"""
import triton
import triton.language as tl

from ._common import DTYPE_NAMES, DTYPES, with_fp32_params, with_ones
from ._common import dot as _dot
from ._common import check_param, matmul_ieee, precisions
from ._common import to_dtype as _to
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
def _activated_encoding(t_ptr, stride_t, freq_ptr, rows, cols, B, dim, half, SILU, DTYPE: tl.constexpr):
    """act(enc) for a [rows, cols] tile, float32; zero outside (B, dim). SILU: SiLU, else ReLU.

    The argument t * f_j is rounded to float32 as in the eager op, then reduced modulo 2*pi in two
    steps (Cody-Waite) to r in [-pi, pi]; cos(r) = sin(r + pi/2). The encoding is rounded to DTYPE (the
    weights') before the activation, as the eager op rounds it (``enc.to(weight.dtype)``, then ReLU/SiLU):
    for SiLU, silu(round(enc)) and round(silu(enc)) differ in about half the elements at bf16."""
    t = tl.load(t_ptr + rows * stride_t, mask=rows < B, other=0).to(tl.float32)
    j = tl.where(cols < half, cols, cols - half)
    freq = tl.load(freq_ptr + j, mask=cols < dim, other=0.0)
    arg = t[:, None] * freq[None, :]
    k = tl.floor(arg * 0.15915494309189535 + 0.5)
    r = (arg - k * 6.28125) - k * 0.0019353071795864769  # 2*pi = 6.28125 + 0.00193530717958647...
    enc = _sin_reduced(r + tl.where(cols < half, 0.0, 1.5707963267948966)[None, :])
    enc = _to(enc, DTYPE).to(tl.float32)
    a = tl.where(SILU, enc / (1.0 + tl.exp(-enc)), _relu(enc))
    return tl.where((rows < B)[:, None] & (cols < dim)[None, :], a, 0.0)


@triton.jit
def _slot_params(slot, p0, p1, p2, p3, p4, p5):
    """The one of six pointers that ``slot`` (0-5) names."""
    if slot == 0:
        p = p0
    elif slot == 1:
        p = p1
    elif slot == 2:
        p = p2
    elif slot == 3:
        p = p3
    elif slot == 4:
        p = p4
    else:
        p = p5
    return p


@triton.jit
def _slot_int(slot, c0, c1, c2, c3, c4, c5):
    """The one of six ints that ``slot`` names, as a tensor whichever of them the JIT made constants (an int
    equal to 1 is a constant on a GPU; a variable that is a constant on one branch and a tensor on another
    does not compile with every Triton)."""
    return tl.where(slot == 0, c0, tl.where(slot == 1, c1, tl.where(slot == 2, c2, tl.where(
        slot == 3, c3, tl.where(slot == 4, c4, c5)))))


@triton.jit
def _temb_fwd_kernel(
    t_ptr,  # (B,), stride stride_t
    freq_ptr,  # (dim // 2,) float32: f_j
    # (C_i, dim) contiguous: slots 0-2 the Down blocks' (ReLU), 3-5 the Up blocks' (SiLU)
    w0_ptr, w1_ptr, w2_ptr, w3_ptr, w4_ptr, w5_ptr,
    b0_ptr, b1_ptr, b2_ptr, b3_ptr, b4_ptr, b5_ptr,  # (C_i,)
    o0_ptr, o1_ptr, o2_ptr, o3_ptr, o4_ptr, o5_ptr,  # (B, C_i) contiguous
    B, dim, C0, C1, C2, C3, C4, C5, stride_t,  # C_i = 0: an empty slot
    IEEE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    outs = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    slot = tl.program_id(2)
    C = _slot_int(slot, C0, C1, C2, C3, C4, C5)
    w_ptr = _slot_params(slot, w0_ptr, w1_ptr, w2_ptr, w3_ptr, w4_ptr, w5_ptr)
    b_ptr = _slot_params(slot, b0_ptr, b1_ptr, b2_ptr, b3_ptr, b4_ptr, b5_ptr)
    o_ptr = _slot_params(slot, o0_ptr, o1_ptr, o2_ptr, o3_ptr, o4_ptr, o5_ptr)
    if tl.program_id(1) * BLOCK_O < C:
        half = dim // 2
        acc = tl.zeros([BLOCK_B, BLOCK_O], dtype=tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            a = _activated_encoding(t_ptr, stride_t, freq_ptr, rows, cols, B, dim, half, slot >= 3,
                                    w_ptr.dtype.element_ty)
            wt = tl.load(w_ptr + outs[None, :] * dim + cols[:, None],
                         mask=(outs < C)[None, :] & (cols < dim)[:, None], other=0.0)  # (BLOCK_K, BLOCK_O)
            acc += _dot(_to(a, wt.dtype), wt, IEEE)
        bias = tl.load(b_ptr + outs, mask=outs < C, other=0.0).to(tl.float32)
        acc += bias[None, :]
        tl.store(o_ptr + rows[:, None] * C + outs[None, :], _to(acc, o_ptr.dtype.element_ty),
                 mask=(rows < B)[:, None] & (outs < C)[None, :])


@triton.jit
def _temb_bwd_kernel(
    t_ptr, freq_ptr,
    g0_ptr, g1_ptr, g2_ptr, g3_ptr, g4_ptr, g5_ptr,  # (B, C_i) contiguous: the outputs' gradients (slots as forward)
    dw0_ptr, dw1_ptr, dw2_ptr, dw3_ptr, dw4_ptr, dw5_ptr,  # (C_i, dim): the weights' gradients, in their dtype
    db0_ptr, db1_ptr, db2_ptr, db3_ptr, db4_ptr, db5_ptr,  # (C_i,): the biases' gradients, in their dtype
    B, dim, C0, C1, C2, C3, C4, C5, stride_t,
    IEEE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
):
    outs = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    slot = tl.program_id(2)
    C = _slot_int(slot, C0, C1, C2, C3, C4, C5)
    g_ptr = _slot_params(slot, g0_ptr, g1_ptr, g2_ptr, g3_ptr, g4_ptr, g5_ptr)
    dw_ptr = _slot_params(slot, dw0_ptr, dw1_ptr, dw2_ptr, dw3_ptr, dw4_ptr, dw5_ptr)
    db_ptr = _slot_params(slot, db0_ptr, db1_ptr, db2_ptr, db3_ptr, db4_ptr, db5_ptr)
    if tl.program_id(0) * BLOCK_O < C:
        half = dim // 2
        dw = tl.zeros([BLOCK_O, BLOCK_K], dtype=tl.float32)
        db = tl.zeros([BLOCK_O], dtype=tl.float32)
        for r0 in range(0, B, BLOCK_B):
            rows = r0 + tl.arange(0, BLOCK_B)
            a = _activated_encoding(t_ptr, stride_t, freq_ptr, rows, cols, B, dim, half, slot >= 3,
                                    g_ptr.dtype.element_ty)
            gt = tl.load(g_ptr + rows[None, :] * C + outs[:, None],
                         mask=(rows < B)[None, :] & (outs < C)[:, None], other=0.0)  # (BLOCK_O, BLOCK_B)
            dw += _dot(gt, _to(a, gt.dtype), IEEE)
            db += tl.sum(gt.to(tl.float32), axis=1)
        # every (C_i, dim) element and every bias element is written once, whole: no zero-fill, no cast after
        tl.store(dw_ptr + outs[:, None] * dim + cols[None, :], _to(dw, dw_ptr.dtype.element_ty),
                 mask=(outs < C)[:, None] & (cols < dim)[None, :])
        if tl.program_id(1) == 0:
            tl.store(db_ptr + outs, _to(db, db_ptr.dtype.element_ty), mask=outs < C)


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


SLOTS = 3  # blocks per side in one launch; more take one launch per three


def _names(name, n):
    return [name if n == 1 else f"{name}[{i}]" for i in range(n)]


def check_time_embedding(t, dim, relu_weights, relu_biases, silu_weights, silu_biases):
    """Validate the launcher's arguments (each parameter argument a list: one tensor per block); errors
    name the argument (``relu_weight``, or ``relu_weight[i]`` where there are several)."""
    if not isinstance(dim, int) or dim <= 0 or dim % 2:
        raise ValueError(f"dim must be a positive even int, got {dim!r}")
    if t.dim() != 1:
        raise ValueError(f"t must be 1-D (B,) timesteps, got shape {tuple(t.shape)}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"t must hold integer or float timesteps, got {t.dtype}")
    first_w, first_b = relu_weights[0] if relu_weights else None, relu_biases[0] if relu_biases else None
    for side, ws, bs in (("relu", relu_weights, relu_biases), ("silu", silu_weights, silu_biases)):
        if not ws or len(ws) != len(bs):
            raise ValueError(f"{side}_weight and {side}_bias must hold one tensor per block, as many of each "
                             f"(at least one), got {len(ws)} and {len(bs)}")
        for name, bname, w, bias in zip(_names(f"{side}_weight", len(ws)), _names(f"{side}_bias", len(bs)), ws, bs):
            if w.dim() != 2 or w.shape[1] != dim:
                raise ValueError(f"{name} must be (C, dim={dim}), got shape {tuple(w.shape)}")
            if bias.shape != (w.shape[0],):
                raise ValueError(f"{bname} must have shape ({w.shape[0]},) to match {name}, got {tuple(bias.shape)}")
            if w.dtype not in DTYPES:
                raise TypeError(f"{name} must be float32, bfloat16 or float16, got {w.dtype}")
            if w.dtype != first_w.dtype:
                raise TypeError(f"{name} must share relu_weight's dtype {first_w.dtype}, got {w.dtype}")
            check_param(bname, bias, w, name)
            if bias.dtype != first_b.dtype:  # one kernel reads either through one pointer type
                raise TypeError(f"{bname} must share relu_bias's dtype {first_b.dtype}, got {bias.dtype}")
            for n, p in ((name, w), (bname, bias)):
                if p.device != t.device:
                    raise ValueError(f"{n} is on {p.device} but t is on {t.device}")


def _chunks(downs, ups):
    """The (down slots, up slots) of each launch: up to ``SLOTS`` blocks per side, the rest of the slots
    None (empty: C = 0)."""
    n = max(len(downs), len(ups))
    out = []
    for i in range(0, n, SLOTS):
        d, u = list(downs[i:i + SLOTS]), list(ups[i:i + SLOTS])
        out.append((d + [None] * (SLOTS - len(d)), u + [None] * (SLOTS - len(u))))
    return out


def _slot_args(tensors, fill):
    """Six pointer arguments: the slots' tensors, ``fill`` (any tensor of the same dtype) for the empty ones."""
    return [fill if x is None else x for x in tensors]


def time_embedding_fwd(t, dim, relu_weights, relu_biases, silu_weights, silu_biases):
    """Returns (downs, ups): one (B, C_i) contiguous tensor per block, in the weights' dtype. The weights
    are read where they are (no stacked copy): one launch per ``SLOTS`` blocks of each side."""
    check_time_embedding(t, dim, relu_weights, relu_biases, silu_weights, silu_biases)
    B = t.shape[0]
    ws = [w.contiguous() for w in list(relu_weights) + list(silu_weights)]
    bs = [b.contiguous() for b in list(relu_biases) + list(silu_biases)]
    nd = len(relu_weights)
    outs = [torch.empty((B, w.shape[0]), device=t.device, dtype=ws[0].dtype) for w in ws]
    cfg = FWD_CONFIG
    for (dw, uw), (db, ub), (do, uo) in zip(_chunks(ws[:nd], ws[nd:]), _chunks(bs[:nd], bs[nd:]),
                                           _chunks(outs[:nd], outs[nd:])):
        cs = [0 if w is None else w.shape[0] for w in dw + uw]
        if B == 0 or max(cs) == 0:
            continue
        grid = (triton.cdiv(B, cfg["BLOCK_B"]), triton.cdiv(max(cs), cfg["BLOCK_O"]), 2 * SLOTS)
        _temb_fwd_kernel[grid](t, freq_table(dim, t.device), *_slot_args(dw + uw, ws[0]), *_slot_args(db + ub, bs[0]),
                               *_slot_args(do + uo, outs[0]), B, dim, *cs, t.stride(0),
                               IEEE=matmul_ieee(ws[0].dtype), **cfg)
    return outs[:nd], outs[nd:]


def time_embedding_bwd(g_downs, g_ups, t, dim, relu_weights, relu_biases, silu_weights, silu_biases):
    """Returns (d relu_weights, d relu_biases, d silu_weights, d silu_biases): lists, each gradient in its
    parameter's dtype, written whole by the kernel (no zero-fill, no cast)."""
    B = t.shape[0]
    ws = list(relu_weights) + list(silu_weights)
    bs = list(relu_biases) + list(silu_biases)
    nd = len(relu_weights)
    gs = [g.to(w.dtype).contiguous() for g, w in zip(list(g_downs) + list(g_ups), ws)]
    if B == 0:
        dws = [torch.zeros(w.shape, device=w.device, dtype=w.dtype) for w in ws]
        dbs = [torch.zeros(b.shape, device=b.device, dtype=b.dtype) for b in bs]
    else:
        dws = [torch.empty(w.shape, device=w.device, dtype=w.dtype) for w in ws]
        dbs = [torch.empty(b.shape, device=b.device, dtype=b.dtype) for b in bs]
        cfg = BWD_CONFIG
        for (dg, ug), (ddw, udw), (ddb, udb) in zip(_chunks(gs[:nd], gs[nd:]), _chunks(dws[:nd], dws[nd:]),
                                                  _chunks(dbs[:nd], dbs[nd:])):
            cs = [0 if g is None else g.shape[1] for g in dg + ug]
            if max(cs) == 0:
                continue
            grid = (triton.cdiv(max(cs), cfg["BLOCK_O"]), triton.cdiv(dim, cfg["BLOCK_K"]), 2 * SLOTS)
            _temb_bwd_kernel[grid](t, freq_table(dim, t.device), *_slot_args(dg + ug, gs[0]),
                                   *_slot_args(ddw + udw, dws[0]), *_slot_args(ddb + udb, dbs[0]),
                                   B, dim, *cs, t.stride(0), IEEE=matmul_ieee(ws[0].dtype), **cfg)
    return dws[:nd], dbs[:nd], dws[nd:], dbs[nd:]


# ----------------------------------------------------------------------------------------------------
# Declarations: the pointer arguments each kernel writes (bench.kernels splits a launch's bytes into read
# and written with them), and the builds of the ahead-of-time compile report (fast_unet/aot.py).

WRITES = {
    "_temb_fwd_kernel": {f"o{i}_ptr" for i in range(6)},
    "_temb_bwd_kernel": {f"{p}{i}_ptr" for p in ("dw", "db") for i in range(6)},
}

# Signature hints: float32 pointers (other pointers take the build's dtype; t_ptr's type is set per
# build), float scalars (other scalars are i32), integers that are multiples of 16 at the model's shapes
# (none: the only stride, t's, is 1).
AOT_FP32_POINTERS = {"freq_ptr"}
# (C,) parameter pointers (and their gradients'): float32 or the build's dtype; the builds take both
# (``_common.with_fp32_params``: float32 is autocast's case).
AOT_PARAM_POINTERS = {f"{p}{i}_ptr" for p in ("b", "db") for i in range(6)}
AOT_FLOAT_ARGS = set()
AOT_ALIGNED_INTS = set()
# Ints that are 1 at inputs the launchers take (a batch of one, one output channel, t's unit stride): the JIT
# specialises them to constants.
AOT_ONE_INTS = {"B", "C0", "C1", "C2", "C3", "C4", "C5", "stride_t"}
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
