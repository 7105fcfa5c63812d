"""Shared helpers of the test_ext_*.py files (skip logic and error reports)."""
import pytest
import torch


def require_ext():
    """Skip the calling module, with the reason printed, when fast_unet._C is not built."""
    try:
        from fast_unet import _C  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"fast_unet._C is not built ({type(e).__name__}: {e}); "
                    "build it with `pip install --no-build-isolation -e .`", allow_module_level=True)
    import fast_unet.ext_ops as ext_ops

    return ext_ops


def assert_close(actual, expected, rtol, atol, what):
    """allclose with a message that says how many elements differ, the worst one, and the scale."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs()
    bad = err > atol + rtol * expected.abs()
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{bad.numel()} elements differ; max abs err {err.max().item():.3g} "
            f"(scale {expected.abs().max().item():.3g}); first at {idx}: {actual[idx].item():.6g} vs {expected[idx].item():.6g}")
