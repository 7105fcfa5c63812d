"""The tests' one helper module: the tolerance checks (``assert_close``, elementwise; the flash-attention
rule ``assert_close_rule`` with its ``FLOOR``), partial GroupNorm statistics (``partials_of``,
``combine_partials``), model helpers (``model_pair``, ``inputs``, ``assert_matches_reference``...), and
``require_ext`` (skip when the extension is not built). tests/conftest.py puts tests/ on sys.path."""
from types import SimpleNamespace

import pytest
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


# Tolerance rule (flash-attention's): the kernel's error against a float64 reference must be at most
# twice the error of eager PyTorch computing in the same dtype, plus a small floor relative to the
# reference's magnitude.
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 1e-3}


def assert_close_rule(name, out, out_eager, ref64, dtype):
    """out, out_eager: the kernel's and eager's results in ``dtype``; ref64: the float64 reference."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values in the kernel's result"
    err = (out.double() - ref64).abs().max().item()
    err_eager = (out_eager.double() - ref64).abs().max().item()
    floor = FLOOR[dtype] * max(ref64.abs().max().item(), 1e-3)
    assert err <= 2 * err_eager + floor, (
        f"{name} ({dtype}): kernel error {err:.3g} > 2 x eager error {err_eager:.3g} + floor {floor:.3g}")
    return err, err_eager


def assert_param_grads_close(model, ref, rel=1e-4):
    """Every parameter gradient of ``model`` within ``rel`` of the largest element of ``ref``'s (+1e-6)."""
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        r = ref_params[name].grad
        assert p.grad is not None, name
        scale = r.abs().max().item() + 1e-6
        err = (p.grad - r).abs().max().item()
        assert err <= rel * scale + 1e-6, f"{name}: grad error {err:.3g} (scale {scale:.3g})"


def assert_matches_reference(model, ref, y, x, t):
    """y = model(x, t) (float32) within 2e-5 + 1e-4 relative of ref(x, t), and every parameter gradient of
    the two within ``assert_param_grads_close`` after the same random upstream gradient."""
    y_ref = ref(x, t)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert_param_grads_close(model, ref)


def partials_of(y, pieces):
    """(B, P, 3) float32 (count, mean, M2) partials of each sample of y, in ``pieces`` uneven chunks of its
    flattened values: the layout a conv epilogue writes, built independently of the kernels."""
    flat = y.detach().double().reshape(y.shape[0], -1)
    rows = []
    for chunk in flat.tensor_split(pieces, dim=1):
        mean = chunk.mean(1)
        rows.append(torch.stack([torch.full_like(mean, chunk.shape[1]), mean,
                                 ((chunk - mean[:, None]) ** 2).sum(1)], dim=-1))
    return torch.stack(rows, dim=1).float()


def combine_partials(partials):
    """(mean, var) float64 per sample from (B, P, 3) partials (Chan's formula, in float64)."""
    p = partials.double()
    n = p[..., 0].sum(1)
    mean = (p[..., 0] * p[..., 1]).sum(1) / n
    m2 = (p[..., 2] + p[..., 0] * (p[..., 1] - mean[:, None]) ** 2).sum(1)
    return mean, m2 / n



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


def run_or_skip(fn, *args):
    """fn(*args), skipping the test (with the dispatcher's reason) when the forced backend cannot take
    these arguments (the extension, say, for float64)."""
    try:
        return fn(*args)
    except RuntimeError as e:
        if "cannot run" in str(e):
            pytest.skip(str(e))
        raise


def grads_in(fn, inputs, dtype, gout):
    """(out, gradients of the floating inputs): ``fn`` on the inputs cast to ``dtype`` as fresh leaves,
    backward from ``gout`` (a tensor or a sequence, one per output)."""
    leaves = [t.to(dtype).detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in inputs]
    out = fn(*leaves)
    torch.autograd.backward(out, gout if isinstance(gout, (list, tuple)) else [gout])
    return out, [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]


class launches:
    """Context manager recording every Triton launch ``kernel[grid](*args, **kwargs)`` as a dict (name, grid,
    args by name, kwargs); ``dry=True`` skips the kernel (its outputs stay as allocated), so launchers can
    be driven with huge shapes on ``meta`` tensors or without a GPU. The idea of bench/kernels.py's
    TritonRecorder, kept small here: it hooks ``triton.runtime.jit.KernelInterface.__getitem__``."""

    def __init__(self, dry=False):
        self.dry = dry
        self.records = []

    def __enter__(self):
        from triton.runtime.jit import KernelInterface

        self._cls, self._orig = KernelInterface, KernelInterface.__getitem__
        orig, records, dry = self._orig, self.records, self.dry

        def getitem(kernel, grid):
            run = orig(kernel, grid)

            def launch(*args, **kwargs):
                fn = getattr(kernel, "fn", kernel)
                names = list(getattr(kernel, "arg_names", []))
                named = dict(zip(names, args))
                g = grid(dict(named, **kwargs)) if callable(grid) else grid
                records.append(dict(name=getattr(fn, "__name__", str(fn)), grid=tuple(g), args=named, kwargs=kwargs))
                return None if dry else run(*args, **kwargs)

            return launch

        KernelInterface.__getitem__ = getitem
        return self.records

    def __exit__(self, *exc):
        self._cls.__getitem__ = self._orig
        return False
