"""Helpers shared by the Triton kernels."""
import os

import torch
import triton
import triton.language as tl

# The dtypes every launcher takes (activations, weights); statistics and partial sums are float32.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_NAMES = tuple(str(dt).removeprefix("torch.") for dt in DTYPES)  # "float32", ...: the compile report's

# Decided when kernels/ is imported, like triton.jit itself (which reads TRITON_INTERPRET at decoration).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_UPCAST_DOT = tl.constexpr(INTERPRET)


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """tl.dot(a, b) with float32 accumulation; ``IEEE``: exact float32 products (no TF32).

    Triton 3.8's interpreter computes tl.dot of bfloat16 operands wrongly; it computes every dot in
    float32 anyway, so under the interpreter the (already rounded) operands are upcast first: the
    result is the same as the GPU's bf16/fp16 tensor-core product with float32 accumulation."""
    if _UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def relu(x):
    """max(x, 0) that keeps NaN, as torch.relu does (``tl.maximum``'s default, ``max.f32`` on a GPU and
    ``np.fmax`` under the interpreter, turns NaN into 0)."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def maximum(a, b):
    """Elementwise max that propagates NaN from either side (max-pool, running maxima), as PyTorch does."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def max_nan(x, axis):
    """``tl.max(x, axis)`` that propagates NaN (``tl.max`` combines with a NaN-dropping maximum)."""
    return tl.reduce(x, axis, maximum)


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """``x.to(dtype)`` for float32 ``x``, rounded to nearest even as on the GPU.

    Triton 3.8's interpreter converts float32 to bfloat16 by truncation (round toward zero), where the GPU
    rounds to nearest even; a kernel that rounds an intermediate to bf16 on purpose (to match what an
    unfused path stores) would see different values under the interpreter. There the rounding is done
    on the bits first (add 0x7FFF plus the lowest kept bit, clear the low 16 bits: exact RTNE for finite
    values), so the truncating cast that follows is exact. GPU builds are unaffected (constexpr)."""
    if _UPCAST_DOT and dtype == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        x = ((u >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)
