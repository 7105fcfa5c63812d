"""The GPU path as people run it, on CPU tensors under the interpreter: mixed precision
(``torch.autocast("cpu", dtype=torch.bfloat16)`` on a float32 model: the Triton launches take bf16
activations and weight matrices with the float32 (C,) parameters, the forward casts only the weight
matrices and its input, the float32 parameters get float32 gradients, and the output and gradients pass
the flash-attention rule against a float32 reference, judged by eager autocast's own error), the device
guard around every Triton custom op, and a forward that makes no tensor from host data.

The autocast path: ``fast_unet.dispatch`` casts an op's tensors of two or more dimensions for the compiled
backends (``autocast_args``); each forward custom op also has an Autocast kernel
(``dispatch.register_autocast``)."""
import pytest
import torch
import torch.utils._python_dispatch

from fast_unet import backends, dispatch
from helpers import inputs, model_pair

AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)


@pytest.fixture
def launches(monkeypatch):
    """Every Triton launch while the test runs: (kernel name, {pointer argument: dtype}, pointers the kernel's
    module declares float32 by design (statistics, partial sums) or (C,) parameters (float32 under
    autocast))."""
    import sys

    from triton.runtime.jit import KernelInterface

    out = []
    original = KernelInterface.__getitem__

    def getitem(kernel, grid):
        run = original(kernel, grid)
        fn = kernel
        while not hasattr(fn, "__code__"):
            fn = fn.fn
        names = list(getattr(kernel, "arg_names", []))
        module = sys.modules[fn.__module__]
        fp32 = set(getattr(module, "AOT_FP32_POINTERS", ())) | set(getattr(module, "AOT_PARAM_POINTERS", ()))

        def launch(*args, **kwargs):
            named = dict(zip(names, args), **kwargs)
            out.append((fn.__name__, {n: a.dtype for n, a in named.items() if isinstance(a, torch.Tensor)
                                      and a.is_floating_point()}, fp32))
            return run(*args, **kwargs)

        return launch

    monkeypatch.setattr(KernelInterface, "__getitem__", getitem)
    return out


def _takes_bf16(record):
    """A launch whose floating-point tensors are all bf16, but for those float32 by design and the (C,)
    parameters."""
    _name, dtypes, fp32 = record
    act = {n: dt for n, dt in dtypes.items() if n not in fp32}
    return bool(act) and all(dt == torch.bfloat16 for dt in act.values())


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


class _CountCasts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ``aten._to_copy`` calls (dtype casts) below it."""

    def __init__(self):
        super().__init__()
        self.casts = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.casts.append((tuple(args[0].shape), args[0].dtype, (kwargs or {}).get("dtype")))
        return func(*args, **(kwargs or {}))


def test_autocast_model_runs_bf16_kernels_and_passes_the_rule(monkeypatch, interpreter_tiles, launches):
    """Under CPU autocast (bf16) a float32 model's forward takes >= 90% of its Triton launches in bf16 (the
    (C,) parameters float32); it casts the weight matrices and its input, never a (C,) parameter that a
    Triton op takes; the output is bf16 as eager autocast's is; output and every parameter gradient
    (float32, on the float32 parameters) are within 2x eager autocast's error of the float32 reference, plus
    the bf16 floor. Each error is a max over one tensor, a heavy-tailed draw, so the rule is applied to the
    sum over three seeds (models, inputs, upstream gradients): on an AMD EPYC's PyTorch kernels one draw put
    a LayerNorm weight's gradient at 1.97-2.03x eager autocast's error, the sum of three at most 1.36x."""
    err, err_eager, floor = {}, {}, {}

    def add(name, out, out_eager, ref):
        err[name] = err.get(name, 0.0) + (out.double() - ref.double()).abs().max().item()
        err_eager[name] = err_eager.get(name, 0.0) + (out_eager.double() - ref.double()).abs().max().item()
        floor[name] = floor.get(name, 0.0) + 4e-3 * ref.abs().max().item()

    for seed in range(3):
        model, _ref = model_pair(16, 16, seed=seed)
        eager_model, _ = model_pair(16, 16, seed=seed)
        x, t = inputs(2, 16, 16, seed=seed + 1)
        g = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5 + seed))

        monkeypatch.setenv("FAST_UNET_BACKEND", "eager")
        y32 = eager_model(x, t)
        (y32.double() * g).sum().backward()
        grads32 = _grads(eager_model)
        eager_model.zero_grad()
        with torch.autocast(**AUTOCAST):
            y_eager = eager_model(x, t)
        (y_eager.double() * g).sum().backward()
        grads_eager = _grads(eager_model)

        monkeypatch.setenv("FAST_UNET_BACKEND", "triton")
        launches.clear()
        with torch.autocast(**AUTOCAST), _CountCasts() as counter:
            y = model(x, t)
        forward_launches = list(launches)

        params = dict(model.named_parameters())
        n_matrix = sum(p.dim() >= 2 for p in params.values())
        # Each weight matrix once (the blocks' time-embedding Linear weights too: the op reads them where they
        # are, one per block); + 1 the model's input; + 1 outc's bias (the final 1x1 nn.Conv2d runs eagerly,
        # and eager autocast casts a conv's bias). No other (C,) parameter is cast.
        expected = n_matrix + 1 + 1
        assert len(counter.casts) <= expected, (len(counter.casts), expected, counter.casts)
        assert sum(len(shape) < 2 for shape, _, _ in counter.casts) <= 1, counter.casts
        (y.double() * g).sum().backward()

        assert len(forward_launches) > 10
        bf16 = [r for r in forward_launches if _takes_bf16(r)]
        assert len(bf16) >= 0.9 * len(forward_launches), (
            f"{len(bf16)}/{len(forward_launches)} launches take bf16: not "
            + ", ".join(sorted({f"{n} {d}" for n, d, f in forward_launches if not _takes_bf16((n, d, f))})))
        assert y.dtype == y_eager.dtype == torch.bfloat16

        add("output", y, y_eager, y32)
        for name, p in model.named_parameters():
            assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
            add(f"grad {name}", p.grad, grads_eager[name], grads32[name])
    for name in err:
        assert err[name] <= 2 * err_eager[name] + floor[name], (
            f"{name}: error {err[name]:.3g} > 2 x eager autocast's {err_eager[name]:.3g} + {floor[name]:.3g} (3 seeds)")


def test_autocast_reasons_see_the_cast_arguments():
    """In an autocast region the compiled backends are asked about the arguments as they will take them:
    a bf16 activation with float32 weights is no mismatch, and the partials stay float32."""
    import fast_unet.ops  # noqa: F401  (registers the ops)

    x = torch.randn(2, 8, 16, dtype=torch.bfloat16)
    w, b = torch.randn(16, 16), torch.randn(16)
    assert dispatch.reasons("linear_residual", "triton", x, w, b, x)  # a dtype mismatch outside autocast
    with torch.autocast(**AUTOCAST):
        assert dispatch.reasons("linear_residual", "triton", x, w, b, x) == []
        y = torch.randn(2, 16, 4, 4)
        backend, _fn, args = dispatch.choose("group_norm_relu", (y, b, b, 1e-5, None, torch.zeros(2, 1, 3)))
        _b, _fn, largs = dispatch.choose("linear_residual", (x, w, b, x))
    assert backend == "triton"
    # the activation is cast; the (C,) weight and bias and the partials stay float32
    assert [a.dtype for a in args[:3]] == [torch.bfloat16, torch.float32, torch.float32]
    assert args[5].dtype == torch.float32
    assert [a.dtype for a in largs] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.bfloat16]
    assert largs[2] is b  # not copied


def test_autocast_on_a_direct_custom_op_call():
    """``torch.ops.fast_unet.conv3x3`` called directly under autocast casts its activation and weight matrix,
    not its (C,) parameters nor its float32 partials, and returns the autocast dtype (its Autocast kernel,
    the torch.library way)."""
    import fast_unet.ops  # noqa: F401

    from fast_unet.ops.group_norm import partials_of

    x = torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    pin = partials_of(x, None)
    w, b = torch.randn(16, 16, 3, 3), torch.randn(16)
    gw, gb = torch.ones(16), torch.zeros(16)
    with torch.autocast(**AUTOCAST), _CountCasts() as counter:
        y, part = torch.ops.fast_unet.conv3x3(x, None, pin, gw, gb, 1e-5, w, b, False)
    assert y.dtype == torch.bfloat16 and part.dtype == torch.float32
    assert sorted(shape for shape, _, _ in counter.casts) == sorted([w.shape, x.shape])  # not b, gw, gb


def test_every_triton_op_runs_under_the_device_guard(monkeypatch, interpreter_tiles):
    """Each Triton custom op's implementation enters ``backends.device_guard`` with its tensors' device
    (on a GPU: that device made current, so a model on cuda:1 launches there)."""
    entered = []
    original = backends.device_guard

    def spy(device):
        entered.append(device)
        return original(device)

    monkeypatch.setattr(backends, "device_guard", spy)
    calls = []
    model, _ = model_pair(8, 8)
    x, t = inputs(1, 8, 8)
    import torch.utils._python_dispatch as pd

    class Ops(pd.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "fast_unet" and not func.name().endswith("_ext"):
                calls.append(func)
            return func(*args, **(kwargs or {}))

    with Ops():
        model(x, t).sum().backward()
    assert len(calls) > 10 and len(entered) == len(calls), (len(entered), len(calls))
    assert set(entered) == {x.device}


def test_forward_makes_no_tensor_from_host_data(monkeypatch, interpreter_tiles):
    """No ``torch.tensor``/``as_tensor`` in a forward (on a GPU: a host-to-device copy, which a CUDA graph
    cannot capture), a Python-number timestep included."""
    model, _ = model_pair(8, 8)
    x, _t = inputs(2, 8, 8)
    model(x, 7)  # warm-up: caches may fill here

    def forbidden(*a, **k):
        raise AssertionError("a tensor made from host data in the forward")

    monkeypatch.setattr(torch, "tensor", forbidden)
    monkeypatch.setattr(torch, "as_tensor", forbidden)
    with torch.no_grad():
        y = model(x, 7)
        y2 = model(x, 7.0)
    assert torch.equal(y, y2)
