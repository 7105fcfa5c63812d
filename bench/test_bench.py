"""The benchmark's cases as a pytest-benchmark suite: ``pytest bench/`` (the default test command
leaves it out). Sizes from the environment: BENCH_BATCH (default 4), BENCH_SIZE (64), BENCH_DTYPE
(float32), BENCH_DEVICE (cuda when available)."""
import os

import pytest
import torch

from bench import core

BATCH = int(os.environ.get("BENCH_BATCH", "4"))
HEIGHT, WIDTH = core.parse_size(os.environ.get("BENCH_SIZE", "64"))
DTYPE = core.DTYPES[os.environ.get("BENCH_DTYPE", "float32")]
DEVICE = os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
MODELS = [m for m in core.MODELS if m != "compiled" or os.environ.get("BENCH_COMPILE") == "1"]


@pytest.fixture(scope="module")
def state():
    torch.manual_seed(0)
    from fast_unet import UNet

    return UNet().state_dict()


@pytest.mark.parametrize("mode", ["forward", "train"])
@pytest.mark.parametrize("name", MODELS)
def test_unet(benchmark, state, name, mode):
    model = core.build_model(name, HEIGHT, WIDTH, DTYPE, DEVICE, state)
    x, t, noise = core.make_inputs(BATCH, HEIGHT, WIDTH, DTYPE, DEVICE)
    fn = core.forward_fn(model, x, t) if mode == "forward" else core.train_fn(model, x, t, noise)
    sync = torch.cuda.synchronize if torch.device(DEVICE).type == "cuda" else (lambda: None)

    def run():
        fn()
        sync()

    benchmark.extra_info.update(batch=BATCH, size=f"{HEIGHT}x{WIDTH}", dtype=str(DTYPE), device=DEVICE)
    benchmark.pedantic(run, warmup_rounds=1, rounds=3 if name == "reference" else 5, iterations=1)
