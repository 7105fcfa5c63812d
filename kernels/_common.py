"""Helpers shared by the Triton kernels."""
import os

import triton
import triton.language as tl

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
