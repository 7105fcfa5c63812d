"""Flash attention over the packed QKV projection, forward and backward (Triton).

qkv: (B, N, 3, heads, D), any strides (the model passes a view of the in_proj output; nothing is
transposed or copied): Q = qkv[:, :, 0], K = qkv[:, :, 1], V = qkv[:, :, 2]. D in {16, 32, 64}.
Output o: (B, N, heads * D) contiguous, the layout out_proj reads. Scale 1/sqrt(D).

Softmax is online, in float32, in base 2: scores are multiplied by ``qk_scale = scale * log2(e)`` and
exponentiated with exp2. The forward saves only ``lse`` (B, heads, N) float32, the row log-sum-exp in
that base-2 domain (``lse = m + log2(l)``), so the backward recomputes P = exp2(S * qk_scale - lse).

Backward, three kernels (the structure of Triton's fused-attention tutorial, split for simplicity):
1. ``_attn_bwd_preprocess``: delta = rowsum(dO * O), (B, heads, N) float32;
2. ``_attn_bwd_dkdv``: one program per (key tile, batch*head) loops over all query tiles;
3. ``_attn_bwd_dq``: one program per (query tile, batch*head) loops over all key tiles.
dQ, dK, dV are written straight into dqkv (B, N, 3, heads, D), the gradient of the packed input.
No atomics: the result is deterministic.

Any N: rows and columns past N are masked (loads return 0, scores -inf, probabilities 0).
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
def _attn_fwd(
    qkv_ptr,  # (B, N, 3, H, D), strides below
    o_ptr,  # (B, N, H * D) contiguous
    lse_ptr,  # (B, H, N) float32
    qk_scale, N, H,
    stride_b, stride_n, stride_t, stride_h, stride_d,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    base = qkv_ptr + b.to(tl.int64) * stride_b + h * stride_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_mask = offs_m < N
    q = tl.load(base + offs_m[:, None] * stride_n + offs_d[None, :] * stride_d, mask=m_mask[:, None], other=0.0)
    k_base = base + stride_t
    v_base = base + 2 * stride_t
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        # K^T tile loaded as (D, BLOCK_N)
        kt = tl.load(k_base + offs_n[None, :] * stride_n + offs_d[:, None] * stride_d, mask=n_mask[None, :], other=0.0)
        s = _dot(q, kt, IEEE) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = _maximum(m_i, _max_nan(s, 1))  # NaN propagates, as in SDPA (masked columns are -inf)
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, mask=n_mask[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_offs = (b.to(tl.int64) * N + offs_m[:, None]) * (H * D) + h * D + offs_d[None, :]
    tl.store(o_ptr + o_offs, acc.to(o_ptr.dtype.element_ty), mask=m_mask[:, None])
    tl.store(lse_ptr + bh.to(tl.int64) * N + offs_m, m_i + tl.math.log2(l_i), mask=m_mask)


@triton.jit
def _attn_bwd_preprocess(
    o_ptr, do_ptr,  # (B, N, H * D) contiguous
    delta_ptr,  # (B, H, N) float32
    N, H,
    D: tl.constexpr, BLOCK_M: tl.constexpr,
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


@triton.jit
def _attn_bwd_dkdv(
    qkv_ptr,  # (B, N, 3, H, D), strides below
    do_ptr,  # (B, N, H * D) contiguous
    lse_ptr, delta_ptr,  # (B, H, N) float32
    dqkv_ptr,  # (B, N, 3, H, D) contiguous; this kernel writes [:, :, 1] and [:, :, 2]
    sm_scale, qk_scale, N, H,
    stride_b, stride_n, stride_t, stride_h, stride_d,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    base = qkv_ptr + b.to(tl.int64) * stride_b + h * stride_h
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    n_mask = offs_n < N
    k = tl.load(base + stride_t + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, mask=n_mask[:, None], other=0.0)
    v = tl.load(base + 2 * stride_t + offs_n[:, None] * stride_n + offs_d[None, :] * stride_d, mask=n_mask[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
    row_base = bh.to(tl.int64) * N
    do_base = do_ptr + b.to(tl.int64) * N * (H * D) + h * D
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < N
        # Q^T and dO^T tiles loaded as (D, BLOCK_M)
        qt = tl.load(base + offs_m[None, :] * stride_n + offs_d[:, None] * stride_d, mask=m_mask[None, :], other=0.0)
        lse = tl.load(lse_ptr + row_base + offs_m, mask=m_mask, other=0.0)
        st = _dot(k, qt, IEEE) * qk_scale  # (BLOCK_N, BLOCK_M) = S^T
        pt = tl.math.exp2(st - lse[None, :])
        pt = tl.where(m_mask[None, :], pt, 0.0)
        do = tl.load(do_base + offs_m[:, None] * (H * D) + offs_d[None, :], mask=m_mask[:, None], other=0.0)
        dv += _dot(pt.to(do.dtype), do, IEEE)
        delta = tl.load(delta_ptr + row_base + offs_m, mask=m_mask, other=0.0)
        dot_t = tl.load(do_base + offs_m[None, :] * (H * D) + offs_d[:, None], mask=m_mask[None, :], other=0.0)
        dpt = _dot(v, dot_t, IEEE)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(qt.dtype), tl.trans(qt), IEEE)
    dk = dk * sm_scale
    # dqkv is contiguous (B, N, 3, H, D)
    d_offs = ((b.to(tl.int64) * N + offs_n[:, None]) * 3) * (H * D) + h * D + offs_d[None, :]
    tl.store(dqkv_ptr + d_offs + H * D, dk.to(dqkv_ptr.dtype.element_ty), mask=n_mask[:, None])
    tl.store(dqkv_ptr + d_offs + 2 * H * D, dv.to(dqkv_ptr.dtype.element_ty), mask=n_mask[:, None])


@triton.jit
def _attn_bwd_dq(
    qkv_ptr, do_ptr, lse_ptr, delta_ptr,
    dqkv_ptr,  # (B, N, 3, H, D) contiguous; this kernel writes [:, :, 0]
    sm_scale, qk_scale, N, H,
    stride_b, stride_n, stride_t, stride_h, stride_d,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
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
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        kt = tl.load(base + stride_t + offs_n[None, :] * stride_n + offs_d[:, None] * stride_d, mask=n_mask[None, :], other=0.0)
        vt = tl.load(base + 2 * stride_t + offs_n[None, :] * stride_n + offs_d[:, None] * stride_d, mask=n_mask[None, :], other=0.0)
        s = _dot(q, kt, IEEE) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(n_mask[None, :], p, 0.0)
        dp = _dot(do, vt, IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), IEEE)
    dq = dq * sm_scale
    d_offs = ((b.to(tl.int64) * N + offs_m[:, None]) * 3) * (H * D) + h * D + offs_d[None, :]
    tl.store(dqkv_ptr + d_offs, dq.to(dqkv_ptr.dtype.element_ty), mask=m_mask[:, None])


# ----------------------------------------------------------------------------------------------------
# Launchers.

import torch  # noqa: E402

HEAD_DIMS = (16, 32, 64)


def config(kernel, D, dtype, ieee=True):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) the launcher uses for ``kernel`` at head dim D.

    ``dtype``: a torch dtype or its name. Chosen from the compile report (``python -m fast_unet.info
    --compile sm_80,sm_90``) so that no build spills on sm_80 or sm_90 and the half-precision builds
    use wgmma on sm_90 (the dots' M side, the outer tile, stays 64). float32 uses exact (FMA) dots,
    whose register tiles are larger: 32x32 tiles from head dim 32 up; ``ieee=False`` (float32 with TF32
    allowed) the same tiles, but the forward at head dim 16 takes 2 stages (3 spilled 16 bytes on sm_80)."""
    fp32 = str(dtype).endswith("float32")
    if kernel == "preprocess":
        return 64, 0, 4, 1
    if fp32 and D >= 32:
        return 32, 32, 4, 2
    if fp32 and not ieee and kernel == "fwd":
        return 64, 64, 4, 2
    if kernel == "fwd":
        return 64, 64, 4, 3
    if kernel == "dkdv":
        return 64, 64, 4, 2
    if kernel == "dq":
        return (64, 32, 4, 2) if D == 64 else (64, 64, 4, 2)
    raise KeyError(kernel)


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
    bm, bn, warps, stages = config("fwd", D, qkv.dtype, ieee)
    sm_scale = 1.0 / math.sqrt(D)
    _attn_fwd[(triton.cdiv(N, bm), B * H)](
        qkv, o, lse, sm_scale * LOG2E, N, H, *qkv.stride(),
        D=D, BLOCK_M=bm, BLOCK_N=bn, IEEE=ieee, num_warps=warps, num_stages=stages)
    return o, lse


def attention_bwd(do, qkv, o, lse):
    """Returns dqkv (B, N, 3, heads, D) contiguous, qkv's dtype."""
    check_qkv(qkv)
    B, N, _, H, D = qkv.shape
    do = do.contiguous()
    dqkv = torch.empty((B, N, 3, H, D), device=qkv.device, dtype=qkv.dtype)
    if B * N * H == 0:
        return dqkv
    delta = torch.empty_like(lse)
    ieee = matmul_ieee(qkv.dtype)
    sm_scale = 1.0 / math.sqrt(D)
    bm, _, warps, _ = config("preprocess", D, qkv.dtype)
    _attn_bwd_preprocess[(triton.cdiv(N, bm), B * H)](o, do, delta, N, H, D=D, BLOCK_M=bm, num_warps=warps)
    bm, bn, warps, stages = config("dkdv", D, qkv.dtype, ieee)
    _attn_bwd_dkdv[(triton.cdiv(N, bn), B * H)](
        qkv, do, lse, delta, dqkv, sm_scale, sm_scale * LOG2E, N, H, *qkv.stride(),
        D=D, BLOCK_M=bm, BLOCK_N=bn, IEEE=ieee, num_warps=warps, num_stages=stages)
    bm, bn, warps, stages = config("dq", D, qkv.dtype, ieee)
    _attn_bwd_dq[(triton.cdiv(N, bm), B * H)](
        qkv, do, lse, delta, dqkv, sm_scale, sm_scale * LOG2E, N, H, *qkv.stride(),
        D=D, BLOCK_M=bm, BLOCK_N=bn, IEEE=ieee, num_warps=warps, num_stages=stages)
    return dqkv


# ----------------------------------------------------------------------------------------------------
# Declarations: the pointer arguments each kernel writes (bench.kernels splits a launch's bytes into read
# and written with them), and the builds of the ahead-of-time compile report (fast_unet/aot.py).

WRITES = {
    "_attn_fwd": {"o_ptr", "lse_ptr"},
    "_attn_bwd_preprocess": {"delta_ptr"},
    "_attn_bwd_dkdv": {"dqkv_ptr"},  # the K and V thirds of dqkv
    "_attn_bwd_dq": {"dqkv_ptr"},  # the Q third of dqkv
}

# Signature hints: float32 pointers (other pointers take the build's dtype), float scalars (other
# scalars are i32), and integers that are multiples of 16 at the model's shapes (qkv's strides but stride_d).
AOT_FP32_POINTERS = {"lse_ptr", "delta_ptr"}
AOT_FLOAT_ARGS = {"qk_scale", "sm_scale"}
AOT_ALIGNED_INTS = {"stride_b", "stride_n", "stride_t", "stride_h"}
# Ints that are 1 at inputs the launchers take (heads = 1; N = 1 token (a 1x1 image)): the JIT specialises them to constants.
AOT_ONE_INTS = {"N", "H"}


def aot_builds():
    """[(kernel label, jit fn, config label, dtype name, constexprs, options)]: each config ``config``
    can pick, per dtype and head dim; ``stride_d == 1`` specialised as the JIT does."""
    out = []
    for dt in DTYPE_NAMES:
        for d in HEAD_DIMS:
            for ieee, tag in precisions(dt):
                for name, fn, key in (("attn_fwd", _attn_fwd, "fwd"), ("attn_bwd_dkdv", _attn_bwd_dkdv, "dkdv"),
                                      ("attn_bwd_dq", _attn_bwd_dq, "dq")):
                    bm, bn, warps, stages = config(key, d, dt, ieee)
                    ce = dict(stride_d=1, D=d, BLOCK_M=bm, BLOCK_N=bn, IEEE=ieee)
                    out.append((name, fn, f"{dt} d={d} {bm}x{bn} w{warps} s{stages}{tag}", dt, ce,
                                dict(num_warps=warps, num_stages=stages)))
            bm, _, warps, _ = config("preprocess", d, dt)
            out.append(("attn_bwd_preprocess", _attn_bwd_preprocess, f"{dt} d={d} {bm} w{warps}", dt,
                        dict(D=d, BLOCK_M=bm), dict(num_warps=warps)))
    return with_ones(out, AOT_ONE_INTS)
