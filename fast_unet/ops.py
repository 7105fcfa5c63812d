"""fast_unet's ops, the functional API. Each call goes through ``fast_unet.dispatch``.

Where each op's three implementations live:

| op                | eager (fallback)             | Triton                     | C++/CUDA             |
|-------------------|------------------------------|----------------------------|----------------------|
| group_norm_relu   | fast_unet/eager.py           | kernels/ via triton_ops.py | csrc/ via ext_ops.py |
| attention         | fast_unet/eager.py           | kernels/ via triton_ops.py | csrc/ via ext_ops.py |
| time_embedding    | fast_unet/eager.py           | kernels/ via triton_ops.py | csrc/ via ext_ops.py |

The tests that hold them together: tests/test_ops.py (every op on each CPU backend against float64
formulas), tests/interpret/ (the Triton kernels under TRITON_INTERPRET=1), tests/test_ext_*.py (the
extension), tests/gpu/ (the Triton kernels on a CUDA device).

The fused model path (``FAST_UNET_FUSED``, Triton only; ``dispatch.fused_paths`` decides) is not a set of
functional ops but whole blocks: ``fast_unet/fused.py`` drives them; the pieces and their unfused
equivalents (the eager composition each replaces, used as the tests' reference):

| piece                                   | kernel                  | glue                    | tests (tests/interpret/)  |
|-----------------------------------------|-------------------------|-------------------------|---------------------------|
| conv3x3 (+ norm / pool / concat on load)| kernels/conv.py         | triton_ops.conv3x3      | test_conv.py              |
| normalise + max-pool, upsample          | kernels/resample.py     | triton_ops              | test_resample.py          |
| attention block GEMMs                   | kernels/linear.py       | triton_block.py         | test_linear.py            |
| LayerNorm backward in its GEMM          | kernels/ln_backward.py  | triton_block.py         | test_ln_backward.py       |
| the whole model                         | all of them             | fused.unet_forward      | test_fused_model.py       |
"""
from . import dispatch


def group_norm_relu(x, weight, bias, eps=1e-5, emb=None):
    """``relu(GroupNorm(1, C)(x)) + emb[:, :, None, None]``.

    x: (B, C, H, W) in NCHW or channels_last; weight, bias: (C,); emb: (B, C) or None. Statistics in
    float32; output in x's dtype and memory format.
    """
    return dispatch.call("group_norm_relu", x, weight, bias, eps, emb)


def attention(qkv):
    """Multi-head softmax attention read from the packed QKV projection.

    qkv: (B, N, 3, heads, d) (the ``in_proj`` output of N tokens, viewed). Returns (B, N, heads * d).
    """
    return dispatch.call("attention", qkv)


def time_embedding(t, dim, relu_weight, relu_bias, silu_weight, silu_bias):
    """Sinusoidal encoding of t (B,) followed by every block's activation + Linear.

    Returns (down (B, sum C_down), up (B, sum C_up)); see ``fast_unet.eager.time_embedding``.
    """
    return dispatch.call("time_embedding", t, dim, relu_weight, relu_bias, silu_weight, silu_bias)
