"""The drop-in UNet against the reference: keys, outputs, gradients, dtypes, layouts, bad input."""
import io

import pytest
import torch
import torch.nn.functional as F

from fast_unet import dispatch
from fast_unet import UNet
from fast_unet.reference import UNet as RefUNet, cast_reference

from helpers import (ATTENTION_BLOCKS, assert_block_falls_back, assert_close, assert_matches_reference,
                     conditioned_inputs, inputs, max_err, model_pair, reference_copy)


def test_state_dict_keys_and_shapes_match_reference():
    fast, ref = UNet().state_dict(), RefUNet(device="cpu").state_dict()
    assert list(fast) == list(ref)
    for k in ref:
        assert fast[k].shape == ref[k].shape, k
    n = sum(v.numel() for v in fast.values())
    assert 14.4e6 < n < 14.7e6, f"{n} parameters; docs/spec.md says about 14.55 M"


def test_constructor_matches_reference():
    m = UNet(c_in=1, c_out=2, time_dim=64, device="cuda")  # constructs without CUDA
    r = RefUNet(c_in=1, c_out=2, time_dim=64, device="cuda")
    assert m.device == "cuda" and m.time_dim == 64
    assert list(m.state_dict()) == list(r.state_dict())
    m.load_state_dict(r.state_dict(), strict=True)


def test_checkpoints_load_both_ways_strict():
    fast, ref = UNet(), RefUNet(device="cpu")
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    fast.load_state_dict(torch.load(buf), strict=True)
    buf = io.BytesIO()
    torch.save(fast.state_dict(), buf)
    buf.seek(0)
    back = RefUNet(device="cpu")
    back.load_state_dict(torch.load(buf), strict=True)
    for (k, a), (_, b) in zip(ref.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("size", [(64, 64), (32, 32), (48, 80)], ids=["64x64", "32x32", "48x80"])
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_forward_matches_reference(batch, size):
    h, w = size
    fast, ref = model_pair(h, w)
    x, t = inputs(batch, h, w)
    with torch.no_grad():
        expected = ref(x, t)
        out = fast(x, t)
    assert out.is_contiguous()
    assert_close(out, expected, atol=2e-5, rtol=1e-4, what=f"forward B={batch} {h}x{w}")


def _grads(model, x, t, noise):
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    F.mse_loss(model(x, t).double(), noise.double()).backward()
    return {"x": x.grad, **{k: p.grad for k, p in model.named_parameters()}}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("size,batch", [((32, 32), 3), ((48, 80), 2)], ids=["32x32-B3", "48x80-B2"])
def test_gradients_match_reference_float64(size, batch):
    """The implementation's math, without rounding: fast_unet in float64 against the reference in float64."""
    h, w = size
    fast, ref = model_pair(h, w)
    x, t = inputs(batch, h, w)
    noise = torch.randn_like(x)
    gold = _grads(cast_reference(ref, torch.float64), x.double(), t, noise)
    got = _grads(fast.double(), x.double(), t, noise)
    assert list(got) == list(gold)
    for name, g in gold.items():
        assert _rel(got[name], g) < 1e-9, f"grad {name}: relative error {_rel(got[name], g):.2e}"


@pytest.mark.parametrize("size,batch", [((16, 16), 2), ((8, 16), 3)], ids=["16x16-B2", "8x16-B3"])
def test_gradients_match_reference_float32(size, batch):
    """float32 fast_unet against the float64 reference at a well-conditioned point (every ReLU input and
    max-pool gap at least KINK_MARGIN from its kink, ``helpers.conditioned_inputs``): the output, and every
    gradient within 1e-4 of its largest element."""
    fast, ref = model_pair(*size)
    x, t = conditioned_inputs(ref, batch, *size)
    assert_matches_reference(fast, ref, fast(x, t), x, t)


@pytest.mark.parametrize("size,batch", [((32, 32), 3), ((64, 64), 1)], ids=["32x32-B3", "64x64-B1"])
def test_gradients_at_larger_sizes_float32(size, batch):
    """float32 fast_unet against the float64 reference where no point is well conditioned: with tens of
    thousands of ReLU inputs, some lie within float32's rounding of 0 and fall on either side in any float32
    model (the float32 reference is 4e-4 off float64 in the median parameter at 32x32 with oneDNN's AVX-512
    convolutions, 4e-7 with its SSE4.1 ones), moving every gradient upstream of them wholesale. So, per
    gradient, the relative error in norm: each below 1% (a wrong formula is off by O(1)), the median below
    1e-3. The strict check is test_gradients_match_reference_float32's."""
    h, w = size
    fast, ref = model_pair(h, w)
    x, t = inputs(batch, h, w)
    noise = torch.randn_like(x)
    gold = _grads(reference_copy(ref, torch.float64, h, w), x.double(), t, noise)
    got = _grads(fast, x, t, noise)
    errs = {name: _rel(got[name], g) for name, g in gold.items()}
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-2, f"grad {worst}: relative error {errs[worst]:.2e}"
    median = sorted(errs.values())[len(errs) // 2]
    assert median < 1e-3, f"median relative gradient error {median:.2e}"


@pytest.mark.parametrize("backend", ["eager", "ext"])
@pytest.mark.parametrize("size", [(64, 64), (48, 80)], ids=["64x64", "48x80"])
@pytest.mark.parametrize("batch", [1, 3])
def test_lazy_path_on_each_cpu_backend(monkeypatch, choices, backend, size, batch):
    """The one forward (blocks passing Lazy tensors; convs that normalise, pool or concatenate their input)
    on a forced CPU backend: forward and every gradient against the reference. ``ext`` runs the ops the
    extension implements on it and the others on their eager twins."""
    if backend == "ext":
        from helpers import require_ext

        require_ext()
    monkeypatch.setenv("FAST_UNET_BACKEND", backend)
    h, w = size
    fast, ref = model_pair(h, w)
    x, t = inputs(batch, h, w)
    with torch.no_grad():
        assert_close(fast(x, t), ref(x, t), atol=2e-5, rtol=1e-4, what=f"{backend} forward B={batch} {h}x{w}")
    ran = dict(choices)
    assert set(ran) >= {"conv3x3", "gn_relu_maxpool", "upsample2x", "gn_ln_linear", "group_norm_relu", "attention"}
    for op, b in choices:
        has_ext = "ext" in dispatch.implementations(op)
        assert b == ("ext" if backend == "ext" and has_ext else "eager"), (op, b)
    if backend == "eager":
        # the math without rounding: a float32 rounding flip of one ReLU or max-pool window moves the
        # gradients upstream of it wholesale (the eager path flips one at 48x80, B=1), hiding nothing here
        test_gradients_match_reference_float64(size, batch)
    else:  # the extension's kernels are float32: the rule at sizes where rounding flips are certain
        test_gradients_at_larger_sizes_float32(size, batch)


@pytest.mark.parametrize("backend", ["eager", "ext"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("block", ATTENTION_BLOCKS)
def test_attention_block_falling_back_on_each_cpu_backend(monkeypatch, choices, backend, block, batch):
    """One attention block at a time with head dim 8 (no kernel takes it) in both models, on a forced CPU
    backend: the model matches the float64 reference, forward and every gradient, at a well-conditioned
    point. ``ext``: ``auto`` on the CPU (no Triton here), which runs that block's attention on eager and
    the other blocks' on the extension (a forced ``ext`` refuses head dim 8). The Triton path's twin is
    tests/interpret/test_model.py::test_unet_with_an_attention_block_the_kernels_cannot_take."""
    if backend == "ext":
        from helpers import require_ext

        require_ext()
    monkeypatch.setenv("FAST_UNET_BACKEND", "auto" if backend == "ext" else backend)
    assert_block_falls_back(choices, block, batch, backend)


def test_eager_float32_gradients(monkeypatch):
    monkeypatch.setenv("FAST_UNET_BACKEND", "eager")
    test_gradients_match_reference_float32((16, 16), 2)
    test_gradients_at_larger_sizes_float32((32, 32), 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_flash_attention_rule(dtype):
    """Error against a float64 reference at most twice the reference's own error in ``dtype``, plus a floor."""
    h = 32
    fast, ref = model_pair(h)
    x, t = inputs(2, h)
    ref64, ref_lp = reference_copy(ref, torch.float64, h), reference_copy(ref, dtype, h)
    fast = fast.to(dtype)
    with torch.no_grad():
        gold = ref64(x.double(), t)
        pt_err = max_err(ref_lp(x.to(dtype), t), gold)
        out = fast(x.to(dtype), t)
    assert out.dtype == dtype
    err = max_err(out, gold)
    floor = {torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert err <= 2 * pt_err + floor, f"{dtype}: error {err:.3e} > 2 x PyTorch's {pt_err:.3e} + {floor}"


def test_low_precision_gradients_flash_attention_rule():
    """Every gradient of a bf16 model within twice the bf16 reference's error (plus a floor), both against the
    float64 reference. Each error is a max over one tensor, a heavy-tailed draw: over one draw per tensor
    (130 tensors) the worst ratio of two such draws sits near 2 for any implementation (fast_unet's all-eager
    path reaches 2.2 on one of three seeds), so the rule is applied to the sum of six draws (seeds). Three
    were not enough: with PyTorch's CPU kernels of an AMD EPYC (AVX512-BF16, no AMX), seeds 0-2 put the
    extension's path at 2.11 and the all-eager path at 1.61, seeds 0-5 at 1.20 and 1.15."""
    dtype, h = torch.bfloat16, 16
    err, pt_err, floor = {}, {}, {}
    for seed in range(6):
        fast, ref = model_pair(h, seed=seed)
        x, t = inputs(2, h, seed=seed + 1)
        zeros = torch.zeros_like(x)
        gold = _grads(reference_copy(ref, torch.float64, h), x.double(), t, zeros)
        pt = _grads(reference_copy(ref, dtype, h), x.to(dtype), t, zeros)
        got = _grads(fast.to(dtype), x.to(dtype), t, zeros)
        for k, g in gold.items():
            err[k] = err.get(k, 0.0) + max_err(got[k], g)
            pt_err[k] = pt_err.get(k, 0.0) + max_err(pt[k], g)
            floor[k] = floor.get(k, 0.0) + 1e-2 * g.abs().max().item() + 1e-6
    for k in err:
        assert err[k] <= 2 * pt_err[k] + floor[k], f"grad {k}: {err[k]:.3e} > 2 x {pt_err[k]:.3e} + {floor[k]:.1e} (6 seeds)"


@pytest.mark.parametrize("size", [(16, 16), (24, 40)], ids=lambda s: "x".join(map(str, s)))
def test_cpu_autocast_runs_the_extension_in_bf16_within_the_rule(monkeypatch, size):
    """Under CPU bf16 autocast on float32 weights, the extension takes group_norm_relu and attention in bf16 (the
    (C,) parameters float32); the output and every parameter gradient (float32) are within 2x eager autocast's
    error of the float32 model, plus the bf16 floor. Each error is a max over one tensor, a heavy-tailed
    draw, so the rule is applied to the sum over eight seeds (models, inputs and upstream gradients): one draw
    put fast_unet at 2.2-2.4x eager autocast's error on one tensor of an AMD EPYC at 24x40, the sums of
    seeds 0-3 and 4-7 at most 1.55x; on an AVX2-only AMD EPYC seeds 1 and 3 put sa5.ln.weight at 3.2x and
    3.3x, the sum of seeds 0-3 at 2.1x, of seeds 0-7 at 0.80 of the bound (2x + floor)."""
    from fast_unet import backends

    if backends.ext() is None:
        pytest.skip(f"fast_unet._C does not load: {backends.load_error('ext')}")
    h, w = size

    def run(m, backend, autocast, x, t, g):
        monkeypatch.setenv("FAST_UNET_BACKEND", backend)
        m.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y = m(x, t)
        (y.double() * g).sum().backward()
        return y, {n: p.grad.clone() for n, p in m.named_parameters()}

    err, err_eager, floor = {}, {}, {}

    def add(name, out, out_eager, ref):
        err[name] = err.get(name, 0.0) + max_err(out, ref)
        err_eager[name] = err_eager.get(name, 0.0) + max_err(out_eager, ref)
        floor[name] = floor.get(name, 0.0) + 4e-3 * ref.abs().max().item()

    for seed in range(8):
        model, _ = model_pair(h, w, seed=seed)
        eager_model, _ = model_pair(h, w, seed=seed)
        x, t = inputs(3, h, w, seed=seed + 1)
        g = torch.randn(3, 3, h, w, generator=torch.Generator().manual_seed(5 + seed))
        y32, g32 = run(eager_model, "eager", False, x, t, g)
        y_e, g_e = run(eager_model, "eager", True, x, t, g)
        y, grads = run(model, "auto", True, x, t, g)
        assert dispatch.last_choice["group_norm_relu"] == "ext" and dispatch.last_choice["attention"] == "ext", (
            dict(dispatch.last_choice))
        assert y.dtype == y_e.dtype == torch.bfloat16
        add("output", y, y_e, y32)
        for name, p in model.named_parameters():
            assert p.grad.dtype == torch.float32, name
            add(f"grad {name}", grads[name], g_e[name], g32[name])
    for name in err:
        assert err[name] <= 2 * err_eager[name] + floor[name], (
            f"{name}: error {err[name]:.3g} > 2 x eager autocast's {err_eager[name]:.3g} + {floor[name]:.3g} (8 seeds)")


def test_channels_last_input_gives_same_result_and_layout():
    fast, _ = model_pair(32)
    x, t = inputs(2, 32)
    with torch.no_grad():
        a = fast(x, t)
        b = fast(x.contiguous(memory_format=torch.channels_last), t)
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert_close(b, a, atol=1e-6, rtol=1e-6, what="channels_last vs NCHW")


@pytest.mark.parametrize("form", ["int", "float", "0-d", "1-elem", "float-tensor"])
def test_one_timestep_for_the_batch(form):
    fast, ref = model_pair(16)
    x, _ = inputs(3, 16)
    t = {"int": 7, "float": 7.0, "0-d": torch.tensor(7), "1-elem": torch.tensor([7]),
         "float-tensor": torch.full((3,), 7.0)}[form]
    with torch.no_grad():
        assert_close(fast(x, t), ref(x, torch.full((3,), 7)), atol=2e-5, rtol=1e-4, what=form)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_cast_takes_integer_t(dtype):
    m = UNet().to(dtype)
    x, t = inputs(2, 16, dtype=dtype)
    out = m(x, t)
    assert out.dtype == dtype and out.shape == x.shape and torch.isfinite(out.float()).all()


def test_parameters_keep_working_after_load_and_to():
    """channels_last conv weights must survive load_state_dict and .to() without breaking parity."""
    fast, ref = model_pair(16)
    fresh = UNet()
    fresh.load_state_dict(fast.state_dict())
    fresh = fresh.to(torch.float64).to(torch.float32)
    x, t = inputs(2, 16)
    with torch.no_grad():
        assert_close(fresh(x, t), ref(x, t), atol=2e-5, rtol=1e-4, what="after load + to")


BAD = {
    "3-D x": (lambda: torch.randn(3, 16, 16), lambda: torch.tensor([1]), ValueError, "x must be 4-D"),
    "channels": (lambda: torch.randn(1, 4, 16, 16), lambda: torch.tensor([1]), ValueError, "c_in=3"),
    "H not /8": (lambda: torch.randn(1, 3, 20, 16), lambda: torch.tensor([1]), ValueError, "multiples of 8"),
    "W not /8": (lambda: torch.randn(1, 3, 16, 12), lambda: torch.tensor([1]), ValueError, "multiples of 8"),
    "integer x": (lambda: torch.ones(1, 3, 16, 16, dtype=torch.long), lambda: torch.tensor([1]), TypeError, "x must be a floating-point"),
    "t batch": (lambda: torch.randn(2, 3, 16, 16), lambda: torch.tensor([1, 2, 3]), ValueError, "t must have shape (2,)"),
    "2-D t": (lambda: torch.randn(2, 3, 16, 16), lambda: torch.ones(2, 1), ValueError, "t must have shape"),
    "bool t": (lambda: torch.randn(2, 3, 16, 16), lambda: torch.ones(2, dtype=torch.bool), TypeError, "t must hold"),
    "str t": (lambda: torch.randn(2, 3, 16, 16), lambda: "7", TypeError, "t must be"),
    "list x": (lambda: [[1.0]], lambda: torch.tensor([1]), TypeError, "x must be a torch.Tensor"),
    "x dtype": (lambda: torch.randn(1, 3, 16, 16, dtype=torch.float64), lambda: torch.tensor([1]), TypeError, "dtype"),
    "x device": (lambda: torch.randn(1, 3, 16, 16, device="meta"), lambda: torch.tensor([1]), ValueError, "x is on meta"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_the_argument(case):
    make_x, make_t, exc, msg = BAD[case]
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)")):
        UNet()(make_x(), make_t())
