"""Fixtures shared by tests/; the helpers the tests import live in helpers.py (tests/ is on sys.path)."""
import os

import pytest
import torch

from fast_unet import dispatch

# The default suite runs with dispatch on auto and by rule (no measured dispatch, unless a test turns it on);
# the Triton interpreter suite is tests/interpret.
os.environ.pop("FAST_UNET_BACKEND", None)
os.environ.pop("FAST_UNET_TUNE", None)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _exact_float32():
    """Float32 parity tests compare exact float32 products: TF32 is off for convolutions and matmuls while a
    test runs (the launchers follow PyTorch's TF32 settings, as eager does), and the settings are restored.
    Set through the legacy flags, which the new ``fp32_precision`` API reflects, so that reading either
    stays valid; a test that needs TF32 sets it itself (tests/ops/test_tf32.py)."""
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = conv
        torch.set_float32_matmul_precision(matmul)


@pytest.fixture
def choices(monkeypatch):
    """Every (op, backend) dispatch picks while the test runs."""
    calls = []
    orig = dispatch.choose

    def spy(op, args):
        backend, fn, args = orig(op, args)
        calls.append((op, backend))
        return backend, fn, args

    monkeypatch.setattr(dispatch, "choose", spy)
    return calls


def _skip_reason(report):
    """A skipped test's reason, without pytest's "Skipped: " prefix."""
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason[len("Skipped: "):] if reason.startswith("Skipped: ") else reason


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line of the run's skips, counted per reason, most frequent first (``-rs`` lists them one by one)."""
    counts = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = _skip_reason(report)
        counts[reason] = counts.get(reason, 0) + 1
    if not counts:
        terminalreporter.write_line("skips by reason: none")
        return
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = "; ".join(f"{n} x {reason}" for reason, n in ranked[:8])
    more = f"; {len(ranked) - 8} other reasons ({sum(n for _, n in ranked[8:])} tests)" if len(ranked) > 8 else ""
    terminalreporter.write_line(f"skips by reason ({sum(counts.values())}): {shown}{more}")
