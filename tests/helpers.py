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
        err = (p.grad.double() - r.double()).abs().max().item()
        assert err <= rel * scale + 1e-6, f"{name}: grad error {err:.3g} (scale {scale:.3g})"


# Gradients are judged at points where they are defined in float32. ReLU and max-pool are not
# differentiable at their kinks (a pre-activation at 0, two window values equal): an element whose
# float64 value lies closer to the kink than float32's rounding of it can fall on either side in any
# float32 implementation, the eager reference's included, and moves every gradient upstream of it
# wholesale (one pre-ReLU value 5.9e-7 from 0 in up2 at 16x16, B=1 moved up2.conv.conv1's weight
# gradient by 2.4%, in whichever model rounded it across). Where that float32 model lands depends on
# the CPU's convolution and GEMM kernels (oneDNN's AVX2 and AVX-512 code round differently), so a
# float32 reference is not an oracle there. The oracle is the reference in float64, and a parity point
# must keep every kink at least KINK_MARGIN away: twice the largest float32 error, against float64, of
# the ReLU inputs near 0 (|v| < 0.05) measured on the float32 reference at 16x16 (5e-6; its CPU
# GroupNorm is the less accurate of the two models).
KINK_MARGIN = 1e-5


def kink_margin(ref64, x, t):
    """(margin, where): the smallest distance from a kink over ``ref64``'s forward at (x, t), in float64:
    |input| of every ``nn.ReLU``, and for every ``nn.MaxPool2d`` window the gap between its maximum and
    the largest value below it (exactly equal values, the ReLU's zeros plus a shared embedding, are equal
    in every precision and route no gradient)."""
    worst = [float("inf"), "nowhere"]
    hooks = []

    def record(value, where):
        if value < worst[0]:
            worst[:] = [value, where]

    def relu_hook(name):
        return lambda m, inp, out: record(inp[0].detach().abs().min().item(), f"{name} (ReLU input)")

    def pool_hook(name):
        def hook(m, inp, out):
            v = inp[0].detach()
            b, c, h, w = v.shape
            win = v[:, :, :h // 2 * 2, :w // 2 * 2].reshape(b, c, h // 2, 2, w // 2, 2).transpose(3, 4)
            win = win.reshape(b, c, h // 2, w // 2, 4)
            top = win.amax(-1, keepdim=True)
            below = torch.where(win < top, win, torch.full_like(win, -float("inf"))).amax(-1)
            record((top[..., 0] - below).min().item(), f"{name} (max-pool window)")
        return hook

    for name, m in ref64.named_modules():
        if isinstance(m, torch.nn.ReLU):
            hooks.append(m.register_forward_hook(relu_hook(name)))
        elif isinstance(m, torch.nn.MaxPool2d):
            hooks.append(m.register_forward_hook(pool_hook(name)))
    try:
        with torch.no_grad():
            ref64(x.double(), t)
    finally:
        for h in hooks:
            h.remove()
    return tuple(worst)


def float64_oracle(ref):
    """A float64 copy of the reference ``ref`` (its modules as they are, replaced ones included)."""
    import copy

    return cast_reference(copy.deepcopy(ref), torch.float64)


def conditioned_inputs(ref, batch, height, width=None, seed=0, tries=200):
    """(x, t): the first inputs drawn from seeds ``seed``, ``seed + 1``, ... at which every kink of ``ref``
    (the float32 reference) is at least KINK_MARGIN away in float64 (``kink_margin``). Deterministic: the
    same point on every machine, because the margin is measured in float64."""
    width = height if width is None else width
    ref64 = float64_oracle(ref)
    for s in range(seed, seed + tries):
        g = torch.Generator().manual_seed(s)
        x = torch.randn(batch, 3, height, width, generator=g)
        t = torch.randint(1, 1000, (batch,), generator=g)
        if kink_margin(ref64, x, t)[0] >= KINK_MARGIN:
            return x, t
    raise AssertionError(f"no input among seeds {seed}..{seed + tries - 1} keeps every kink {KINK_MARGIN} away")


def assert_matches_reference(model, ref, y, x, t):
    """y = model(x, t) (float32) against the reference computed in float64: the output within 2e-5 + 1e-4
    relative, and after the same random upstream gradient every parameter gradient within
    ``assert_param_grads_close``. The point must be well conditioned (``kink_margin`` at least KINK_MARGIN;
    ``conditioned_inputs`` draws such points): elsewhere no float32 gradient is determined."""
    ref64 = float64_oracle(ref)
    margin, where = kink_margin(ref64, x, t)
    assert margin >= KINK_MARGIN, (
        f"ill-conditioned parity point: {where} is {margin:.2g} from its kink in float64, within float32's "
        f"rounding (KINK_MARGIN {KINK_MARGIN}); draw the input with helpers.conditioned_inputs")
    y64 = ref64(x.double(), t)
    torch.testing.assert_close(y.double(), y64, atol=2e-5, rtol=1e-4)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    (y * g.to(y.dtype)).sum().backward()
    (y64 * g).sum().backward()
    assert_param_grads_close(model, ref64)


ATTENTION_BLOCKS = ["sa1", "sa2", "sa3", "sa4", "sa5", "sa6"]


def with_head_dim_8(model, block):
    """``model`` with ``block``'s attention replaced by one of head dim 8 (C // 8 heads), which no kernel
    takes, with the same weights."""
    sa = getattr(model, block)
    state = sa.mha.state_dict()
    sa.mha = torch.nn.MultiheadAttention(sa.channels, sa.channels // 8, batch_first=True)
    sa.mha.load_state_dict(state)
    return model


def assert_block_falls_back(choices, block, batch, backend):
    """The model at 8x8 with ``block``'s attention at head dim 8 in both models (``with_head_dim_8``), at a
    well-conditioned point: that block's attention runs on eager, every other block's on ``backend``, and
    the model matches the float64 reference, forward and every gradient. ``choices``: the tests' fixture
    of dispatch picks."""
    model, ref = model_pair(8)
    with_head_dim_8(model, block), with_head_dim_8(ref, block)
    x, t = conditioned_inputs(ref, batch, 8)
    y = model(x, t)
    attention = [b for op, b in choices if op == "attention"]
    k = ATTENTION_BLOCKS.index(block)
    assert attention[k] == "eager", attention
    assert set(attention[:k] + attention[k + 1:]) == {backend}, attention
    assert_matches_reference(model, ref, y, x, t)


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
