"""Flash attention over the packed QKV projection, forward and backward (Triton).

qkv: (B, N, 3, heads, D), any strides (the model passes a view of the in_proj output; nothing is
transposed or copied): Q = qkv[:, :, 0], K = qkv[:, :, 1], V = qkv[:, :, 2]. D in {16, 32, 64}.
Output o: (B, N, heads * D) contiguous, the layout out_proj reads. Scale 1/sqrt(D).

Softmax is online, in float32, in base 2: scores are multiplied by ``qk_scale = scale * log2(e)`` and
exponentiated with exp2. The forward saves only ``lse`` (B, heads, N) float32, the row log-sum-exp in
that base-2 domain (``lse = m + log2(l)``), so the backward recomputes P = exp2(S * qk_scale - lse).
At bf16/fp16, head dim 16 and 32 (``fwd_fast_softmax``) the forward takes its row sums from the tensor
cores and a quarter of its exponentials from a polynomial on the FMA units (``_fwd_tile``).

Backward (FlashAttention-2's structure), by default three launches:
1. ``_attn_bwd_preprocess``: delta = rowsum(dO * O), (B, heads, N) float32, and a zeroed float32 dQ
   (B, heads, N, D);
2. ``_attn_bwd``: one program per (key tile, batch*head) loops over all query tiles, recomputes P once,
   writes dK and dV and adds its share of dQ by relaxed atomic adds;
3. ``_attn_bwd_dq_cast``: dQ scaled and cast into dqkv.
Under ``torch.use_deterministic_algorithms(True)`` the backward takes the two-kernel path instead
(``_attn_bwd`` without its dQ, then ``_attn_bwd_dq`` by query tile, recomputing P): no atomics,
bit-reproducible. dQ, dK, dV land in dqkv (B, N, 3, heads, D), the gradient of the packed input.

Any N. Every kernel with a loop over tiles takes ``EVEN_N`` (N a multiple of both tiles, the model's case
at every size from 16x16 up: no load, score or store is masked); otherwise every tile is masked (loads
return 0, scores -inf, probabilities 0). Peeling the last, partial tile off the loop instead doubles the
loop body in the binary, and the float32 and d = 64 builds then spill (10 of them on sm_80/sm_90).
float32 inputs follow PyTorch's matmul TF32 setting (``_common.matmul_ieee``: ``input_precision="ieee"``
dots at "highest", the default; TF32 at "high"/"medium"), bf16/fp16 the tensor cores.
"""
import math

import triton
import triton.language as tl

from ._common import DTYPE_NAMES, DTYPES, with_ones
from ._common import dot as _dot
from ._common import matmul_ieee, precisions
from ._common import max_nan as _max_nan
from ._common import maximum as _maximum

LOG2E = 1.4426950408889634


@triton.jit
def _exp2_poly(x):
    """2^x for x <= 0 on the FMA units (no SFU): x clamped to -125 (the result stays a normal float; exp2
    gives 0 below about -126, this 2^-125), rounded to the nearest integer j by the 1.5 * 2^23 shift, 2^(x - j)
    by a degree-3 polynomial on [-0.5, 0.5] (relative error under 1.1e-4), and j added to the exponent bits."""
    x = tl.maximum(x, -125.0)
    t = x + 12582912.0  # 1.5 * 2^23: j = round(x) sits in t's low mantissa bits
    f = x - (t - 12582912.0)
    p = ((0.05500858144333978 * f + 0.24221037434204815) * f + 0.6932829004942704) * f + 1.0
    bits = p.to(tl.int32, bitcast=True) + (t.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _exp2_quarter_poly(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """exp2 of a score tile (BLOCK_M, BLOCK_N), a quarter of it (the odd columns of the upper half) by
    ``_exp2_poly`` on the FMA units and the rest by the SFU. The two splits are on column bits that a
    tensor-core accumulator keeps in one thread's registers (the lowest and the highest)."""
    halves = tl.reshape(x, (BLOCK_M, 2, BLOCK_N // 2)).permute(0, 2, 1)
    lo, hi = tl.split(halves)
    even, odd = tl.split(tl.reshape(hi, (BLOCK_M, BLOCK_N // 4, 2)))
    hi = tl.reshape(tl.join(tl.math.exp2(even), _exp2_poly(odd)), (BLOCK_M, BLOCK_N // 2))
    return tl.reshape(tl.join(tl.math.exp2(lo), hi).permute(0, 2, 1), (BLOCK_M, BLOCK_N))


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_base, v_base, start_n, N, qk_scale, stride_n, stride_d,
              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr,
              FAST_SOFTMAX: tl.constexpr):
    """One key tile of the online softmax. Scores stay unscaled: the running max m_i is in the scaled
    base-2 domain (max(s) * qk_scale, qk_scale > 0), so p = exp2(s * qk_scale - m) is one FMA and one
    exp2 per score. ``MASKED``: the tile reaches past N (columns past N load 0 and score -inf).

    ``FAST_SOFTMAX`` (``fwd_fast_softmax``): the row sums come from the tensor cores, P (rounded to the
    dtype of V, as the PV product takes it) times a (BLOCK_N, 16) tile of ones, accumulated in a
    (BLOCK_M, 16) l_i whose 16 columns are equal; and a quarter of the exponentials run on the FMA units
    (``_exp2_quarter_poly``). Both move work off the units that bound the loop, the SFU's exp2 and the
    FADDs of the row sum; the sums are then those of the P that multiplies V."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kt_ptrs = k_base + offs_n[None, :] * stride_n + offs_d[:, None] * stride_d  # K^T tile (D, BLOCK_N)
    v_ptrs = v_base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d
    if MASKED:
        n_mask = offs_n < N
        kt = tl.load(kt_ptrs, mask=n_mask[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=n_mask[:, None], other=0.0)
        s = tl.where(n_mask[None, :], _dot(q, kt, IEEE), float("-inf"))
    else:
        kt = tl.load(kt_ptrs)
        v = tl.load(v_ptrs)
        s = _dot(q, kt, IEEE)
    m_new = _maximum(m_i, _max_nan(s, 1) * qk_scale)  # NaN propagates, as in SDPA (masked columns are -inf)
    x = s * qk_scale - m_new[:, None]
    if FAST_SOFTMAX:
        p = _exp2_quarter_poly(x, BLOCK_M, BLOCK_N)
    else:
        p = tl.math.exp2(x)
    alpha = tl.math.exp2(m_i - m_new)
    pv = p.to(v.dtype)
    if FAST_SOFTMAX:
        l_i = l_i * alpha[:, None] + _dot(pv, tl.full((BLOCK_N, 16), 1.0, tl.float32).to(v.dtype), IEEE)
    else:
        l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(pv, v, IEEE)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd(
    qkv_ptr,  # (B, N, 3, H, D), strides below
    o_ptr,  # (B, N, H * D) contiguous
    lse_ptr,  # (B, H, N) float32
    qk_scale, N, H,
    stride_b, stride_n, stride_t, stride_h, stride_d,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, EVEN_N: tl.constexpr,
    FAST_SOFTMAX: tl.constexpr,
):
    """``EVEN_N``: N is a multiple of BLOCK_M and BLOCK_N, and no load or score is masked.
    ``FAST_SOFTMAX``: see ``_fwd_tile``."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    base = qkv_ptr + b.to(tl.int64) * stride_b + h * stride_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_mask = offs_m < N
    q_ptrs = base + offs_m[:, None] * stride_n + offs_d[None, :] * stride_d
    if EVEN_N:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=m_mask[:, None], other=0.0)
    k_base = base + stride_t
    v_base = base + 2 * stride_t
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if FAST_SOFTMAX:
        l_i = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
    else:
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, start_n, N, qk_scale, stride_n, stride_d,
                                  D, BLOCK_M, BLOCK_N, IEEE, not EVEN_N, FAST_SOFTMAX)
    if FAST_SOFTMAX:
        l_i = tl.max(l_i, 1)
    acc = acc / l_i[:, None]
    o_offs = (b.to(tl.int64) * N + offs_m[:, None]) * (H * D) + h * D + offs_d[None, :]
    lse_offs = bh.to(tl.int64) * N + offs_m
    if EVEN_N:
        tl.store(o_ptr + o_offs, acc.to(o_ptr.dtype.element_ty))
        tl.store(lse_ptr + lse_offs, m_i + tl.math.log2(l_i))
    else:
        tl.store(o_ptr + o_offs, acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None])
        tl.store(lse_ptr + lse_offs, m_i + tl.math.log2(l_i), mask=m_mask)


@triton.jit
def _attn_bwd_preprocess(
    o_ptr, do_ptr,  # (B, N, H * D) contiguous
    delta_ptr,  # (B, H, N) float32
    dq_ptr,  # (B, H, N, D) float32: zeroed here when ZERO_DQ (the one-pass backward adds into it)
    N, H,
    D: tl.constexpr, BLOCK_M: tl.constexpr, ZERO_DQ: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_mask = offs_m < N
    offs = (b.to(tl.int64) * N + offs_m[:, None]) * (H * D) + h * D + offs_d[None, :]
    o = tl.load(o_ptr + offs, mask=m_mask[:, None], other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=m_mask[:, None], other=0.0).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * N + offs_m, tl.sum(o * do, axis=1), mask=m_mask)
    if ZERO_DQ:
        dq_offs = (bh.to(tl.int64) * N + offs_m[:, None]) * D + offs_d[None, :]
        tl.store(dq_ptr + dq_offs, tl.zeros([BLOCK_M, D], dtype=tl.float32), mask=m_mask[:, None])


@triton.jit
def _bwd_tile(dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, dq_ptr, start_m, N, qk_scale, stride_n,
              stride_d, HD, D: tl.constexpr, BLOCK_M: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr,
              ADD_DQ: tl.constexpr, ROWS_Q: tl.constexpr):
    """One query tile against the program's key tile: P recomputed once (one FMA and one exp2 per score),
    dV += P^T dO, dK += dS^T Q, and with ``ADD_DQ`` the tile's dQ share dS K added into the float32 dQ
    (relaxed atomics). Rows past N (``MASKED``) load as 0: their scores are 0, their dO, delta and dS
    rows 0, so they add nothing; ``lse_ptr``, ``delta_ptr`` and ``dq_ptr`` are already at this (b, h).

    ``ROWS_Q``: the scores as S (queries as rows). lse and delta are then row vectors of the score
    tile (two per thread in the tensor-core layout), and dS feeds dQ = dS K straight from registers; P^T
    and dS^T reach dV and dK through shared memory. Otherwise S^T (keys as rows): P^T and dS^T feed dV
    and dK from registers, lse and delta are column vectors (one shared-memory load per pair of columns
    a thread holds) and dQ's dS goes through a transposing shared-memory round trip. ``bwd_rows_q``
    picks, per build, the orientation with the shorter loop."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    do_ptrs = do_base + offs_m[:, None] * HD + offs_d[None, :]
    if ROWS_Q:
        q_ptrs = q_base + offs_m[:, None] * stride_n + offs_d[None, :] * stride_d  # Q tile (BLOCK_M, D)
    else:
        q_ptrs = q_base + offs_m[None, :] * stride_n + offs_d[:, None] * stride_d  # Q^T tile (D, BLOCK_M)
    if MASKED:
        m_mask = offs_m < N
        if ROWS_Q:
            q = tl.load(q_ptrs, mask=m_mask[:, None], other=0.0)
        else:
            q = tl.load(q_ptrs, mask=m_mask[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=m_mask[:, None], other=0.0)
        lse = tl.load(lse_ptr + offs_m, mask=m_mask, other=0.0)
        delta = tl.load(delta_ptr + offs_m, mask=m_mask, other=0.0)
    else:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
        lse = tl.load(lse_ptr + offs_m)
        delta = tl.load(delta_ptr + offs_m)
    if ROWS_Q:
        s = _dot(q, tl.trans(k), IEEE)  # S (BLOCK_M, BLOCK_N), unscaled
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dk += _dot(tl.trans(ds), q, IEEE)
    else:
        st = _dot(k, q, IEEE)  # S^T (BLOCK_N, BLOCK_M), unscaled; q is Q^T here
        pt = tl.math.exp2(st * qk_scale - lse[None, :])
        dv += _dot(pt.to(do.dtype), do, IEEE)
        dpt = _dot(v, tl.trans(do), IEEE)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), tl.trans(q), IEEE)
        ds = tl.trans(dst.to(k.dtype))
    if ADD_DQ:
        dq = _dot(ds, k, IEEE)  # (BLOCK_M, D), without the softmax scale
        dq_ptrs = dq_ptr + offs_m[:, None] * D + offs_d[None, :]
        if MASKED:
            tl.atomic_add(dq_ptrs, dq, mask=m_mask[:, None], sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit
def _attn_bwd(
    qkv_ptr,  # (B, N, 3, H, D), strides below
    do_ptr,  # (B, N, H * D) contiguous
    lse_ptr, delta_ptr,  # (B, H, N) float32
    dqkv_ptr,  # (B, N, 3, H, D) contiguous; this kernel writes [:, :, 1] and [:, :, 2]
    dq_ptr,  # (B, H, N, D) float32, zeroed; dS K added here without the softmax scale (ADD_DQ)
    sm_scale, qk_scale, N, H,
    stride_b, stride_n, stride_t, stride_h, stride_d,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, EVEN_N: tl.constexpr,
    ADD_DQ: tl.constexpr, ROWS_Q: tl.constexpr,
):
    """One program per (key tile, batch * head) loops over every query tile. With ``ADD_DQ`` this is the
    one-pass backward (FlashAttention-2's): P is recomputed once and dQ accumulates by atomic adds, in an
    order that varies from run to run. Without it, dK and dV only (the deterministic path, dQ by
    ``_attn_bwd_dq``). ``EVEN_N``: N is a multiple of BLOCK_M and BLOCK_N, no load is masked. ``ROWS_Q``:
    the score tile's orientation (``_bwd_tile``)."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    HD = H * D
    base = qkv_ptr + b.to(tl.int64) * stride_b + h * stride_h
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    n_mask = offs_n < N
    k_ptrs = base + stride_t + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d
    v_ptrs = base + 2 * stride_t + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d
    if EVEN_N:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:  # key rows past N load 0: their dS K and P^T dO rows are not stored, their dQ share is 0
        k = tl.load(k_ptrs, mask=n_mask[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=n_mask[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    row = bh.to(tl.int64) * N
    do_base = do_ptr + b.to(tl.int64) * N * HD + h * D
    dq_base = dq_ptr + row * D
    for start_m in range(0, N, BLOCK_M):
        dk, dv = _bwd_tile(dk, dv, k, v, base, do_base, lse_ptr + row, delta_ptr + row, dq_base, start_m, N,
                           qk_scale, stride_n, stride_d, HD, D, BLOCK_M, IEEE, not EVEN_N, ADD_DQ, ROWS_Q)
    dk = dk * sm_scale
    # dqkv is contiguous (B, N, 3, H, D)
    d_offs = ((b.to(tl.int64) * N + offs_n[:, None]) * 3) * HD + h * D + offs_d[None, :]
    if EVEN_N:
        tl.store(dqkv_ptr + d_offs + HD, dk.to(dqkv_ptr.dtype.element_ty))
        tl.store(dqkv_ptr + d_offs + 2 * HD, dv.to(dqkv_ptr.dtype.element_ty))
    else:
        tl.store(dqkv_ptr + d_offs + HD, dk.to(dqkv_ptr.dtype.element_ty), mask=n_mask[:, None])
        tl.store(dqkv_ptr + d_offs + 2 * HD, dv.to(dqkv_ptr.dtype.element_ty), mask=n_mask[:, None])


@triton.jit
def _attn_bwd_dq_cast(
    dq_ptr,  # (B, H, N, D) float32 from _attn_bwd
    dqkv_ptr,  # (B, N, 3, H, D) contiguous; this kernel writes [:, :, 0]
    sm_scale, N, H,
    D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dQ = sm_scale * the accumulated dS K, cast into dqkv's Q third."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_mask = offs_m < N
    dq = tl.load(dq_ptr + (bh.to(tl.int64) * N + offs_m[:, None]) * D + offs_d[None, :], mask=m_mask[:, None])
    d_offs = ((b.to(tl.int64) * N + offs_m[:, None]) * 3) * (H * D) + h * D + offs_d[None, :]
    tl.store(dqkv_ptr + d_offs, (dq * sm_scale).to(dqkv_ptr.dtype.element_ty), mask=m_mask[:, None])


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_base, v_base, start_n, N, qk_scale, stride_n, stride_d,
             D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, MASKED: tl.constexpr):
    """One key tile of the deterministic dQ: P recomputed (one FMA and one exp2 per score), dQ += dS K.
    Key rows past N (``MASKED``) load as 0, and their probabilities are zeroed."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k_ptrs = k_base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d  # K tile (BLOCK_N, D)
    vt_ptrs = v_base + offs_n[None, :] * stride_n + offs_d[:, None] * stride_d  # V^T tile (D, BLOCK_N)
    if MASKED:
        n_mask = offs_n < N
        k = tl.load(k_ptrs, mask=n_mask[:, None], other=0.0)
        vt = tl.load(vt_ptrs, mask=n_mask[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
        vt = tl.load(vt_ptrs)
    p = tl.math.exp2(_dot(q, tl.trans(k), IEEE) * qk_scale - lse[:, None])
    if MASKED:
        p = tl.where(n_mask[None, :], p, 0.0)
    ds = p * (_dot(do, vt, IEEE) - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, IEEE)


@triton.jit
def _attn_bwd_dq(
    qkv_ptr, do_ptr, lse_ptr, delta_ptr,
    dqkv_ptr,  # (B, N, 3, H, D) contiguous; this kernel writes [:, :, 0]
    sm_scale, qk_scale, N, H,
    stride_b, stride_n, stride_t, stride_h, stride_d,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, EVEN_N: tl.constexpr,
):
    """The deterministic path's dQ: one program per (query tile, batch * head) over every key tile."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    base = qkv_ptr + b.to(tl.int64) * stride_b + h * stride_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_mask = offs_m < N
    q = tl.load(base + offs_m[:, None] * stride_n + offs_d[None, :] * stride_d, mask=m_mask[:, None], other=0.0)
    do = tl.load(do_ptr + (b.to(tl.int64) * N + offs_m[:, None]) * (H * D) + h * D + offs_d[None, :],
                 mask=m_mask[:, None], other=0.0)
    row_base = bh.to(tl.int64) * N
    lse = tl.load(lse_ptr + row_base + offs_m, mask=m_mask, other=0.0)
    delta = tl.load(delta_ptr + row_base + offs_m, mask=m_mask, other=0.0)
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, base + stride_t, base + 2 * stride_t, start_n, N, qk_scale, stride_n,
                      stride_d, D, BLOCK_N, IEEE, not EVEN_N)
    dq = dq * sm_scale
    d_offs = ((b.to(tl.int64) * N + offs_m[:, None]) * 3) * (H * D) + h * D + offs_d[None, :]
    tl.store(dqkv_ptr + d_offs, dq.to(dqkv_ptr.dtype.element_ty), mask=m_mask[:, None])


# ----------------------------------------------------------------------------------------------------
# Launchers.

import torch  # noqa: E402

HEAD_DIMS = (16, 32, 64)


def config(kernel, D, dtype, ieee=True, even=True):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) the launcher uses for ``kernel`` at head dim D.

    ``dtype``: a torch dtype or its name; ``even``: N a multiple of the tiles (the EVEN_N build).
    ``kernel``: "fwd"; "bwd" (the one-pass backward: BLOCK_N is the program's key tile, BLOCK_M the query
    tile of its loop) and "dkdv" (the same kernel without dQ, the deterministic path's); "dq" (the deterministic path's dQ: BLOCK_M its
    query tile, BLOCK_N the loop's key tile); "preprocess" and "cast" (BLOCK_M rows). Chosen from the
    compile report (``python -m fast_unet.info --compile sm_80,sm_90``) so that no build spills on sm_80 or
    sm_90 and the half-precision builds use wgmma on sm_90. The half-precision forward takes 128-key tiles (the
    per-iteration work of the online softmax, its row rescale, shuffles and address arithmetic, spread over
    twice the scores) and, with masked tiles, 2 stages (3 spilled 8 bytes on sm_80); the half-precision
    one-pass backward 128-key programs (half the dQ atomics of 64-key programs): 4 warps with S (queries
    as rows, ``bwd_rows_q``) at d = 16, and at d = 32 with N a multiple of the tiles on 1 stage (2 stages
    spill there on sm_90, masked tiles on sm_80); 8 warps with S^T otherwise. float32 uses exact
    (FMA) dots, whose register tiles are larger: 32x32 tiles from head dim 32 up, 8 warps for the backward
    at d = 64, a 2-stage forward."""
    fp32 = str(dtype).endswith("float32")
    if kernel in ("preprocess", "cast"):
        return 64, 0, 4, 1
    if fp32 and D >= 32:
        return 32, 32, 8 if (D == 64 and kernel in ("bwd", "dkdv")) else 4, 2
    if kernel == "fwd":
        return (64, 64, 4, 2) if fp32 else (64, 128, 4, 3 if even else 2)
    if kernel == "bwd":
        if fp32:
            return 64, 64, 4, 2
        if D == 16:
            return 64, 128, 4, 2
        return (64, 128, 4, 1) if D == 32 and even else (64, 128, 8, 2)
    if kernel == "dkdv":
        return 64, 64, 4, 2
    if kernel == "dq":
        return (64, 32, 4, 2) if D == 64 else (64, 64, 4, 2)
    raise KeyError(kernel)


def fwd_fast_softmax(D, dtype, even=True):
    """Whether the forward build at head dim D takes ``FAST_SOFTMAX`` (``_fwd_tile``): bf16/fp16 at d = 16
    and 32 with N a multiple of the tiles. There the loop is bound by the SFU's exponentials (66 MUFU.EX2 per
    thread and iteration at 64x128, 528 cycles of the SFU against 387 issue slots at d = 16, bf16,
    sm_90); with the row sums on the tensor cores and a quarter of the exponentials on the FMA units it
    issues 446 warp instructions and 50 MUFU.EX2 (400 cycles), so the issue rate bounds it (472 against
    415 and 528 at d = 32). Not float32 (P stays float32 there, the polynomial's 1e-4 would show), not
    at d = 64 (its loop is near the tensor cores' rate, which the ones tile would add to) and not on
    masked tiles (masked columns would add 2^-125 each to the sums; the ragged build issues 591 with it)."""
    fp32 = str(dtype).endswith("float32")
    return not fp32 and D <= 32 and even


def bwd_rows_q(kernel, D, dtype, ieee=True, even=True):
    """Whether ``kernel``'s ``_attn_bwd`` build (``config``'s "bwd" or "dkdv") takes the scores as S
    (queries as rows, ``ROWS_Q``) rather than S^T; see ``_bwd_tile``. S for the half-precision one-pass
    backward's 4-warp, 128-key builds (d = 16, and d = 32 with N a multiple of the tiles): at d = 16, bf16,
    sm_90 its loop issues 241.5 warp instructions per 1,024 scores against S^T's 317 on 8 warps (lse and
    delta two loads per thread instead of 16 each, no transposing round trip for dQ's dS); S^T elsewhere (S on 8
    warps with a 64-query tile computes every score twice, one per warpgroup; S on 4 warps spills at
    d = 64, and at d = 32 with masked tiles or 2 stages)."""
    fp32 = str(dtype).endswith("float32")
    return kernel == "bwd" and not fp32 and (D == 16 or (D == 32 and even))


def even_n(N, *blocks):
    """Whether N is a multiple of every tile: the kernels' EVEN_N (no masked load or score)."""
    return all(N % b == 0 for b in blocks)


def check_qkv(qkv):
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (B, N, 3, heads, head_dim), got shape {tuple(qkv.shape)}")
    if qkv.shape[4] not in HEAD_DIMS:
        raise ValueError(f"qkv's head_dim (last dim) must be one of {HEAD_DIMS}, got {qkv.shape[4]}")
    if qkv.dtype not in DTYPES:
        raise TypeError(f"qkv must be float32, bfloat16 or float16, got {qkv.dtype}")


def attention_fwd(qkv):
    """Returns (o (B, N, heads*D) in qkv's dtype, lse (B, heads, N) float32 base-2)."""
    check_qkv(qkv)
    B, N, _, H, D = qkv.shape
    o = torch.empty((B, N, H * D), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((B, H, N), device=qkv.device, dtype=torch.float32)
    if B * N * H == 0:
        return o, lse
    ieee = matmul_ieee(qkv.dtype)
    bm, bn, _, _ = config("fwd", D, qkv.dtype, ieee)
    even = even_n(N, bm, bn)
    bm, bn, warps, stages = config("fwd", D, qkv.dtype, ieee, even)
    sm_scale = 1.0 / math.sqrt(D)
    _attn_fwd[(triton.cdiv(N, bm), B * H)](
        qkv, o, lse, sm_scale * LOG2E, N, H, *qkv.stride(),
        D=D, BLOCK_M=bm, BLOCK_N=bn, IEEE=ieee, EVEN_N=even, FAST_SOFTMAX=fwd_fast_softmax(D, qkv.dtype, even),
        num_warps=warps, num_stages=stages)
    return o, lse


def attention_bwd(do, qkv, o, lse, deterministic=None):
    """Returns dqkv (B, N, 3, heads, D) contiguous, qkv's dtype.

    The default is the one-pass backward (``_attn_bwd`` with ADD_DQ): P recomputed once per score, dQ
    accumulated in float32 by atomic adds and then scaled and cast into dqkv (three launches: delta and
    the zeroed dQ, the pass, the cast). Atomic float additions land in a varying order, so dQ can differ
    in its last bits from run to run. ``deterministic`` (default: ``torch.are_deterministic_algorithms_enabled()``,
    PyTorch's convention) takes the two-kernel path instead: dK and dV by key tile, dQ by query tile, P
    recomputed in each, no atomics, bit-reproducible; chosen over ordering the atomics with a per-tile
    semaphore because it needs no spin-waiting and no dQ buffer."""
    check_qkv(qkv)
    B, N, _, H, D = qkv.shape
    do = do.contiguous()
    dqkv = torch.empty((B, N, 3, H, D), device=qkv.device, dtype=qkv.dtype)
    if B * N * H == 0:
        return dqkv
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    delta = torch.empty_like(lse)
    ieee = matmul_ieee(qkv.dtype)
    sm_scale = 1.0 / math.sqrt(D)
    dq = delta if deterministic else torch.empty((B, H, N, D), device=qkv.device, dtype=torch.float32)
    bm, _, warps, _ = config("preprocess", D, qkv.dtype)
    _attn_bwd_preprocess[(triton.cdiv(N, bm), B * H)](o, do, delta, dq, N, H, D=D, BLOCK_M=bm,
                                                      ZERO_DQ=not deterministic, num_warps=warps)
    key = "dkdv" if deterministic else "bwd"
    bm, bn, _, _ = config(key, D, qkv.dtype, ieee)
    even = even_n(N, bm, bn)
    bm, bn, warps, stages = config(key, D, qkv.dtype, ieee, even)
    even = even_n(N, bm, bn)
    _attn_bwd[(triton.cdiv(N, bn), B * H)](
        qkv, do, lse, delta, dqkv, dq, sm_scale, sm_scale * LOG2E, N, H, *qkv.stride(),
        D=D, BLOCK_M=bm, BLOCK_N=bn, IEEE=ieee, EVEN_N=even, ADD_DQ=not deterministic,
        ROWS_Q=bwd_rows_q(key, D, qkv.dtype, ieee, even), num_warps=warps, num_stages=stages)
    if deterministic:
        bm, bn, warps, stages = config("dq", D, qkv.dtype, ieee)
        _attn_bwd_dq[(triton.cdiv(N, bm), B * H)](
            qkv, do, lse, delta, dqkv, sm_scale, sm_scale * LOG2E, N, H, *qkv.stride(),
            D=D, BLOCK_M=bm, BLOCK_N=bn, IEEE=ieee, EVEN_N=even_n(N, bm, bn), num_warps=warps, num_stages=stages)
    else:
        bm, _, warps, _ = config("cast", D, qkv.dtype)
        _attn_bwd_dq_cast[(triton.cdiv(N, bm), B * H)](dq, dqkv, sm_scale, N, H, D=D, BLOCK_M=bm, num_warps=warps)
    return dqkv


# ----------------------------------------------------------------------------------------------------
# Declarations: the pointer arguments each kernel writes (bench.kernels splits a launch's bytes into read
# and written with them), and the builds of the ahead-of-time compile report (fast_unet/aot.py).

WRITES = {
    "_attn_fwd": {"o_ptr", "lse_ptr"},
    "_attn_bwd_preprocess": {"delta_ptr", "dq_ptr"},  # dq_ptr: zeroed for the one-pass backward
    "_attn_bwd": {"dqkv_ptr", "dq_ptr"},  # the K and V thirds of dqkv; dQ added into the float32 dq_ptr
    "_attn_bwd_dq_cast": {"dqkv_ptr"},  # the Q third of dqkv
    "_attn_bwd_dq": {"dqkv_ptr"},  # the Q third of dqkv (deterministic path)
}

# Signature hints: float32 pointers (other pointers take the build's dtype), float scalars (other
# scalars are i32), and integers that are multiples of 16 at the model's shapes (qkv's strides but stride_d).
AOT_FP32_POINTERS = {"lse_ptr", "delta_ptr", "dq_ptr"}
AOT_FLOAT_ARGS = {"qk_scale", "sm_scale"}
AOT_ALIGNED_INTS = {"stride_b", "stride_n", "stride_t", "stride_h"}
# Ints that are 1 at inputs the launchers take (heads = 1; N = 1 token (a 1x1 image)): the JIT specialises them to constants.
AOT_ONE_INTS = {"N", "H"}


def aot_builds():
    """[(kernel label, jit fn, config label, dtype name, constexprs, options)]: each config ``config``
    can pick, per dtype and head dim, with N a multiple of the tiles (EVEN_N, the model's sizes) and not
    (a partial last tile); ``stride_d == 1`` specialised as the JIT does."""
    out = []
    for dt in DTYPE_NAMES:
        for d in HEAD_DIMS:
            for ieee, tag in precisions(dt):
                for name, fn, key, extra in (("attn_fwd", _attn_fwd, "fwd", {}),
                                             ("attn_bwd", _attn_bwd, "bwd", dict(ADD_DQ=True)),
                                             ("attn_bwd_dkdv", _attn_bwd, "dkdv", dict(ADD_DQ=False)),
                                             ("attn_bwd_dq", _attn_bwd_dq, "dq", {})):
                    for even in (True, False):
                        bm, bn, warps, stages = config(key, d, dt, ieee, even)
                        ce = dict(stride_d=1, D=d, BLOCK_M=bm, BLOCK_N=bn, IEEE=ieee, EVEN_N=even, **extra)
                        rows_q = fn is _attn_bwd and bwd_rows_q(key, d, dt, ieee, even)
                        if fn is _attn_bwd:
                            ce["ROWS_Q"] = rows_q
                        if fn is _attn_fwd:
                            ce["FAST_SOFTMAX"] = fwd_fast_softmax(d, dt, even)
                        out.append((name, fn, f"{dt} d={d} {bm}x{bn} w{warps} s{stages}{tag}"
                                    f"{' S' if rows_q else ''}{' fast' if ce.get('FAST_SOFTMAX') else ''}"
                                    f"{'' if even else ' ragged'}",
                                    dt, ce, dict(num_warps=warps, num_stages=stages)))
            bm, _, warps, _ = config("preprocess", d, dt)
            for zero in (True, False):
                out.append(("attn_bwd_preprocess", _attn_bwd_preprocess, f"{dt} d={d} {bm} w{warps}"
                            f"{' zero dq' if zero else ''}", dt, dict(D=d, BLOCK_M=bm, ZERO_DQ=zero),
                            dict(num_warps=warps)))
            bm, _, warps, _ = config("cast", d, dt)
            out.append(("attn_bwd_dq_cast", _attn_bwd_dq_cast, f"{dt} d={d} {bm} w{warps}", dt,
                        dict(D=d, BLOCK_M=bm), dict(num_warps=warps)))
    return with_ones(out, AOT_ONE_INTS)
