"""tests/interpret: the Triton kernels run on the CPU through Triton's interpreter.

Everything here is skipped unless ``TRITON_INTERPRET=1`` was in the environment when the process started
(triton.jit reads it when kernels/ is imported, so setting it later cannot work). Run with

    TRITON_INTERPRET=1 python -m pytest -q tests/interpret

Each test runs with ``FAST_UNET_BACKEND=triton`` (set through monkeypatch), so a dispatch that would
silently fall back to eager fails instead; tests that check fallback set ``auto`` themselves.
"""
import os

import pytest
import torch

INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET", "0") == "1"
HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    if INTERPRET_AT_START:
        return
    skip = pytest.mark.skip(reason="needs TRITON_INTERPRET=1 in the environment at process start")
    for item in items:
        if str(item.fspath).startswith(HERE + os.sep):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("FAST_UNET_BACKEND", "triton")
    torch.manual_seed(0)
    yield
