"""What one launch computes, from its tensors' shapes: FLOPs, the unit that executes them, and
exponentials. Measures nothing; ``bench/recorder.py`` calls it for every launch it records, and
``python -m bench.estimate`` turns the totals into times at a GPU's ceilings.

- aten ops: FLOPs from PyTorch's own formulas (``torch.utils.flop_counter``: convolutions, matmuls, the
  SDPA kernels and their backwards); exponentials for softmax, the fused attention kernels (one per
  score, forward and backward: FlashAttention-2's backward recomputes P once), sigmoid/SiLU and exp.
- Triton kernels of ``kernels/``: FLOPs and exponentials per kernel, derived here from the launch's
  arguments (``triton_work``): the conv as an implicit GEMM (2 * output elements * Cin * 9; its data and
  weight gradients the same count each), the token
  GEMMs (2 * M * N * K), attention (forward 4 N^2 d and N^2 exponentials per head; the backward as
  implemented: the one-pass backward ``_attn_bwd`` 10 N^2 d and N^2 exponentials; the deterministic path
  8 N^2 d + N^2 exponentials in its dK/dV pass (``_attn_bwd`` without ADD_DQ) and 6 N^2 d + N^2 in its dQ
  kernel).
- The forward's running-max rescale, alpha = exp2(m_old - m_new): BLOCK_M more exponentials per
  iteration of its loop (one per query row and key tile), from the launch's constexprs. A forward with
  ``FAST_SOFTMAX`` (kernels/attention.py) counts 3/4 of the scores' exponentials on the SFU (the other
  quarter are FMA-unit polynomials, in its loop's warp instructions). Its row sums (P times a tile of
  ones, 2 N^2 x 16 FLOPs per head beyond the model's math) are in the issue term as their HGMMA
  instructions, not in the FLOPs: with them the tensor cores take 192 (d = 16) and 320 (d = 32) cycles of
  an SM sub-partition per iteration against the 446 and 472 it issues (sm_90, bf16).
- Elementwise and reduction kernels (GroupNorm, pooling, upsampling, the statistics): no FLOP term. At
  most ~16 scalar FLOPs per element on the CUDA cores never bind before memory does (an H200's fp32
  CUDA-core rate over its bandwidth: 67e12 / 4.3e12 = 15.6 FLOP per byte, and every element is >= 2 bytes);
  the instructions around them can, which the estimate's issue term counts where the kernel has a loop.

The inner loop of a Triton launch (``triton_loop``): how many iterations of the loop the compile report
reads from the SASS (fast_unet/aot.py, fast_unet/sass.py: the hot loop) the launch runs, summed over its
programs, so that ``python -m bench.estimate`` can count the instructions they issue; and the bytes the
loop re-reads from L2: each tile a program loads inside its loop counts every time (the compulsory
bytes above count each tensor once), and the one-pass backward's float32 atomic adds into dQ count as a
read and a write per key tile (N / BLOCK_N x N x D x 4 bytes x 2 per batch and head). Any attention
kernel (a name starting ``_attn`` with ``qkv_ptr``, ``BLOCK_M``, ``BLOCK_N``) visits every (query tile,
key tile) pair once: B H cdiv(N, BLOCK_M) cdiv(N, BLOCK_N) iterations. SDPA's launches (``aten_loop``)
carry their scores and head dim instead: their SASS is not here.

Units: ``"mma16"`` (bf16/fp16 tensor cores), ``"tf32"`` (float32 convolutions: cuDNN's default
``torch.backends.cudnn.allow_tf32 = True``), ``"fp32"`` (float32 matmuls: PyTorch's default
``torch.backends.cuda.matmul.allow_tf32 = False``; the Triton kernels' exact float32 dots; float32
memory-efficient attention), None (no FLOP term). GELU's erf is a polynomial, not an exponential.
"""
import torch

# Triton kernel name -> formula(named tensors, other arguments) -> (flops, exps, the tensor whose dtype picks
# the unit)
_TRITON = {}


def _triton(*names):
    def register(fn):
        for n in names:
            _TRITON[n] = fn
        return fn
    return register


def _cdiv(a, b):
    return -(-int(a) // int(b))


@_triton("_conv3x3_kernel")
def _conv(t, a):
    w, y = t["w_ptr"], t["y_ptr"]
    return 2 * y.numel() * (w.numel() // w.shape[0]), 0, w


@_triton("_conv3x3_dgrad_kernel")
def _conv_dgrad(t, a):  # dx = dy (*) flipped w: 2 * input pixels * C_in * 9 * C_out, pool: at the pooled size
    w, dy = t["w_ptr"], t["dy_ptr"]
    return 2 * dy.numel() * (w.numel() // w.shape[0]), 0, w


@_triton("_conv3x3_wgrad_kernel")
def _conv_wgrad(t, a):  # dw = dy^T (*) input: 2 * output pixels * C_out * 9 * C_in
    return 2 * t["dy_ptr"].numel() * 9 * a["C_in"], 0, t["dy_ptr"]


@_triton("_conv3x3_wgrad_sum_kernel")
def _conv_wgrad_sum(t, a):  # one float32 add per element of the (S, E) groups' sums it folds
    return t["p_ptr"].numel() + t["pb_ptr"].numel(), 0, t["p_ptr"]


@_triton("_linear_kernel")
def _linear(t, a):
    w, out = t["w_ptr"], t["out_ptr"]
    return 2 * out.numel() * w.shape[-1], 0, w


@_triton("_ln_linear_bwd_kernel")
def _ln_linear_bwd(t, a):  # d2 @ W, and with GELU the pre-activation h @ W^T again (one exp and one erf per element)
    d, w = t["d_ptr"], t["w_ptr"]
    gelu = bool(a.get("GELU", False))
    return 2 * d.numel() * w.shape[-1] * (2 if gelu else 1), d.numel() if gelu else 0, w


@_triton("_col_partial_sum_kernel", "_col_sum_split_kernel")
def _col_partial_sum(t, a):  # one float32 add per element of the (R, W) array of partials it folds
    return t["p_ptr"].numel(), 0, t["p_ptr"]


def _attn_shape(t):
    b, n, _, h, d = t["qkv_ptr"].shape
    return b * h, n, d


def _attn_tile_pairs(t, a):
    """B H cdiv(N, BLOCK_M) cdiv(N, BLOCK_N): the (query tile, key tile) pairs of one attention launch."""
    bh, n, _ = _attn_shape(t)
    return bh * _cdiv(n, a["BLOCK_M"]) * _cdiv(n, a["BLOCK_N"])


@_triton("_attn_fwd")
def _attn_fwd(t, a):  # plus the rescale exp2(m_old - m_new): BLOCK_M per (query tile, key tile)
    bh, n, d = _attn_shape(t)
    rescale = _attn_tile_pairs(t, a) * a["BLOCK_M"] if a and "BLOCK_M" in a and "BLOCK_N" in a else 0
    # FAST_SOFTMAX: a quarter of the scores' exponentials on the FMA units (in the issue term)
    sfu = bh * n * n * 3 // 4 if a and a.get("FAST_SOFTMAX") else bh * n * n
    return 4 * bh * n * n * d, sfu + rescale, t["qkv_ptr"]


@_triton("_attn_bwd")
def _attn_bwd(t, a):  # S^T = K Q^T recomputed, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q (+ dQ += dS K)
    bh, n, d = _attn_shape(t)
    return (10 if _adds_dq(t, a) else 8) * bh * n * n * d, bh * n * n, t["qkv_ptr"]


def _adds_dq(t, a):
    """Whether an ``_attn_bwd`` launch is the one-pass backward (ADD_DQ; without the constexpr at hand: its
    dQ buffer is (B, H, N, D), where the deterministic path passes delta in its place)."""
    if a and "ADD_DQ" in a:
        return bool(a["ADD_DQ"])
    return t["dq_ptr"].dim() == 4 if "dq_ptr" in t else True


@_triton("_attn_bwd_dq")
def _attn_bwd_dq(t, a):  # S recomputed, dP = dO V^T, dQ += dS K
    bh, n, d = _attn_shape(t)
    return 6 * bh * n * n * d, bh * n * n, t["qkv_ptr"]


def _temb_outputs(a):
    """B x sum C_i: the outputs of one time-embedding launch (its six slots; an empty one has C_i = 0 and
    passes another slot's tensors, so the tensors' sizes would count it twice)."""
    return a["B"] * sum(a[f"C{i}"] for i in range(6))


@_triton("_temb_fwd_kernel")
def _temb_fwd(t, a):  # every block's projection of the encoding; SiLU/sin/cos one exponential per output
    outs = _temb_outputs(a)
    return 2 * outs * a["dim"], outs, t["w0_ptr"]


@_triton("_temb_bwd_kernel")
def _temb_bwd(t, a):  # d_weight_i = g_i^T act(enc), the encoding recomputed
    outs = _temb_outputs(a)
    return 2 * outs * a["dim"], outs, t["g0_ptr"]


def _mma_unit(dtype, fp32_unit="fp32"):
    if dtype in (torch.bfloat16, torch.float16):
        return "mma16"
    return fp32_unit if dtype == torch.float32 else None


def triton_work(name, named, args=None):
    """(flops, exps, unit, known) of one Triton launch; ``named``: {argument name: tensor}, ``args``: its
    other arguments by name (constexprs, scalars). ``known`` is False for a kernel this table has no
    formula for (counted as elementwise: no FLOP term)."""
    fn = _TRITON.get(name)
    if fn is None:
        return 0, 0, None, name.startswith(_ELEMENTWISE_PREFIXES)
    try:
        flops, exps, like = fn(named, args or {})
    except (KeyError, ValueError, IndexError, TypeError):
        return 0, 0, None, False  # a kernel whose arguments changed: reported as without a formula
    return int(flops), int(exps), _mma_unit(like.dtype) if flops else None, True


# Triton kernel name -> trips(named tensors, other arguments) -> iterations of its hot loop per program
# (the loop fast_unet/sass.py picks: the innermost loop with the most tensor-core work)
_TRIPS = {
    "_conv3x3_kernel": lambda t, a: 9 * (_cdiv(a["C1"], a["BLOCK_K"]) + (
        _cdiv(a["C_in"] - a["C1"], a["BLOCK_K"]) if a["HAS_X2"] else 0)),
    "_conv3x3_dgrad_kernel": lambda t, a: 9 * _cdiv(a["C_out"], a["BLOCK_K"]),
    # each group of SAMPLES samples, H * W pixels per sample (the program's share of the split batch)
    "_conv3x3_wgrad_kernel": lambda t, a: a["SAMPLES"] * _cdiv(a["H"] * a["W"], a["BLOCK_K"]),
    "_conv3x3_wgrad_sum_kernel": lambda t, a: a["S"],
    "_linear_kernel": lambda t, a: _cdiv(a["K"], a["BLOCK_K"]),
    "_ln_linear_bwd_kernel": lambda t, a: _cdiv(a["N_out"], a["BLOCK_N"]),
    "_col_partial_sum_kernel": lambda t, a: _cdiv(a["ROWS_PER_PROG"], a["BLOCK_R"]),
    "_col_sum_split_kernel": lambda t, a: a["R"],
    "_gn_stats_kernel": lambda t, a: _cdiv(a["HW_PER_PROG"], a["BLOCK_HW"]),
    "_gn_bwd_reduce_kernel": lambda t, a: _cdiv(a["HW_PER_PROG"], a["BLOCK_HW"]),
    # every tile folds the sample's P scalar partials; the first HW block's also sum S <= P splits (the
    # one program per channel block that sums the B * S rows of d weight / d bias runs beside the tiles)
    "_gn_bwd_dx_kernel": lambda t, a: _cdiv(a["P"], a["BLOCK_P"]),
    "_gn_combine_kernel": lambda t, a: _cdiv(a["P"], a["BLOCK_P"]),
    "_gn_apply_partials_kernel": lambda t, a: _cdiv(a["P"], a["BLOCK_P"]),  # one of its two passes over P
    "_gn_relu_pool_kernel": lambda t, a: 4,  # the 2x2 window
    "_upsample2x_kernel": lambda t, a: _cdiv(a["P_in"], a["BLOCK_P_IN"]) if a["NORM_IN"] else 0,
    "_temb_fwd_kernel": lambda t, a: _cdiv(a["dim"], a["BLOCK_K"]),
    "_temb_bwd_kernel": lambda t, a: _cdiv(a["B"], a["BLOCK_B"]),
}


def _is_attention(name, t, a):
    return name.startswith("_attn") and "qkv_ptr" in t and "BLOCK_M" in a and "BLOCK_N" in a


def _attn_l2(name, t, a):
    """Bytes the attention kernel's loop loads from L2 (every tile at every load) and, for the one-pass
    backward, dQ's float32 atomic read-modify-write per key tile."""
    bh, n, d = _attn_shape(t)
    bm, bn = a["BLOCK_M"], a["BLOCK_N"]
    es = t["qkv_ptr"].element_size()
    pairs = _attn_tile_pairs(t, a)
    if name in ("_attn_bwd_dkdv", "_attn_bwd"):  # a key tile per program; Q, dO, lse, delta per query tile
        l2 = pairs * bm * (2 * d * es + 2 * 4)
        if name == "_attn_bwd" and _adds_dq(t, a):
            l2 += pairs * bm * d * 4 * 2  # = B H cdiv(N, BLOCK_N) N D 4 bytes x 2 (N a multiple of BLOCK_M)
        return l2
    return pairs * bn * 2 * d * es  # a query tile per program; K and V per key tile


def triton_loop(name, named, args, grid):
    """(loop, l2_bytes) of one Triton launch: ``loop`` = {"iterations": of its hot loop over all programs}
    (attention also "scores" and "head_dim"), None for a kernel without a formula here (no loop, or one
    this table does not know); ``l2_bytes``: see the module docstring (0 where not modelled)."""
    a = args or {}
    programs = 1
    for g in grid or ():
        programs *= int(g)
    try:
        if _is_attention(name, named, a):
            bh, n, d = _attn_shape(named)
            return ({"iterations": _attn_tile_pairs(named, a), "scores": bh * n * n, "head_dim": d},
                    int(_attn_l2(name, named, a)))
        trips = _TRIPS.get(name)
        if trips is None:
            return None, 0
        return {"iterations": programs * int(trips(named, a))}, 0
    except (KeyError, ValueError, IndexError, TypeError, ZeroDivisionError):
        return None, 0


# Kernels known to be elementwise or reductions (no FLOP term), so that an unknown kernel stands out.
_ELEMENTWISE_PREFIXES = ("_gn_", "_upsample", "_attn_bwd_preprocess", "_attn_bwd_dq_cast", "_gn_relu_pool", "_pool",
                         "_ln_bwd",
                         "_stats", "_combine")

_SOFTMAX = {"_softmax", "_log_softmax", "softmax", "log_softmax", "_safe_softmax"}
_ELEMENT_EXP = {"sigmoid", "silu", "sigmoid_backward", "silu_backward", "exp", "exp_", "tanh", "tanh_backward"}
_SDPA = {"_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
         "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward",
         "_scaled_dot_product_cudnn_attention_backward", "_scaled_dot_product_flash_attention_for_cpu_backward",
         "_flash_attention_forward", "_flash_attention_backward", "_efficient_attention_forward",
         "_efficient_attention_backward"}


def _first_tensor(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
    return None


def _sdpa_shapes(base, args):
    """(batch * heads, query rows, key rows, head dim) of an SDPA op's arguments."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    q, k = tensors[:2] if "backward" not in base else tensors[1:3]
    if base.startswith("_flash_attention") or base.startswith("_efficient_attention"):
        return q.shape[0] * q.shape[2], q.shape[1], k.shape[1], q.shape[-1]  # (B, N, H, d) layout
    return q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.shape[-1]  # (B, H, N, d)


def aten_loop(func, args):
    """{"scores", "head_dim", "sdpa": True} of a fused attention op (SDPA), None for any other op: what
    ``python -m bench.estimate`` needs to give it an instruction-issue term."""
    base = func._schema.name.split("::")[-1]
    if base not in _SDPA:
        return None
    try:
        bh, n, nk, d = _sdpa_shapes(base, args)
    except (IndexError, ValueError):
        return None
    return {"scores": bh * n * nk, "head_dim": int(d), "sdpa": True}


def aten_work(func, args, kwargs, out):
    """(flops, exps, unit) of one aten op, from PyTorch's flop formulas and the exponentials above."""
    from torch.utils.flop_counter import flop_registry

    base = func._schema.name.split("::")[-1]
    flops = 0
    formula = flop_registry.get(func._overloadpacket)
    if formula is not None:
        try:
            flops = int(formula(*args, **kwargs, out_val=out))
        except Exception:  # a formula that cannot take these arguments: no FLOP term, not a crash
            flops = 0
    exps = 0
    first = _first_tensor(args)
    if base in _SOFTMAX or base in _ELEMENT_EXP:
        o = out[0] if isinstance(out, (tuple, list)) else out
        exps = o.numel() if isinstance(o, torch.Tensor) else 0
    elif base in _SDPA:
        bh, n, nk, _ = _sdpa_shapes(base, args)
        exps = bh * n * nk
    unit = None
    if flops and first is not None:
        conv = "conv" in base
        unit = _mma_unit(first.dtype, "tf32" if conv else "fp32")
    return flops, exps, unit
