"""fast_unet's benchmark suite, one module per concern (each module's docstring says what it measures and
how to run it):

- ``python -m bench`` (bench/__main__.py): one point, every model side by side; ``--sweep`` (bench/sweep.py):
  sizes and batches, with plots (bench/plots.py); ``--sample`` (bench/sample.py): sampling throughput;
  ``--loop`` (bench/loop.py): the training CLI's step against a bare step; ``--precisions``
  (bench/precision.py): float32, bf16 autocast and bf16 models side by side, tuned and untuned (``--tune``);
- ``python -m bench.ops`` (bench/ops.py): every dispatched op per backend, GB/s and FLOP/s;
- ``python -m bench.kernels`` (bench/kernels.py): kernel launches and bytes per kernel, recorded by
  bench/recorder.py into the records of bench/traffic.py, with the FLOPs of bench/work.py;
- ``python -m bench.estimate`` (bench/estimate.py): the H200 time on paper of every kernel, with the
  instructions of each Triton loop from bench/issue.py (its sm_90 SASS, compiled and cached);
- bench/core.py: the shared pieces (models, timers, FLOP counts, memory, reference rates);
- ``pytest bench/`` (bench/test_bench.py): the single-point cases as a pytest-benchmark suite.
"""
