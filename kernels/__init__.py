"""Triton kernels of fast_unet, one module per op, each with its plain launcher functions.

- ``group_norm``: GroupNorm(1, C) + ReLU + time-embedding add, forward and backward (NCHW and channels_last)
- ``attention``: flash attention read from the packed (B, N, 3, heads, d) QKV, forward and backward
- ``conv``: 3x3 conv (implicit GEMM over NHWC) with GroupNorm(1, C) partial statistics in its epilogue
- ``time_embedding``: sinusoidal encoding + ReLU/SiLU + stacked Linear of all blocks, one launch
- ``linear``: the attention block's token GEMMs with LayerNorm / GroupNorm+ReLU+emb prologues and bias,
  GELU, residual epilogues (glue: ``fast_unet/triton_block.py``)

The autograd / custom-op glue lives in ``fast_unet/triton_ops.py``. Set ``TRITON_INTERPRET=1`` before
importing this package to run the kernels on CPU tensors (tests only).
"""
