"""What one launch computes, from its tensors' shapes: FLOPs, the unit that executes them, and
exponentials. Measures nothing; ``bench/recorder.py`` calls it for every launch it records, and
``python -m bench.estimate`` turns the totals into times at a GPU's ceilings.

- aten ops: FLOPs from PyTorch's own formulas (``torch.utils.flop_counter``: convolutions, matmuls, the
  SDPA kernels and their backwards); exponentials for softmax, the fused attention kernels (one per
  score, forward and backward: FlashAttention-2's backward recomputes P once), sigmoid/SiLU and exp.
- Triton kernels of ``kernels/``: FLOPs and exponentials per kernel, derived here from the launch's
  arguments (``triton_work``): the conv as an implicit GEMM (2 * output elements * Cin * 9), the token
  GEMMs (2 * M * N * K), attention (forward 4 N^2 d and N^2 exponentials per head; the backward as
  implemented: the one-pass backward 10 N^2 d and N^2 exponentials; the deterministic path 8 N^2 d + N^2
  exponentials in its dK/dV pass and 6 N^2 d + N^2 in its dQ kernel).
- Elementwise and reduction kernels (GroupNorm, pooling, upsampling, the statistics): no FLOP term. At
  most ~16 scalar FLOPs per element on the CUDA cores never bind before memory does (an H200's fp32
  CUDA-core rate over its bandwidth: 67e12 / 4.3e12 = 15.6 FLOP per byte, and every element is >= 2 bytes).

Units: ``"mma16"`` (bf16/fp16 tensor cores), ``"tf32"`` (float32 convolutions: cuDNN's default
``torch.backends.cudnn.allow_tf32 = True``), ``"fp32"`` (float32 matmuls: PyTorch's default
``torch.backends.cuda.matmul.allow_tf32 = False``; the Triton kernels' exact float32 dots; float32
memory-efficient attention), None (no FLOP term). GELU's erf is a polynomial, not an exponential.
"""
import torch

# Triton kernel name -> formula(named tensors) -> (flops, exps, the tensor whose dtype picks the unit)
_TRITON = {}


def _triton(*names):
    def register(fn):
        for n in names:
            _TRITON[n] = fn
        return fn
    return register


@_triton("_conv3x3_kernel")
def _conv(t):
    w, y = t["w_ptr"], t["y_ptr"]
    return 2 * y.numel() * (w.numel() // w.shape[0]), 0, w


@_triton("_linear_kernel")
def _linear(t):
    w, out = t["w_ptr"], t["out_ptr"]
    return 2 * out.numel() * w.shape[-1], 0, w


@_triton("_ln_linear_bwd_kernel")
def _ln_linear_bwd(t):
    d, w = t["d_ptr"], t["w_ptr"]
    return 2 * d.numel() * w.shape[-1], 0, w


def _attn_shape(t):
    b, n, _, h, d = t["qkv_ptr"].shape
    return b * h, n, d


@_triton("_attn_fwd")
def _attn_fwd(t):
    bh, n, d = _attn_shape(t)
    return 4 * bh * n * n * d, bh * n * n, t["qkv_ptr"]


@_triton("_attn_bwd")
def _attn_bwd(t):  # S^T = K Q^T recomputed, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q (+ dQ += dS K)
    bh, n, d = _attn_shape(t)
    add_dq = t["dq_ptr"].dim() == 4  # the one-pass backward's (B, H, N, D) dQ; the deterministic path passes delta
    return (10 if add_dq else 8) * bh * n * n * d, bh * n * n, t["qkv_ptr"]


@_triton("_attn_bwd_dq")
def _attn_bwd_dq(t):  # S recomputed, dP = dO V^T, dQ += dS K
    bh, n, d = _attn_shape(t)
    return 6 * bh * n * n * d, bh * n * n, t["qkv_ptr"]


@_triton("_temb_fwd_kernel")
def _temb_fwd(t):  # both projections of the encoding; SiLU/sin/cos counted as one exponential per output
    k = t["rw_ptr"].shape[-1]
    outs = t["down_ptr"].numel() + t["up_ptr"].numel()
    return 2 * outs * k, outs, t["rw_ptr"]


@_triton("_temb_bwd_kernel")
def _temb_bwd(t):
    k = t["drw_ptr"].shape[-1]
    outs = t["gd_ptr"].numel() + t["gu_ptr"].numel()
    return 2 * outs * k, outs, t["gd_ptr"]


def _mma_unit(dtype, fp32_unit="fp32"):
    if dtype in (torch.bfloat16, torch.float16):
        return "mma16"
    return fp32_unit if dtype == torch.float32 else None


def triton_work(name, named):
    """(flops, exps, unit, known) of one Triton launch; ``named``: {argument name: tensor}. ``known`` is
    False for a kernel this table has no formula for (counted as elementwise: no FLOP term)."""
    fn = _TRITON.get(name)
    if fn is None:
        return 0, 0, None, name.startswith(_ELEMENTWISE_PREFIXES)
    try:
        flops, exps, like = fn(named)
    except (KeyError, ValueError, IndexError):
        return 0, 0, None, False  # a kernel whose arguments changed: reported as without a formula
    return int(flops), int(exps), _mma_unit(like.dtype) if flops else None, True


# Kernels known to be elementwise or reductions (no FLOP term), so that an unknown kernel stands out.
_ELEMENTWISE_PREFIXES = ("_gn_", "_upsample", "_attn_bwd_preprocess", "_attn_bwd_dq_cast", "_gn_relu_pool", "_pool", "_ln_bwd",
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
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        q, k = tensors[:2] if "backward" not in base else tensors[1:3]
        if base.startswith("_flash_attention") or base.startswith("_efficient_attention"):
            bh, n, nk = q.shape[0] * q.shape[2], q.shape[1], k.shape[1]  # (B, N, H, d) layout
        else:
            bh, n, nk = q.shape[0] * q.shape[1], q.shape[2], k.shape[2]  # (B, H, N, d)
        exps = bh * n * nk
    unit = None
    if flops and first is not None:
        conv = "conv" in base
        unit = _mma_unit(first.dtype, "tf32" if conv else "fp32")
    return flops, exps, unit
