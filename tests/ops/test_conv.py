"""conv3x3: the 3x3 conv (implicit GEMM, NHWC) with GroupNorm statistics in its epilogue, normalising its
input on load, max-pooling it on load or concatenating two inputs on load (the model's one forward), and
the gn_relu_partials op that materialises a lazily normalised tensor from those statistics.

The Triton kernels (kernels/conv.py) against eager and float64 under the flash-attention rule, under the
interpreter, with every real tile config of the conv (no faster stand-in config here, unlike
tests/interpret/test_model.py); opcheck of the custom ops; bad inputs. The extension has no conv.

The parity tests through the dispatched op run on every CPU backend (eager, ext: skipped, it has no
implementation, triton under the interpreter); the kernel-level tests on triton only.
"""
import pytest
import torch
import torch.nn.functional as F

from fast_unet import eager
from helpers import assert_close_rule, combine_partials, partials_of

pytestmark = pytest.mark.op("conv3x3")


# ---------------------------------------------------------------------------------------------------
# the Triton kernels under the interpreter (CPU tensors); the dispatched-op parity tests on eager too

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, C_in, C_out, H, W): odd channel counts and sizes, batch 1 and 3, tiles with masked rows and columns.
# In half precision H*W <= 64 takes the 64-row "small_hw" config, larger ones the 128-row configs with
# BLOCK_K 16 (C_in < 32) or 32, and C_out >= 128 the 128-wide N tile ("wide_n", with a masked N tile at
# 136): each of them is here.
SHAPES = [(3, 3, 64, 8, 8), (1, 5, 96, 5, 7), (3, 64, 64, 16, 8), (1, 64, 96, 5, 7), (1, 5, 64, 9, 11),
          (1, 40, 136, 9, 10)]
_id = lambda s: "x".join(map(str, s))  # noqa: E731


def _inputs(shape, dtype, with_emb=True):
    """float64 tensors holding values representable in ``dtype`` (the same inputs for every path)."""
    b, ci, co, h, w = shape
    x = torch.randn(b, ci, h, w, dtype=torch.float64) + 0.3
    wt = torch.randn(co, ci, 3, 3, dtype=torch.float64) / (3 * ci ** 0.5)
    bias = torch.randn(co, dtype=torch.float64) * 0.5 + 0.2
    gw = torch.randn(co, dtype=torch.float64) * 0.5 + 1.0
    gb = torch.randn(co, dtype=torch.float64) * 0.5
    emb = torch.randn(b, 2 * co, dtype=torch.float64)[:, co // 2: co // 2 + co] if with_emb else None  # strided
    return [t.to(dtype).double() if t is not None else None for t in (x, wt, bias, gw, gb, emb)]


def _leaves(tensors, dtype):
    out = [t.to(dtype).detach().requires_grad_() if t is not None else None for t in tensors]
    out[0] = out[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_conv_output_and_partial_statistics(shape, dtype):
    from fast_unet.kernels import conv as K
    from fast_unet.kernels import group_norm as G

    x, wt, bias = _inputs(shape, dtype)[:3]
    y, partials = K.conv3x3_stats(x.to(dtype).contiguous(memory_format=torch.channels_last), wt.to(dtype),
                                  bias.to(dtype))
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(x, wt, bias, padding=1)
    eag = F.conv2d(x.to(dtype), wt.to(dtype), bias.to(dtype), padding=1)
    assert_close_rule("conv", y, eag, ref, dtype)
    # padding edges on their own: first/last rows and columns
    for sl in ((slice(None), slice(None), 0), (slice(None), slice(None), -1), (Ellipsis, 0), (Ellipsis, -1)):
        assert_close_rule("conv edge", y[sl], eag[sl], ref[sl], dtype)
    # the partials: count per sample is C_out*H*W, and combined they give var_mean of y as stored
    b, _, co, h, w = shape
    assert partials.shape[0] == b and partials.shape[2] == 3
    torch.testing.assert_close(partials[:, :, 0].sum(1), torch.full((b,), float(co * h * w)))
    mean = torch.empty(b)
    rstd = torch.empty(b)
    G._gn_combine_kernel[(b,)](partials, mean, rstd, partials.shape[1], 1e-5, BLOCK_P=128)
    var_r, mean_r = torch.var_mean(y.double().reshape(b, -1), dim=1, correction=0)
    scale = y.double().abs().max().item()
    torch.testing.assert_close(mean.double(), mean_r, atol=1e-6 * scale, rtol=1e-5)
    torch.testing.assert_close(rstd.double(), 1 / torch.sqrt(var_r + 1e-5), atol=0, rtol=1e-5)


def _grads_of(fn, leaves, dtype, dy):
    """fn's output and the gradients of its leaves, computing in ``dtype`` from float64 leaves."""
    cast = [t.to(dtype).detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point()
            and t.dtype == torch.float64 else t for t in leaves]
    out = fn(*cast)
    (out.double() * dy).sum().backward()
    return out, [t.grad for t in cast if isinstance(t, torch.Tensor) and t.requires_grad]


def _conv_of_norm(y_in, gw, gb, wt, bias, partials=None):
    """The unfused composition: conv3x3(relu(GroupNorm(1, C)(y_in))) (partials unused: eager finds them)."""
    return F.conv2d(eager.group_norm_relu(y_in, gw, gb, 1e-5), wt, bias, padding=1)


# (B, C_in, C_out, H, W, P): the lazily normalised input's partials come in P uneven chunks; C_out >= 128
# takes the wide-N configs in half precision (64 rows at 7x7, 128 rows at 9x10).
NOL_SHAPES = [(1, 5, 64, 5, 7, 3), (3, 64, 96, 5, 7, 4), (2, 40, 64, 9, 11, 1), (1, 40, 130, 7, 7, 2),
              (2, 48, 136, 9, 10, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NOL_SHAPES, ids=_id)
@pytest.mark.backends("eager", "ext", "triton")
def test_normalise_on_load_forward_and_gradients(backend, shape, dtype):
    """conv3x3(relu(GroupNorm(y_in))) with the norm applied as the conv loads y_in (never written), from
    y_in's partials: output, its own partials, and the gradients of y_in, the conv and the norm's affine."""
    from fast_unet import ops

    b, ci, co, h, w, p = shape
    y_in = (torch.randn(b, ci, h, w, dtype=torch.float64) * 2 + 0.7).to(dtype).double()
    _, wt, bias = _inputs((b, ci, co, h, w), dtype)[:3]
    gw = (torch.randn(ci, dtype=torch.float64) * 0.5 + 1.0).to(dtype).double()
    gb = (torch.randn(ci, dtype=torch.float64) * 0.5).to(dtype).double()
    partials = partials_of(y_in.to(dtype), p)
    dy = torch.randn(b, co, h, w, dtype=torch.float64)

    def fused(y_in, gw, gb, wt, bias):
        y_in = y_in.contiguous(memory_format=torch.channels_last)
        y, part = ops.conv3x3(y_in, wt, bias, norm=(partials, gw, gb, 1e-5))
        fused.partials = part
        return y

    out, grads = _grads_of(fused, [y_in, gw, gb, wt, bias], dtype, dy)
    out_e, grads_e = _grads_of(_conv_of_norm, [y_in, gw, gb, wt, bias], dtype, dy)
    ref, grads_r = _grads_of(_conv_of_norm, [y_in, gw, gb, wt, bias], torch.float64, dy)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert_close_rule("y", out, out_e, ref, dtype)
    for sl in ((Ellipsis, 0), (Ellipsis, -1), (slice(None), slice(None), 0), (slice(None), slice(None), -1)):
        assert_close_rule("y padding edge", out[sl], out_e[sl], ref[sl], dtype)
    if backend.name.startswith("triton"):  # the kernel's epilogue statistics (eager's conv writes none)
        combined = combine_partials(fused.partials)
        var, mean = torch.var_mean(out.double().reshape(b, -1), dim=1, correction=0)
        torch.testing.assert_close(combined[0], mean, atol=1e-6 * out.double().abs().max().item(), rtol=1e-5)
        torch.testing.assert_close(combined[1], var, atol=0, rtol=1e-4)
    for name, g, ge, gr in zip(("dy_in", "dgn_weight", "dgn_bias", "dweight", "dbias"), grads, grads_e, grads_r):
        assert g.dtype == dtype, name
        assert_close_rule(name, g, ge, gr, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.backends("eager", "ext", "triton")
@pytest.mark.usefixtures("backend")
def test_concat_on_load_forward_and_gradients(dtype):
    """conv3x3(cat([x, x2], 1)) reading both in place (x NCHW through its strides, x2 channels_last)."""
    from fast_unet import ops

    b, c1, c2, co, h, w = 2, 24, 40, 48, 6, 5
    x = torch.randn(b, c1, h, w, dtype=torch.float64).to(dtype).double()
    x2 = torch.randn(b, c2, h, w, dtype=torch.float64).to(dtype).double()
    wt = (torch.randn(co, c1 + c2, 3, 3, dtype=torch.float64) / 24).to(dtype).double()
    bias = torch.randn(co, dtype=torch.float64).to(dtype).double()
    dy = torch.randn(b, co, h, w, dtype=torch.float64)

    def fused(x, x2, wt, bias):
        return ops.conv3x3(x, wt, bias, x2=x2.contiguous(memory_format=torch.channels_last))[0]

    def unfused(x, x2, wt, bias):
        return F.conv2d(torch.cat([x, x2], 1), wt, bias, padding=1)

    out, grads = _grads_of(fused, [x, x2, wt, bias], dtype, dy)
    out_e, grads_e = _grads_of(unfused, [x, x2, wt, bias], dtype, dy)
    ref, grads_r = _grads_of(unfused, [x, x2, wt, bias], torch.float64, dy)
    assert_close_rule("y", out, out_e, ref, dtype)
    for name, g, ge, gr in zip(("dx", "dx2", "dweight", "dbias"), grads, grads_e, grads_r):
        assert_close_rule(name, g, ge, gr, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 24, 40, 6, 10), (1, 64, 64, 16, 16), (1, 5, 64, 2, 2), (1, 40, 136, 9, 10)],
                         ids=_id)
@pytest.mark.backends("eager", "ext", "triton")
@pytest.mark.usefixtures("backend")
def test_pool_on_load_forward_and_gradients(shape, dtype):
    """conv3x3(max_pool2d(x, 2)) with the pool read on load (the pooled tensor is never written); x
    channels_last, (B, C_in, 2H, 2W). Each 2x2 window's values are 0.3 apart, so the pool's gradient
    routing is not a coin toss in half precision."""
    from fast_unet import ops

    b, ci, co, h, w = shape
    base = torch.randn(b, ci, h, w, dtype=torch.float64)
    offs = torch.rand(b, ci, h, w, 4).argsort(-1).double() * 0.3
    offs = offs.view(b, ci, h, w, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(b, ci, 2 * h, 2 * w)
    x = (base.repeat_interleave(2, 2).repeat_interleave(2, 3) + offs).to(dtype).double()
    _, wt, bias = _inputs((b, ci, co, h, w), dtype)[:3]
    dy = torch.randn(b, co, h, w, dtype=torch.float64)

    def fused(x, wt, bias):
        return ops.conv3x3(x.contiguous(memory_format=torch.channels_last), wt, bias, pool=True)[0]

    def unfused(x, wt, bias):
        return F.conv2d(F.max_pool2d(x, 2), wt, bias, padding=1)

    out, grads = _grads_of(fused, [x, wt, bias], dtype, dy)
    out_e, grads_e = _grads_of(unfused, [x, wt, bias], dtype, dy)
    ref, grads_r = _grads_of(unfused, [x, wt, bias], torch.float64, dy)
    assert out.shape == (b, co, h, w)
    assert_close_rule("y", out, out_e, ref, dtype)
    for sl in ((Ellipsis, 0), (Ellipsis, -1), (slice(None), slice(None), 0), (slice(None), slice(None), -1)):
        assert_close_rule("y padding edge", out[sl], out_e[sl], ref[sl], dtype)
    for name, g, ge, gr in zip(("dx", "dweight", "dbias"), grads, grads_e, grads_r):
        assert_close_rule(name, g, ge, gr, dtype)


# The Triton backward (kernels/conv.py: data gradient, weight gradient, its group sum) in every input mode:
# (mode, B, C_in, C_out, H, W) at the conv's output size, with 48x80 and 8x8, batches of 1 and 3, and
# batches of 8 whose weight gradient splits into groups (``wgrad_split``); 260 -> 136 channels has enough
# tiles not to split (d weight written directly). Plain inputs of fewer than 8 channels (3, 5, 7) take
# the weight gradient's TAPS_N form, 8 channels the per-tap one.
BWD_CASES = [("plain", 3, 5, 24, 8, 8), ("plain", 1, 3, 16, 48, 80), ("plain", 8, 7, 16, 16, 16),
             ("plain", 8, 8, 16, 16, 16), ("concat", 1, 20, 24, 48, 80),
             ("concat", 8, 16, 16, 16, 16), ("pool", 3, 8, 24, 8, 8), ("pool", 8, 8, 16, 16, 16),
             ("norm", 1, 20, 24, 48, 80), ("norm", 3, 40, 136, 8, 8), ("norm", 8, 8, 16, 16, 16),
             ("plain", 1, 260, 136, 4, 4)]


def _bwd_inputs(mode, b, ci, co, h, w, dtype):
    """float64 leaves holding values representable in dtype: (x, x2 or None, gw, gb, wt, bias), and dy."""
    g = torch.Generator().manual_seed(b * 1000 + ci * 10 + h)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    c1 = ci // 2 if mode == "concat" else ci
    if mode == "pool":  # 2x2 windows whose values are 0.3 apart: a routing that rounding cannot flip
        offs = torch.rand(b, ci, h, w, 4, generator=g).argsort(-1).double() * 0.3
        offs = offs.view(b, ci, h, w, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(b, ci, 2 * h, 2 * w)
        x = rnd(b, ci, h, w).repeat_interleave(2, 2).repeat_interleave(2, 3) + offs
    else:
        x = rnd(b, c1, h, w) * (2 if mode == "norm" else 1) + 0.5
    x2 = rnd(b, ci - c1, h, w) if mode == "concat" else None
    gw, gb = rnd(ci) * 0.5 + 1.0, rnd(ci) * 0.5
    wt, bias = rnd(co, ci, 3, 3) / (3 * ci ** 0.5), rnd(co) * 0.5
    q = lambda t: t.to(dtype).double() if t is not None else None  # noqa: E731
    return [q(t) for t in (x, x2, gw, gb, wt, bias)], rnd(b, co, h, w)


def _bwd_fns(mode, partials):
    from fast_unet import ops

    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731

    def fused(x, x2, gw, gb, wt, bias):
        if mode == "norm":
            return ops.conv3x3(cl(x), cl(wt), bias, norm=(partials, gw, gb, 1e-5))[0]
        return ops.conv3x3(cl(x), cl(wt), bias, x2=None if x2 is None else cl(x2), pool=mode == "pool")[0]

    def unfused(x, x2, gw, gb, wt, bias):
        a = {"plain": lambda: x, "concat": lambda: torch.cat([x, x2], 1), "pool": lambda: F.max_pool2d(x, 2),
             "norm": lambda: eager.group_norm_relu(x, gw, gb, 1e-5)}[mode]()
        return F.conv2d(a, wt, bias, padding=1)
    return fused, unfused


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: c[0] + "-" + _id(c[1:]))
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_backward_kernels_against_float64(case, dtype):
    """Every gradient of the Triton backward against eager (cuDNN's / ATen's convolution backward of the
    materialised input) and float64, under the flash-attention rule; the batch-8 cases run the split weight
    gradient into several groups and their sum, the others one group (and its sum), except 260 -> 136
    channels: enough tiles to write d weight directly."""
    from fast_unet.kernels import conv as K

    mode, b, ci, co, h, w = case
    leaves, dy = _bwd_inputs(mode, b, ci, co, h, w, dtype)
    partials = partials_of(leaves[0].to(dtype), 2) if mode == "norm" else None
    es = torch.tensor([], dtype=dtype).element_size()
    split, groups, _ = K.wgrad_split(b, h * w, ci, co, es, K.bwd_config(dtype, "wgrad"))
    assert (split and (groups > 1 or b != 8)) if ci < 256 else not split, (split, groups)
    names = ["dx", "dx2", "dgn_weight", "dgn_bias", "dweight", "dbias"]
    keep = [i for i, t in enumerate(leaves) if t is not None and (mode == "norm" or i not in (2, 3))]
    leaves = [leaves[i] for i in keep]
    fused, unfused = _bwd_fns(mode, partials)

    def call(fn):
        def f(*ts):
            full = [None] * 6
            for i, t in zip(keep, ts):
                full[i] = t
            return fn(*full)
        return f

    out, grads = _grads_of(call(fused), leaves, dtype, dy)
    _, grads_e = _grads_of(call(unfused), leaves, dtype, dy)
    _, grads_r = _grads_of(call(unfused), leaves, torch.float64, dy)
    for i, g, ge, gr in zip(keep, grads, grads_e, grads_r):
        assert g.dtype == dtype and g.shape == gr.shape, names[i]
        assert_close_rule(names[i], g, ge, gr, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("split", [True, False], ids=["split", "direct"])
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_weight_gradient_taps_form(split, layout, dtype, monkeypatch):
    """The weight gradient of a plain input with few channels (the model's first conv, on its NCHW image)
    takes the TAPS_N form, one column block over all 9 * C_in (tap, channel) pairs: d weight and d bias
    against eager and float64, written directly (split off by a lower WGRAD_SPLIT_BELOW) or as group sums,
    with 70 output channels (a masked second row block) and C_in = 1, 3 and 7 across the dtypes."""
    from fast_unet import ops
    from fast_unet.kernels import conv as K
    from helpers import launches

    if not split:
        monkeypatch.setattr(K, "WGRAD_SPLIT_BELOW", 1)
    ci = {torch.float32: 3, torch.bfloat16: 1, torch.float16: 7}[dtype]
    (x, _, _, _, wt, bias), dy = _bwd_inputs("plain", 2, ci, 70, 9, 13, dtype)
    x = x.requires_grad_(False)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)

    def fused(wt, bias):
        return ops.conv3x3(x.to(wt.dtype), wt.contiguous(memory_format=torch.channels_last), bias)[0]

    def unfused(wt, bias):
        return F.conv2d(x.to(wt.dtype), wt, bias, padding=1)

    with launches() as rec:
        _, grads = _grads_of(fused, [wt, bias], dtype, dy)
    wg = [r for r in rec if r["name"] == "_conv3x3_wgrad_kernel"]
    assert len(wg) == 1 and wg[0]["kwargs"]["TAPS_N"] and wg[0]["kwargs"]["SPLIT"] == split
    assert [r["name"] for r in rec].count("_conv3x3_wgrad_sum_kernel") == int(split)
    _, grads_e = _grads_of(unfused, [wt, bias], dtype, dy)
    _, grads_r = _grads_of(unfused, [wt, bias], torch.float64, dy)
    for name, g, ge, gr in zip(("dweight", "dbias"), grads, grads_e, grads_r):
        assert g.dtype == dtype and g.shape == gr.shape, name
        assert_close_rule(name, g, ge, gr, dtype)


@pytest.mark.parametrize("mode", ["plain", "norm"])
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_backward_float32_bias_and_no_input_gradient(mode):
    """Under autocast the bias stays float32 with bf16 activations: d bias comes out float32, summed in
    float32 (not rounded to bf16); without ``input_grad`` the data gradient is not launched and the weight
    gradient's group sums take a launch of their own, with the same d weight and d bias."""
    from fast_unet.kernels import conv as K
    from helpers import launches

    leaves, dy = _bwd_inputs(mode, 8, 8, 16, 16, 16, torch.bfloat16)
    x, _, gw, gb, wt = (t.to(torch.bfloat16) if t is not None else None for t in leaves[:5])
    x, wt = x.contiguous(memory_format=torch.channels_last), wt.contiguous(memory_format=torch.channels_last)
    norm = (partials_of(x, 2), gw, gb, 1e-5) if mode == "norm" else None
    dyb = dy.to(torch.bfloat16)
    dx, _, dw, db, _, _ = K.conv3x3_bwd(dyb, x, wt, torch.float32, norm=norm)
    assert db.dtype == torch.float32 and dw.dtype == torch.bfloat16
    torch.testing.assert_close(db.double(), dyb.double().sum((0, 2, 3)), atol=1e-4, rtol=1e-5)
    with launches() as rec:
        none = K.conv3x3_bwd(dyb, x, wt, torch.float32, norm=norm, input_grad=False)
    assert none[0] is None and none[4] is None
    assert [r["name"] for r in rec] == ["_conv3x3_wgrad_kernel", "_conv3x3_wgrad_sum_kernel"]
    assert torch.equal(none[2], dw) and torch.equal(none[3], db)


@pytest.mark.parametrize("mode", ["concat", "pool", "norm"])
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_backward_rebuilds_no_input(mode):
    """The backward reads the input as the forward did: no concatenation, max-pool, normalisation pass or
    ATen convolution gradient, only the Triton launches: the weight gradient (split into groups here), the
    data gradient (which adds the groups' sums), the GroupNorm backward's apply pass after a normalised
    input."""
    from helpers import launches

    leaves, dy = _bwd_inputs(mode, 8, 8, 16, 16, 16, torch.float32)
    partials = partials_of(leaves[0].float(), 2) if mode == "norm" else None
    fused = _bwd_fns(mode, partials)[0]
    ts = [t.float().requires_grad_() if t is not None else None for t in leaves]
    out = fused(*ts)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with launches() as rec:
            out.backward(dy.float())
    names = [r["name"] for r in rec]
    want = ["_conv3x3_wgrad_kernel", "_conv3x3_dgrad_kernel"] + (["_gn_bwd_dx_kernel"] if mode == "norm" else [])
    assert names == want, names
    aten = {e.key for e in prof.key_averages() if e.key.startswith("aten::")}
    banned = {"aten::convolution_backward", "aten::cat", "aten::max_pool2d_with_indices", "aten::add",
              "aten::max_pool2d_with_indices_backward", "aten::sum", "aten::native_group_norm"}
    assert not aten & banned, sorted(aten & banned)


@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_gn_relu_partials_op_materialises_with_emb_and_its_gradient():
    y = (torch.randn(2, 48, 5, 7, dtype=torch.float64) + 0.5).float().contiguous(memory_format=torch.channels_last)
    y.requires_grad_()
    gw, gb = torch.randn(48, requires_grad=True), torch.randn(48, requires_grad=True)
    emb = torch.randn(2, 96)[:, ::2].requires_grad_()
    partials = partials_of(y.detach(), 5)
    out, mean, rstd = torch.ops.fast_unet.gn_relu_partials(y, partials, gw, gb, 1e-5, emb)
    exp = eager.group_norm_relu(y, gw, gb, 1e-5, emb)
    var_r, mean_r = torch.var_mean(y.detach().double().reshape(2, -1), dim=1, correction=0)
    torch.testing.assert_close(mean.double(), mean_r, atol=1e-6, rtol=1e-5)  # stored by the apply kernel
    torch.testing.assert_close(rstd.double(), 1 / torch.sqrt(var_r + 1e-5), atol=0, rtol=1e-5)
    torch.testing.assert_close(out, exp, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (y, gw, gb, emb), g)
    want = torch.autograd.grad(exp, (y, gw, gb, emb), g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-4)


def test_config_takes_the_wide_n_tile_where_it_compiles_without_spills():
    """Half precision with C_out >= 128: the 128-wide N tile for the input modes WIDE_N_MODES lists, the
    variant's own tile for the others (concat) and below 128 output channels; float32 never."""
    from fast_unet.kernels import conv as K

    wide, small_wide = K.CONFIGS[("half", "wide_n")], K.CONFIGS[("half", "small_hw_wide_n")]
    assert K.config(torch.bfloat16, 64, 1024, c_out=128) == wide
    assert K.config(torch.float16, 128, 256, True, 256) == wide
    assert K.config(torch.bfloat16, 128, 1024, c_out=128, norm=True) == wide
    assert K.config(torch.bfloat16, 512, 64, c_out=512, norm=True) == small_wide
    assert K.config(torch.bfloat16, 256, 64, c_out=512) == K.CONFIGS[("half", "small_hw")]
    assert K.config(torch.bfloat16, 512, 256, c_out=128, concat=True) == K.CONFIGS[("half", "wide_k")]
    assert K.config(torch.bfloat16, 64, 1024, c_out=64, norm=True) == K.CONFIGS[("half", "wide_k")]
    assert K.config(torch.bfloat16, 3, 4096, c_out=128) == K.CONFIGS[("half", "narrow_k")]
    assert K.config(torch.float32, 128, 1024, c_out=256, norm=True) == K.CONFIGS[("float32", "norm")]
    assert K.config(torch.float32, 128, 1024, c_out=256, concat=True) == K.CONFIGS[("float32", "wide_k")]
    # every (config, input mode) the launcher can pick is a build of the compile report, warps and stages too
    builds = K.aot_builds()
    built = {(b[3], b[4]["BLOCK_M"], b[4]["BLOCK_N"], b[4]["BLOCK_K"], b[5]["num_warps"], b[5]["num_stages"],
              b[4]["NORM_IN"], b[4]["HAS_X2"], b[4]["POOL_IN"]) for b in builds if b[0] == "conv3x3_gn"}
    for dt in ("bfloat16", "float16", "float32"):
        for c_in, hw, c_out in [(3, 4096, 64), (64, 1024, 64), (64, 1024, 128), (256, 64, 512), (512, 64, 128)]:
            for norm, concat, pool in [(False, False, False), (True, False, False), (False, True, False),
                                       (False, False, True)]:
                tile = K.config(dt, c_in, hw, pool, c_out, norm, concat)
                assert (dt, *tile, norm, concat, pool) in built, (dt, c_in, hw, c_out, norm, concat, pool)
    # and so is every (config, input mode) of the backward's data and weight gradients
    # (the weight gradient of a plain input of 3 channels in its TAPS_N form)
    for label, kind_of_pass in (("conv3x3_dgrad", "dgrad"), ("conv3x3_wgrad", "wgrad")):
        bwd = {(b[3], b[4]["BLOCK_M"], b[4]["BLOCK_N"], b[4]["BLOCK_K"], b[5]["num_warps"], b[5]["num_stages"],
                b[4]["NORM_IN"], b[4]["HAS_X2"], b[4]["POOL_IN"], b[4].get("TAPS_N", False))
               for b in builds if b[0] == label}
        for dt in ("bfloat16", "float16", "float32"):
            for c_in, hw, c_out in [(3, 4096, 64), (64, 1024, 64), (64, 1024, 128), (256, 64, 512), (512, 64, 128)]:
                for norm, concat, pool in [(False, False, False), (True, False, False), (False, True, False),
                                           (False, False, True)]:
                    taps = kind_of_pass == "wgrad" and K.uses_taps(c_in, K.is_plain(concat or None, norm or None, pool))
                    tile = K.bwd_config(dt, "wgrad_taps" if taps else kind_of_pass, hw, c_in, c_out, pool,
                                        not (norm or concat or pool))
                    assert (dt, *tile, norm, concat, pool, taps) in bwd, (label, dt, c_in, hw, c_out, norm, concat,
                                                                         pool)


@pytest.mark.parametrize("variant", ["plain", "concat", "norm", "pool", "gn_relu_partials", "norm_wide_bf16"])
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_custom_op_registration(variant):
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration, AOT-dispatch tracing."""
    import fast_unet.ops  # noqa: F401  (registers the custom ops)

    x = torch.randn(2, 5, 5, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(64, 5, 3, 3, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    gw, gb = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    if variant == "plain":
        op, args = "conv3x3", (x, None, None, None, None, 0.0, w, b, False)
    elif variant == "concat":
        x2 = torch.randn(2, 3, 5, 7).contiguous(memory_format=torch.channels_last).requires_grad_()
        op, args = "conv3x3", (x, x2, None, None, None, 0.0, torch.randn(64, 8, 3, 3, requires_grad=True), b, False)
    elif variant == "norm":
        op, args = "conv3x3", (x, None, partials_of(x.detach(), 2), gw, gb, 1e-5, w, b, False)
    elif variant == "pool":
        xp = torch.randn(2, 5, 6, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
        op, args = "conv3x3", (xp, None, None, None, None, 0.0, w, b, True)
    elif variant == "norm_wide_bf16":  # the fake's partials count follows the 128-wide N tile
        xw = torch.randn(1, 40, 9, 10, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        gw40, gb40 = (torch.randn(40, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
        ww = torch.randn(136, 40, 3, 3, dtype=torch.bfloat16, requires_grad=True)
        op, args = "conv3x3", (xw.requires_grad_(), None, partials_of(xw.detach(), 2), gw40, gb40, 1e-5, ww,
                               torch.randn(136, dtype=torch.bfloat16, requires_grad=True), False)
    else:
        op, args = "gn_relu_partials", (x, partials_of(x.detach(), 2), gw, gb, 1e-5, torch.randn(2, 5, requires_grad=True))
    torch.library.opcheck(getattr(torch.ops.fast_unet, op).default, args)


@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_bad_inputs_name_the_argument():
    from fast_unet.kernels import conv as K

    x = torch.randn(2, 5, 4, 4)
    with pytest.raises(ValueError, match=r"weight must have shape \(C_out, 5, 3, 3\)"):
        K.conv3x3_stats(x, torch.randn(8, 4, 3, 3), torch.randn(8))
    with pytest.raises(ValueError, match="bias must have shape"):
        K.conv3x3_stats(x, torch.randn(8, 5, 3, 3), torch.randn(7))
    with pytest.raises(TypeError, match="weight has dtype"):
        K.conv3x3_stats(x, torch.randn(8, 5, 3, 3).double(), torch.randn(8))
    with pytest.raises(ValueError, match="x2 must be"):
        K.conv3x3_stats(x, torch.randn(8, 8, 3, 3), torch.randn(8), x2=torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"weight must have shape \(C_out, 8, 3, 3\)"):
        K.conv3x3_stats(x, torch.randn(8, 5, 3, 3), torch.randn(8), x2=torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="height and width must be even to be max-pooled"):
        K.conv3x3_stats(torch.randn(2, 5, 5, 4), torch.randn(8, 5, 3, 3), torch.randn(8), pool=True)
    with pytest.raises(ValueError, match="pool .* applies to a single input"):
        K.conv3x3_stats(x, torch.randn(8, 8, 3, 3), torch.randn(8), x2=torch.randn(2, 3, 4, 4), pool=True)
    with pytest.raises(ValueError, match="norm partials must be float32"):
        K.conv3x3_stats(x, torch.randn(8, 5, 3, 3), torch.randn(8), norm=(torch.randn(2, 3), torch.ones(5),
                                                                          torch.zeros(5), 1e-5))
    with pytest.raises(ValueError, match="norm gn_weight must have shape"):
        K.conv3x3_stats(x, torch.randn(8, 5, 3, 3), torch.randn(8), norm=(torch.randn(2, 3, 3), torch.ones(4),
                                                                          torch.zeros(5), 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_weight_read_through_its_strides(dtype):
    """The kernel reads the weight in place: channels_last (the model's, K-contiguous), NCHW and a
    non-contiguous view all give the same conv."""
    from fast_unet.kernels import conv as K

    x, wt, bias = (t.to(dtype) for t in _inputs((1, 64, 96, 5, 7), dtype)[:3])
    x = x.contiguous(memory_format=torch.channels_last)
    base = K.conv3x3_stats(x, wt.contiguous(), bias)[0]
    cl = K.conv3x3_stats(x, wt.contiguous(memory_format=torch.channels_last), bias)[0]
    view = torch.stack([wt, wt], 1)[:, 0]  # wt again, with stride 2 * 9 * C_in on dim 0
    assert not view.is_contiguous() and torch.equal(view, wt)
    strided = K.conv3x3_stats(x, view, bias)[0]
    torch.testing.assert_close(cl, base, atol=0, rtol=0)
    torch.testing.assert_close(strided, base, atol=0, rtol=0)
