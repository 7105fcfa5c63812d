"""Shared helpers of the test_ext_*.py files: skip when the extension is not built, and its glue."""
from types import SimpleNamespace

import pytest


def require_ext():
    """Skip the calling module, with the reason printed, when fast_unet._C is not built; else the
    extension's implementations (from the op modules under fast_unet/ops/)."""
    try:
        from fast_unet import _C  # noqa: F401
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"fast_unet._C is not built ({type(e).__name__}: {e}); "
                    "build it with `pip install --no-build-isolation -e .`", allow_module_level=True)
    import importlib

    from fast_unet import backends

    # the op modules (fast_unet.ops.attention the attribute is the op's function, which shadows its module)
    attention = importlib.import_module("fast_unet.ops.attention")
    group_norm = importlib.import_module("fast_unet.ops.group_norm")

    return SimpleNamespace(
        _C=backends.ext(), CUDA_BUILT=backends.ext_cuda_built(), build_info=backends.build_info,
        group_norm_relu=group_norm.ext_group_norm_relu, group_norm_relu_fwd=group_norm.ext_group_norm_relu_fwd,
        group_norm_relu_reasons=group_norm.ext_reasons, attention=attention.ext_attention,
        attention_fwd=attention.ext_attention_fwd, attention_reasons=attention.ext_reasons)
