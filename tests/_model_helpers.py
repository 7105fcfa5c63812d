"""Helpers for the parity tests: models with identical weights, seeded inputs, explaining comparisons."""
import torch

from fast_unet import UNet
from fast_unet.reference import cast_reference, make_reference


def model_pair(height=64, width=None, seed=0, dtype=torch.float32):
    """(fast_unet.UNet, reference UNet) with the same weights, able to run ``height`` x ``width``."""
    width = height if width is None else width
    torch.manual_seed(seed)
    ref = make_reference(height, width)
    fast = UNet()
    fast.load_state_dict(ref.state_dict(), strict=True)
    if dtype != torch.float32:
        ref = cast_reference(ref, dtype)
        fast = fast.to(dtype)
    return fast, ref


def reference_copy(ref, dtype, height, width=None):
    """A fresh reference for ``height`` x ``width`` with ``ref``'s weights, cast to ``dtype``."""
    copy = make_reference(height, height if width is None else width)
    copy.load_state_dict(ref.state_dict(), strict=True)
    return cast_reference(copy, dtype)


def inputs(batch, height, width=None, dtype=torch.float32, seed=1):
    width = height if width is None else width
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, height, width, generator=g).to(dtype)
    t = torch.randint(1, 1000, (batch,), generator=g)
    return x, t


def assert_close(actual, expected, *, atol, rtol, what):
    """The tests' one elementwise tolerance check: |actual - expected| <= atol + rtol * |expected|, NaN and
    Inf where the expected has them. Says how many elements mismatch, the worst, and where NaN/Inf differ."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    bad_nan = (torch.isnan(a) != torch.isnan(e)) | (torch.isinf(a) != torch.isinf(e))
    err = (a - e).abs()
    bad = (err > atol + rtol * e.abs()) | bad_nan
    if bad.any():
        idx = tuple(i.item() for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements mismatch (atol={atol}, rtol={rtol}); "
            f"max abs err {err.max().item():.3e}; first at {idx}: {a[idx].item():.6g} vs {e[idx].item():.6g}; "
            f"NaN/Inf mismatches: {int(bad_nan.sum())}")


def max_err(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()
