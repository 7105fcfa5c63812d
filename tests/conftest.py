"""Fixtures shared by tests/; the helpers the tests import live in helpers.py (tests/ is on sys.path)."""
import os

import pytest
import torch

# The default suite runs with dispatch on auto; the Triton interpreter suite is tests/interpret.
os.environ.pop("FAST_UNET_BACKEND", None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
