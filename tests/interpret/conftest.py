"""tests/interpret: the Triton kernels run on the CPU through Triton's interpreter.

Everything here is skipped unless ``TRITON_INTERPRET=1`` was in the environment when the process started
(triton.jit reads it when kernels/ is imported, so setting it later cannot work). Run with

    TRITON_INTERPRET=1 python -m pytest -q tests/interpret tests/ops -m triton

(tests/ops holds each op's tests, the Triton ones among them; this folder the model-level ones.)

Each test runs with ``FAST_UNET_BACKEND=triton`` (set through monkeypatch), so a dispatch that would
silently fall back to eager fails instead; tests that check fallback set ``auto`` themselves.
"""
import os

import pytest
import torch

INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET", "0") == "1"
HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    """Every test here carries the ``triton`` marker (stage 2 selects with ``-m triton``), and skips unless
    the interpreter was on at process start."""
    skip = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 in the environment at process start: runs in stage 2 "
                                   "(TRITON_INTERPRET=1 python -m pytest tests/interpret tests/ops -m triton)")
    for item in items:
        if str(item.fspath).startswith(HERE + os.sep):
            item.add_marker(pytest.mark.triton)
            if not INTERPRET_AT_START:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("FAST_UNET_BACKEND", "triton")
    torch.manual_seed(0)
    yield



@pytest.fixture
def interpreter_tiles(monkeypatch):
    """One large conv and linear tile per small sample (``fast_unet.backends.interpreter_tiles``): the wiring
    is what these tests check; every real config is checked in tests/ops/test_conv.py and test_linear.py."""
    from fast_unet import backends

    for module, name, value in backends.interpreter_tiles():
        monkeypatch.setattr(module, name, value)
