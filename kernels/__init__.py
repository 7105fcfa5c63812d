"""Triton kernels of fast_unet, one module per op, each with its plain launcher functions.

- ``attention``: flash attention read from the packed (B, N, 3, heads, d) QKV, forward and backward
- ``conv``: 3x3 conv (implicit GEMM over NHWC) with GroupNorm(1, C) partial statistics in its epilogue,
  its input normalised, concatenated or max-pooled on load
- ``group_norm``: GroupNorm(1, C) + ReLU + time-embedding add, forward and backward (NCHW and channels_last)
- ``linear``: the attention block's token GEMMs with LayerNorm / GroupNorm+ReLU+emb prologues and bias,
  GELU, residual epilogues
- ``ln_backward``: the backward of a LayerNorm folded into a token GEMM's prologue, as one GEMM
- ``resample``: the normalise + 2x2 max-pool pass and the bilinear 2x upsample
- ``time_embedding``: sinusoidal encoding + ReLU/SiLU + stacked Linear of all blocks, one launch
- ``_common``: helpers the kernels share, and ``DTYPES``, the dtypes every launcher takes

Each kernel module declares, next to its kernels:

- ``WRITES``: {kernel function name: the pointer arguments it stores to}, for every kernel it launches
  (an empty set if none); ``UPDATES`` likewise for arguments it loads and stores, where there are any.
  ``python -m bench.kernels`` counts every other tensor argument as read;
- ``aot_builds()``: the builds of the ahead-of-time compile report (``python -m fast_unet.info
  --compile``), one per kernel and config its launchers can pick, as (kernel label, jit function, config
  label, dtype name, constexprs, options); and the signature hints of those builds, ``AOT_FP32_POINTERS``,
  ``AOT_FLOAT_ARGS``, ``AOT_ALIGNED_INTS`` (see ``fast_unet/aot.py``), and ``AOT_PARAM_POINTERS``: the
  (C,) parameter pointers (and their gradients'), float32 or the activations' dtype (float32 under
  autocast); ``_common.with_fp32_params`` adds the bf16/fp16 builds with them float32. Optionally
  ``AOT_LOOP_TILES``: {kernel function name: ((constexpr names), unit)}, the work one iteration of the
  kernel's inner loop covers, where it is not the product of all its ``BLOCK_*`` constexprs (the compile
  report's per-1,024 instruction counts: ``fast_unet.aot.loop_tile``); ``AOT_CI_FLAGS``: the constexprs
  that select another body of a kernel (the conv's input modes), each kept in CI's compile set
  (``fast_unet.aot.ci_builds``: one build per kernel, dtype kind, tile and body).

A new kernel module needs nothing else here: ``fast_unet/aot.py`` finds every module whose name does not
start with ``_``. The autograd / custom-op glue lives in ``fast_unet/ops/``. Set ``TRITON_INTERPRET=1``
before importing this package to run the kernels on CPU tensors (tests only).
"""
