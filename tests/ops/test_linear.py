"""The attention block's token GEMMs: linear_residual, ln_linear (LayerNorm prologue, GELU epilogue),
mlp_residual (the feed-forward with its residual) and gn_ln_linear (GroupNorm + ReLU + emb from partial statistics, then LayerNorm, then the QKV GEMM), and the
LayerNorm backward fused into the GEMM that forms the normalised input's gradient (ln_linear_backward).

The Triton kernels (kernels/linear.py, kernels/ln_backward.py) against eager and float64 (the
flash-attention rule), forward and every input gradient, three dtypes, under the interpreter; opcheck of
the custom ops; bad inputs; the heaviest prologue compiled for sm_90. The extension has none of them.

The parity tests through the dispatched op run on every CPU backend (eager, ext: skipped, it has no
implementation, triton under the interpreter); the kernel-level tests on triton only.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_rule


# ---------------------------------------------------------------------------------------------------
# the Triton kernels under the interpreter (CPU tensors); the dispatched-op parity tests on eager too

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
_id = lambda s: "x".join(map(str, s))  # noqa: E731


def _rep(t, dtype):
    """float64 holding values representable in ``dtype`` (the same inputs for every path)."""
    return t.to(dtype).double() if t is not None else None


def _leaves(tensors, dtype):
    return [t.to(dtype).detach().requires_grad_() if t is not None else None for t in tensors]


def _check_all(names, outs, outs_e, refs, dtype):
    for name, o, oe, r in zip(names, outs, outs_e, refs):
        if o is None:
            continue
        assert o.dtype == dtype, name
        assert_close_rule(name, o, oe, r, dtype)


def _run(fn, tensors, dtype, grads_out):
    """fn(*leaves) -> tuple of outputs; backward of sum(out * g); returns (outputs, input grads)."""
    leaves = _leaves(tensors, dtype)
    outs = fn(*leaves)
    loss = sum((o.double() * g).sum() for o, g in zip(outs, grads_out))
    loss.backward()
    return outs, [t.grad if t is not None else None for t in leaves]


# ---------------------------------------------------------------------------------------------------
# linear_residual

def _eager_linear_residual(x, w, b, r):
    return (torch.addmm(r.reshape(-1, r.shape[-1]), x.reshape(-1, x.shape[-1]), w.t()).add(b).view(r.shape),)


# (lead dims, K, N_out): rows not a multiple of BLOCK_M, K and N_out not multiples of the blocks
LR_SHAPES = [((1, 35), 48, 48), ((3, 5, 7), 80, 80), ((2, 70), 64, 144)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LR_SHAPES, ids=lambda s: f"{_id(s[0])}-{s[1]}-{s[2]}")
@pytest.mark.op("linear_residual")
@pytest.mark.backends("eager", "ext", "triton")
@pytest.mark.usefixtures("backend")
def test_linear_residual(shape, dtype):
    from fast_unet import ops

    lead, k, n = shape
    x = _rep(torch.randn(*lead, k, dtype=torch.float64), dtype)
    w = _rep(torch.randn(n, k, dtype=torch.float64) / k ** 0.5, dtype)
    b = _rep(torch.randn(n, dtype=torch.float64) * 0.5, dtype)
    r = _rep(torch.randn(*lead, n, dtype=torch.float64) + 1.0, dtype)
    g = [torch.randn(*lead, n, dtype=torch.float64)]
    tensors = (x, w, b, r)
    outs, grads = _run(lambda *a: (ops.linear_residual(*a),), tensors, dtype, g)
    outs_e, grads_e = _run(_eager_linear_residual, tensors, dtype, g)
    refs, grads_r = _run(_eager_linear_residual, tensors, torch.float64, g)
    assert outs[0].shape == (*lead, n)
    _check_all(["out"], outs, outs_e, refs, dtype)
    _check_all(["dx", "dweight", "dbias", "dresidual"], grads, grads_e, grads_r, dtype)


# ---------------------------------------------------------------------------------------------------
# ln_linear

def _eager_ln_linear(gelu, eps=1e-5):
    def fn(x, lw, lb, w, b):
        z = F.linear(F.layer_norm(x, (x.shape[-1],), lw, lb, eps), w, b)
        return (F.gelu(z) if gelu else z,)
    return fn


# (lead dims, K, N_out, gelu)
LN_SHAPES = [((1, 35), 48, 48, True), ((3, 5, 7), 80, 240, False), ((2, 70), 64, 64, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LN_SHAPES, ids=lambda s: f"{_id(s[0])}-{s[1]}-{s[2]}-{'gelu' if s[3] else 'id'}")
@pytest.mark.op("ln_linear")
@pytest.mark.backends("eager", "ext", "triton")
@pytest.mark.usefixtures("backend")
def test_ln_linear(shape, dtype):
    from fast_unet import ops

    lead, k, n, gelu = shape
    x = _rep(torch.randn(*lead, k, dtype=torch.float64) * 2 + 0.7, dtype)  # a mean and a scale to remove
    lw = _rep(torch.randn(k, dtype=torch.float64) * 0.5 + 1.0, dtype)
    lb = _rep(torch.randn(k, dtype=torch.float64) * 0.5, dtype)
    w = _rep(torch.randn(n, k, dtype=torch.float64) / k ** 0.5, dtype)
    b = _rep(torch.randn(n, dtype=torch.float64) * 0.5, dtype)
    g = [torch.randn(*lead, n, dtype=torch.float64)]
    tensors = (x, lw, lb, w, b)
    ours = lambda x, lw, lb, w, b: (ops.ln_linear(x, lw, lb, 1e-5, w, b, gelu),)  # noqa: E731
    outs, grads = _run(ours, tensors, dtype, g)
    outs_e, grads_e = _run(_eager_ln_linear(gelu), tensors, dtype, g)
    refs, grads_r = _run(_eager_ln_linear(gelu), tensors, torch.float64, g)
    assert outs[0].shape == (*lead, n)
    _check_all(["out"], outs, outs_e, refs, dtype)
    _check_all(["dx", "dln_weight", "dln_bias", "dweight", "dbias"], grads, grads_e, grads_r, dtype)


# ---------------------------------------------------------------------------------------------------
# gn_ln_linear

def _partials(y, P):
    """(B, P, 3) float32 (count, mean, M2) of y as stored, over P contiguous chunks of each sample's NHWC
    memory (the layout a conv epilogue writes one partial per tile in)."""
    B = y.shape[0]
    flat = y.double().permute(0, 2, 3, 1).reshape(B, -1)
    out = []
    for chunk in flat.tensor_split(P, dim=1):
        var, mean = torch.var_mean(chunk, dim=1, correction=0)
        out.append(torch.stack([torch.full_like(mean, chunk.shape[1]), mean, var * chunk.shape[1]], -1))
    return torch.stack(out, 1).float()


def _eager_gn_ln_linear(eps=1e-5):
    def fn(y, gw, gb, emb, lw, lb, w, b):
        B, C, H, W = y.shape
        t = F.relu(F.group_norm(y, 1, gw, gb, eps))
        if emb is not None:
            t = t + emb[:, :, None, None]
        tokens = t.permute(0, 2, 3, 1).reshape(B, H * W, C)
        return F.linear(F.layer_norm(tokens, (C,), lw, lb, eps), w, b), t
    return fn


def _ours_gn_ln_linear(partials, eps=1e-5):
    from fast_unet import ops

    def fn(y, gw, gb, emb, lw, lb, w, b):
        return ops.gn_ln_linear(y.contiguous(memory_format=torch.channels_last), partials, gw, gb, eps, emb, lw, lb,
                               eps, w, b)
    return fn


def _gn_inputs(shape, dtype):
    B, C, H, W, n, P, emb_kind = shape
    y = _rep(torch.randn(B, C, H, W, dtype=torch.float64) * 3 + 1.5, dtype)  # y is un-normalised
    gw = _rep(torch.randn(C, dtype=torch.float64) * 0.5 + 1.0, dtype)
    gb = _rep(torch.randn(C, dtype=torch.float64) * 0.5, dtype)
    emb = None
    if emb_kind == "strided":
        emb = _rep(torch.randn(B, 3 * C, dtype=torch.float64), dtype)[:, C // 2: C // 2 + C]  # a column slice
    lw = _rep(torch.randn(C, dtype=torch.float64) * 0.5 + 1.0, dtype)
    lb = _rep(torch.randn(C, dtype=torch.float64) * 0.5, dtype)
    w = _rep(torch.randn(n, C, dtype=torch.float64) / C ** 0.5, dtype)
    b = _rep(torch.randn(n, dtype=torch.float64) * 0.5, dtype)
    return y, gw, gb, emb, lw, lb, w, b


# (B, C, H, W, N_out, P, emb): C 48 and 80 (not multiples of BLOCK_K), H*W 35 and 99 (masked rows, two
# row tiles per sample), 64 (exact), batch 1, 2 and 3, N_out = C and 3C, several partials, emb None or a
# strided column slice.
GN_SHAPES = [(1, 48, 5, 7, 144, 3, "strided"), (3, 80, 5, 7, 80, 2, None), (2, 64, 9, 11, 192, 4, "strided"),
             (3, 48, 8, 8, 48, 1, "strided")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GN_SHAPES, ids=lambda s: _id(s[:6]) + ("-emb" if s[6] else ""))
@pytest.mark.op("gn_ln_linear")
@pytest.mark.backends("eager", "ext", "triton")
@pytest.mark.usefixtures("backend")
def test_gn_ln_linear(shape, dtype):
    tensors = _gn_inputs(shape, dtype)
    B, C, H, W, n, P, _ = shape
    partials = _partials(tensors[0].to(dtype), P)
    g = [torch.randn(B, H * W, n, dtype=torch.float64), torch.randn(B, C, H, W, dtype=torch.float64)]
    outs, grads = _run(_ours_gn_ln_linear(partials), tensors, dtype, g)
    outs_e, grads_e = _run(_eager_gn_ln_linear(), tensors, dtype, g)
    refs, grads_r = _run(_eager_gn_ln_linear(), tensors, torch.float64, g)
    out, t = outs
    assert out.shape == (B, H * W, n) and t.shape == (B, C, H, W)
    assert t.is_contiguous(memory_format=torch.channels_last)
    _check_all(["out", "t"], outs, outs_e, refs, dtype)
    names = ["dy", "dgn_weight", "dgn_bias", "demb", "dln_weight", "dln_bias", "dweight", "dbias"]
    _check_all(names, grads, grads_e, grads_r, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.op("gn_ln_linear")
@pytest.mark.backends("eager", "ext", "triton")
@pytest.mark.usefixtures("backend")
def test_layer_norm_sees_t_as_stored(dtype):
    """t = 1 + small per-channel noise: in half precision most of it rounds to 1, so the LayerNorm of t as
    stored (the unfused path's) and of t before rounding differ completely."""
    from fast_unet import ops

    B, C, H, W, n = 2, 48, 5, 7, 48
    noise = 1e-3 if dtype == torch.bfloat16 else 2e-4
    y = torch.randn(B, C, H, W, dtype=dtype).contiguous(memory_format=torch.channels_last)
    gw, gb = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)  # GroupNorm part: relu(1) = 1
    emb = (torch.randn(B, C) * noise).to(dtype)
    lw, lb = torch.ones(C, dtype=dtype), torch.zeros(C, dtype=dtype)
    w, b = (torch.randn(n, C) / C ** 0.5).to(dtype), torch.zeros(n, dtype=dtype)
    out, t = ops.gn_ln_linear(y, _partials(y, 2), gw, gb, 1e-5, emb, lw, lb, 1e-5, w, b)
    out_e, t_e = _eager_gn_ln_linear()(y, gw, gb, emb, lw, lb, w, b)
    assert torch.equal(t, t_e)
    t_exact = 1 + emb.double()[:, :, None, None].expand(B, C, H, W)
    tok = t_exact.permute(0, 2, 3, 1).reshape(B, H * W, C)
    unrounded = F.linear(F.layer_norm(tok, (C,), lw.double(), lb.double(), 1e-5), w.double(), b.double())
    scale = out_e.double().abs().max().item()
    assert (unrounded - out_e.double()).abs().max().item() > 0.3 * scale  # the test can tell them apart
    torch.testing.assert_close(out.double(), out_e.double(), atol=0.03 * scale, rtol=0)


@pytest.mark.parametrize("which", ["out", "t"])
@pytest.mark.op("gn_ln_linear")
@pytest.mark.backends("eager", "ext", "triton")
@pytest.mark.usefixtures("backend")
def test_gn_ln_linear_gradient_of_each_output(which):
    """Only one output used: the other's gradient arrives as zeros/None and the sum must still be right."""
    shape = (2, 48, 5, 7, 48, 2, "strided")
    tensors = _gn_inputs(shape, torch.float32)
    B, C, H, W, n, P, _ = shape
    partials = _partials(tensors[0].float(), P)
    k = 0 if which == "out" else 1
    g = [torch.randn(B, H * W, n, dtype=torch.float64), torch.randn(B, C, H, W, dtype=torch.float64)]
    pick = lambda fn: (lambda *a: (fn(*a)[k],))  # noqa: E731
    _, grads = _run(pick(_ours_gn_ln_linear(partials)), tensors, torch.float32, [g[k]])
    _, grads_e = _run(pick(_eager_gn_ln_linear()), tensors, torch.float32, [g[k]])
    _, grads_r = _run(pick(_eager_gn_ln_linear()), tensors, torch.float64, [g[k]])
    for i, (a, e, r) in enumerate(zip(grads, grads_e, grads_r)):
        if which == "t" and i >= 4:  # LayerNorm and GEMM parameters: no gradient reaches them
            assert a is None or not a.any(), i
            continue
        assert_close_rule(f"grad {i}", a, e, r, torch.float32)


@pytest.mark.op("gn_ln_linear", "conv3x3")
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_gn_ln_linear_from_the_conv_epilogue():
    """The real producer: the Triton conv's (B, P, 3) partials (one per output tile)."""
    from fast_unet.kernels import conv as K
    from fast_unet.kernels import linear as L

    torch.manual_seed(1)
    x = torch.randn(2, 5, 9, 11).contiguous(memory_format=torch.channels_last)
    y, partials = K.conv3x3_stats(x, torch.randn(64, 5, 3, 3) / 6, torch.randn(64) + 0.5)
    assert partials.shape[1] > 1
    gw, gb, lw, lb = torch.randn(64) + 1, torch.randn(64), torch.randn(64) + 1, torch.randn(64)
    emb = torch.randn(2, 64)
    w, b = torch.randn(192, 64) / 8, torch.randn(192)
    out, t, mean, rstd = L.gn_ln_linear(y, partials, gw, gb, 1e-5, emb, lw, lb, 1e-5, w, b)
    out_e, t_e = _eager_gn_ln_linear()(y, gw, gb, emb, lw, lb, w, b)
    torch.testing.assert_close(t, t_e, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out, out_e, atol=5e-5, rtol=1e-5)
    var, m = torch.var_mean(y.double().reshape(2, -1), dim=1, correction=0)
    torch.testing.assert_close(mean.double(), m, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rstd.double(), 1 / torch.sqrt(var + 1e-5), atol=0, rtol=1e-5)


@pytest.mark.op("gn_ln_linear", "attention", "linear_residual", "mlp_residual")
@pytest.mark.backends("eager", "ext", "triton")
@pytest.mark.usefixtures("backend")
def test_attention_block_in_five_launches():
    """gn_ln_linear -> attention -> linear_residual -> mlp_residual (ln_linear(gelu) -> linear_residual)
    equals the model's SelfAttention on t = relu(GroupNorm(y)) + emb (float32, forward and parameter
    gradients)."""
    from fast_unet import ops
    from fast_unet.model import SelfAttention

    torch.manual_seed(2)
    B, C, H, W = 2, 64, 5, 7
    sa = SelfAttention(C)
    gn = torch.nn.GroupNorm(1, C)
    y = (torch.randn(B, C, H, W) * 2 + 1).contiguous(memory_format=torch.channels_last)
    emb = torch.randn(B, C)
    partials = _partials(y, 3)
    ln2, fc1, _, fc2 = sa.ff_self
    qkv, t = ops.gn_ln_linear(y, partials, gn.weight, gn.bias, gn.eps, emb, sa.ln.weight, sa.ln.bias, sa.ln.eps,
                             sa.mha.in_proj_weight, sa.mha.in_proj_bias)
    heads = sa.mha.num_heads
    o = ops.attention(qkv.view(B, H * W, 3, heads, C // heads))
    tokens = t.permute(0, 2, 3, 1).reshape(B, H * W, C)
    a = ops.linear_residual(o, sa.mha.out_proj.weight, sa.mha.out_proj.bias, tokens)
    out = ops.mlp_residual(a, ln2.weight, ln2.bias, ln2.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    out = out.view(B, H, W, C).permute(0, 3, 1, 2)
    t_ref = F.relu(gn(y)) + emb[:, :, None, None]
    ref = sa(t_ref)
    torch.testing.assert_close(out, ref, atol=5e-5, rtol=1e-4)
    g = torch.randn_like(ref)
    params = [gn.weight, gn.bias] + list(sa.parameters())
    got = torch.autograd.grad((out * g).sum(), params)
    exp = torch.autograd.grad((ref * g).sum(), params)
    for p, a_, e in zip(params, got, exp):
        torch.testing.assert_close(a_, e, atol=1e-4 * e.abs().max().item() + 1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# mlp_residual: x + fc2(gelu(fc1(LayerNorm(x)))); its backward adds the residual's gradient and sums fc2's
# bias gradient in the LayerNorm-backward GEMM's epilogue

def _eager_mlp_residual(x, lw, lb, w1, b1, w2, b2):
    f = F.gelu(F.linear(F.layer_norm(x, (x.shape[-1],), lw, lb, 1e-5), w1, b1))
    return (x + F.linear(f, w2, b2),)


# (lead dims, C, hidden): rows not a multiple of the row block; C padded (48 -> 64, 80 -> 128), hidden != C
MLP_SHAPES = [((1, 35), 48, 48), ((3, 5, 7), 80, 144), ((2, 70), 64, 64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MLP_SHAPES, ids=lambda s: f"{_id(s[0])}-{s[1]}-{s[2]}")
@pytest.mark.op("mlp_residual")
@pytest.mark.backends("eager", "ext", "triton")
@pytest.mark.usefixtures("backend")
def test_mlp_residual(shape, dtype):
    """Output and every input gradient (x: the LayerNorm path's plus the residual's; both layers' weights and
    biases; the LayerNorm's parameters) against eager in the dtype and float64."""
    from fast_unet import ops

    torch.manual_seed(sum(shape[0]) + shape[1] + shape[2])
    lead, c, hid = shape
    x = _rep(torch.randn(*lead, c, dtype=torch.float64) * 2 + 0.5, dtype)
    lw = _rep(torch.randn(c, dtype=torch.float64) * 0.5 + 1, dtype)
    lb = _rep(torch.randn(c, dtype=torch.float64), dtype)
    w1 = _rep(torch.randn(hid, c, dtype=torch.float64) / c ** 0.5, dtype)
    b1 = _rep(torch.randn(hid, dtype=torch.float64) * 0.5, dtype)
    w2 = _rep(torch.randn(c, hid, dtype=torch.float64) / hid ** 0.5, dtype)
    b2 = _rep(torch.randn(c, dtype=torch.float64) * 0.5, dtype)
    g = [torch.randn(*lead, c, dtype=torch.float64)]
    tensors = (x, lw, lb, w1, b1, w2, b2)
    outs, grads = _run(lambda x_, lw_, lb_, w1_, b1_, w2_, b2_: (
        ops.mlp_residual(x_, lw_, lb_, 1e-5, w1_, b1_, w2_, b2_),), tensors, dtype, g)
    outs_e, grads_e = _run(_eager_mlp_residual, tensors, dtype, g)
    refs, grads_r = _run(_eager_mlp_residual, tensors, torch.float64, g)
    assert outs[0].shape == (*lead, c)
    _check_all(["out"], outs, outs_e, refs, dtype)
    _check_all(["dx", "dln_weight", "dln_bias", "dweight1", "dbias1", "dweight2", "dbias2"], grads, grads_e,
               grads_r, dtype)


@pytest.mark.op("mlp_residual")
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_mlp_residual_backward_launches():
    """The backward: two matmuls for the second layer, the one LayerNorm-backward GEMM launch (with the
    residual's gradient, so no add) and its parameter sums (fc2's bias among them, so no torch sum), and the
    first layer's weight-gradient matmul; no elementwise torch op."""
    from fast_unet import ops
    from helpers import launches

    torch.manual_seed(0)
    x = torch.randn(3, 40, 64, requires_grad=True)
    lw, lb = torch.randn(64) + 1, torch.randn(64)
    w1, b1, w2, b2 = torch.randn(64, 64) / 8, torch.randn(64), torch.randn(64, 64) / 8, torch.randn(64)
    params = [p.requires_grad_() for p in (lw, lb, w1, b1, w2, b2)]
    out = ops.mlp_residual(x, lw, lb, 1e-5, w1, b1, w2, b2)
    with launches() as rec:
        out.backward(torch.randn_like(out))
    names = [r["name"] for r in rec]
    assert names[0] == "_ln_linear_bwd_kernel" and "_col_sum_split_kernel" in names, names
    assert all(p.grad is not None for p in [x] + params)
    out2 = ops.mlp_residual(x, lw, lb, 1e-5, w1, b1, w2, b2)
    g2 = torch.randn_like(out2)
    for p in [x] + params:
        p.grad = None  # else the leaves' gradients accumulate with an add_
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out2.backward(g2)
    aten = {e.key for e in prof.key_averages() if e.key.startswith("aten::")}
    assert not aten & {"aten::add", "aten::sum", "aten::add_"}, sorted(aten)


# ---------------------------------------------------------------------------------------------------
# registration, errors

def _small_args(op):
    x = torch.randn(2, 5, 48)
    w, b = torch.randn(96, 48) / 7, torch.randn(96)
    lw, lb = torch.randn(48) + 1, torch.randn(48)
    if op == "linear_residual":
        return (x, w, b, torch.randn(2, 5, 96))
    if op == "ln_linear":
        return (x, lw, lb, 1e-5, w, b, True)
    if op == "mlp_residual":
        return (x, lw, lb, 1e-5, w, b, torch.randn(48, 96) / 10, torch.randn(48))
    y = torch.randn(2, 48, 3, 5).contiguous(memory_format=torch.channels_last)
    return (y, _partials(y, 2), torch.randn(48) + 1, torch.randn(48), 1e-5, torch.randn(2, 48), lw, lb, 1e-5, w, b)


@pytest.mark.parametrize("op", ["linear_residual", "ln_linear", "mlp_residual", "gn_ln_linear"])
@pytest.mark.op("linear_residual", "ln_linear", "mlp_residual", "gn_ln_linear")
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_custom_op_registration(op):
    import fast_unet.ops  # noqa: F401  (registers the custom ops)

    args = list(_small_args(op))
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor) and not (op == "gn_ln_linear" and i == 1):  # partials: no gradient
            a.requires_grad_()
    torch.library.opcheck(getattr(torch.ops.fast_unet, op).default, tuple(args))


@pytest.mark.op("linear_residual", "ln_linear", "gn_ln_linear")
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_bad_inputs_name_the_argument():
    from fast_unet import ops
    from fast_unet.kernels import linear as L

    x, w, b, r = _small_args("linear_residual")
    with pytest.raises(ValueError, match=r"weight must have shape \(N_out, 48\)"):
        L.linear_residual(x, torch.randn(96, 40), b, r)
    with pytest.raises(ValueError, match=r"bias must have shape \(96,\)"):
        L.linear_residual(x, w, torch.randn(95), r)
    with pytest.raises(ValueError, match=r"residual must have shape \(2, 5, 96\)"):
        L.linear_residual(x, w, b, torch.randn(2, 5, 48))
    with pytest.raises(TypeError, match="bias has dtype torch.float16"):
        L.linear_residual(x, w, b.half(), r)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        L.linear_residual(x.double(), w, b, r)
    x, lw, lb, eps, w, b, _ = _small_args("ln_linear")
    with pytest.raises(ValueError, match=r"ln_weight must have shape \(48,\)"):
        L.ln_linear(x, torch.randn(47), lb, eps, w, b)
    big = torch.randn(2, 520)
    with pytest.raises(ValueError, match="at most 512"):
        L.ln_linear(big, torch.randn(520), torch.randn(520), eps, torch.randn(8, 520), torch.randn(8))
    args = list(_small_args("gn_ln_linear"))
    bad = {1: (torch.randn(2, 2, 3).double(), TypeError, "partials must be float32"),
           2: (torch.randn(47), ValueError, r"gn_weight must have shape \(48,\)"),
           5: (torch.randn(3, 48), ValueError, r"emb must have shape \(2, 48\)"),
           7: (torch.randn(48).half(), TypeError, "ln_bias has dtype")}
    for i, (val, err, msg) in bad.items():
        a = list(args)
        a[i] = val
        with pytest.raises(err, match=msg):
            L.gn_ln_linear(*a)
        reasons = ops.linear.triton_gn_ln_linear_reasons(*a)
        assert any(msg.split(" ")[0].split("\\")[0] in s for s in reasons), reasons
    y600 = torch.randn(1, 520, 2, 2)
    with pytest.raises(ValueError, match=r"y \(channels\) has 520 features; the LayerNorm prologue takes at most 512"):
        L.gn_ln_linear(y600, _partials(y600, 1), torch.ones(520), torch.zeros(520), 1e-5, None, torch.ones(520),
                       torch.zeros(520), 1e-5, torch.randn(8, 520), torch.randn(8))
    with pytest.raises(ValueError, match=r"partials must have shape \(2, P, 3\)"):
        L.gn_ln_linear(args[0], torch.randn(3, 2, 3), *args[2:])
    # the reasons functions: empty for good inputs, naming the argument otherwise
    assert ops.linear.triton_linear_residual_reasons(*_small_args("linear_residual")) == []
    assert ops.linear.triton_ln_linear_reasons(*_small_args("ln_linear")) == []
    assert ops.linear.triton_gn_ln_linear_reasons(*args) == []
    x, w, b, r = _small_args("linear_residual")
    assert any("residual" in s for s in ops.linear.triton_linear_residual_reasons(x, w, b, r[..., :5]))
    assert any("ln_weight" in s for s in ops.linear.triton_ln_linear_reasons(x, lw[:5], lb, eps, w, b))
    assert any("meta" in s for s in ops.linear.triton_linear_residual_reasons(x.to("meta"), w, b, r))


@pytest.mark.op("gn_ln_linear")
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_gn_ln_linear_compiles_for_sm90_without_spills():
    """The heaviest prologue, every config the launcher can pick, compiled for Hopper in a subprocess
    without TRITON_INTERPRET (see tests/test_aot.py): no spills, wgmma for bf16/fp16."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "fast_unet.info", "--compile", "sm_90", "--kernel", "gn_ln_linear",
                           "--json"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(proc.stdout)
    # (emb, no emb) x (1 float32 exact + 1 float32 TF32 + 2 bfloat16 + 2 float16 configs, the bf16/fp16 ones
    # also with float32 (C,) parameters), and the ints-equal-to-1 specialisations of the first build (4 singly
    # + all together)
    ones = [r for r in rows if "=1" in r["config"]]
    rows = [r for r in rows if "=1" not in r["config"]]
    assert len(rows) == 2 * (6 + 4) and len(ones) == 5, rows + ones
    for r in rows + ones:
        assert r["spill_bytes"] == 0, r
    for r in rows:  # float32 exact: FMA; TF32 and half precision: wgmma
        exact = r["config"].startswith("float32") and not r["config"].endswith("tf32")
        assert r["tensor_cores"] == ("no" if exact else "wgmma"), r


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.op("linear_residual", "ln_linear")
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_weight_read_through_its_strides(dtype):
    """A transposed or sliced weight view gives the same result as the contiguous weight (no copy made)."""
    from fast_unet.kernels import linear as L

    x = torch.randn(37, 48).to(dtype)
    r = torch.randn(37, 80).to(dtype)
    w = torch.randn(80, 48).to(dtype)
    b = torch.randn(80).to(dtype)
    base = L.linear_residual(x, w, b, r)
    for view in (w.t().contiguous().t(), torch.stack([w, w], 1)[:, 1]):
        assert not view.is_contiguous() and torch.equal(view, w)
        torch.testing.assert_close(L.linear_residual(x, view, b, r), base, atol=0, rtol=0)
        lw, lb = torch.ones(48, dtype=dtype), torch.zeros(48, dtype=dtype)
        torch.testing.assert_close(L.ln_linear(x, lw, lb, 1e-5, view, b, True),
                                   L.ln_linear(x, lw, lb, 1e-5, w, b, True), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------
# ln_linear_backward: dx, d ln_weight, d ln_bias vs eager and float64, three dtypes, every K config (padded K
# 64 to 512), rows not a multiple of the block

LNB_SHAPES = [(35, 48, 144), (70, 80, 80), (33, 128, 384), (64, 256, 256), (9, 512, 64)]  # (M, K, N_out)


def _lnb_grads(x, lw, lb, w, b, d, gelu, dtype, pdtype):
    """Autograd of [gelu](LayerNorm(x) @ w^T + b) with x, w, d in ``dtype`` and the (C,) parameters in
    ``pdtype`` (autocast's float32 parameters: the LayerNorm computed in float32, rounded to ``dtype``):
    (dx, d ln_w, d ln_b, d w, d b)."""
    leaves = [t.to(dt).detach().requires_grad_()
              for t, dt in ((x, dtype), (lw, pdtype), (lb, pdtype), (w, dtype), (b, pdtype))]
    h = F.layer_norm(leaves[0].to(pdtype), (x.shape[1],), leaves[1], leaves[2], 1e-5).to(dtype)
    out = F.linear(h, leaves[3], leaves[4].to(dtype))
    if gelu:
        out = F.gelu(out)
    out.backward(d.to(dtype))
    return [t.grad for t in leaves]


@pytest.mark.parametrize("dtype, pdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                           (torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
                         ids=["float32", "bfloat16", "float16", "bfloat16-fp32-params"])
@pytest.mark.parametrize("gelu", [False, True], ids=["id", "gelu"])
@pytest.mark.parametrize("shape", LNB_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.op("ln_linear")
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_ln_linear_backward(shape, gelu, dtype, pdtype):
    """The one-launch backward (+ its parameter sums and d W = d2^T @ h) against autograd of the unfused
    formula in the dtype and in float64: dx, every parameter gradient, and h and d2 themselves."""
    import fast_unet.ops  # noqa: F401  (registers the custom ops)

    torch.manual_seed(sum(shape) + gelu)
    m, k, n = shape
    x = (torch.randn(m, k, dtype=torch.float64) * 2 + 0.5).to(dtype).double()
    lw = (torch.randn(k, dtype=torch.float64) * 0.5 + 1).to(pdtype).double()
    lb = torch.randn(k, dtype=torch.float64).to(pdtype).double()
    w = (torch.randn(n, k, dtype=torch.float64) / k ** 0.5).to(dtype).double()
    b = (torch.randn(n, dtype=torch.float64) * 0.5).to(pdtype).double()
    d = torch.randn(m, n, dtype=torch.float64).to(dtype).double()
    dx, dlw, dlb, db, h, d2, dres_bias = torch.ops.fast_unet.ln_linear_backward(
        d.to(dtype), x.to(dtype), lw.to(pdtype), lb.to(pdtype), 1e-5, w.to(dtype), b.to(pdtype), gelu)
    assert dres_bias.numel() == 0
    dw = (d2 if gelu else d.to(dtype)).t() @ h
    eager = _lnb_grads(x, lw, lb, w, b, d, gelu, dtype, pdtype)
    ref = _lnb_grads(x, lw, lb, w, b, d, gelu, torch.float64, torch.float64)
    for name, g, ge, gr, want in zip(("dx", "dln_weight", "dln_bias", "dweight", "dbias"), (dx, dlw, dlb, dw, db),
                                     eager, ref, (dtype, pdtype, pdtype, dtype, pdtype)):
        assert g.dtype == want, name
        assert_close_rule(name, g, ge, gr, dtype)
    h64 = F.layer_norm(x, (k,), lw, lb, 1e-5)
    assert_close_rule("h", h, h64.to(pdtype).to(dtype), h64, dtype)
    if gelu:
        pre = F.linear(h64, w, b)
        d2_64 = torch.ops.aten.gelu_backward(d, pre)
        d2_eager = torch.ops.aten.gelu_backward(d.to(dtype), F.linear(h64.to(dtype), w.to(dtype), b.to(dtype)))
        assert_close_rule("d2", d2, d2_eager, d2_64, dtype)
    else:
        assert d2.numel() == 0


@pytest.mark.op("ln_linear")
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_registration_and_bad_inputs():
    import fast_unet.ops  # noqa: F401  (registers the custom ops)
    from fast_unet.kernels import ln_backward as L

    d, x, lw, lb, w, b = torch.randn(10, 24), torch.randn(10, 40), torch.randn(40), torch.randn(40), \
        torch.randn(24, 40), torch.randn(24)
    for gelu in (False, True):
        torch.library.opcheck(torch.ops.fast_unet.ln_linear_backward.default, (d, x, lw, lb, 1e-5, w, b, gelu))
    with pytest.raises(ValueError, match="weight must have shape"):
        L.ln_linear_bwd(d, x, lw, lb, 1e-5, torch.randn(24, 41), b)
    with pytest.raises(ValueError, match="at most 512"):
        L.ln_linear_bwd(torch.randn(2, 3), torch.randn(2, 520), torch.randn(520), torch.randn(520), 1e-5,
                        torch.randn(3, 520), torch.randn(3))
    with pytest.raises(TypeError, match="ln_weight"):
        L.ln_linear_bwd(d, x, lw.double(), lb, 1e-5, w, b)
    with pytest.raises(ValueError, match="ln_bias must have shape"):
        L.ln_linear_bwd(d, x, lw, lb[:3], 1e-5, w, b)
    with pytest.raises(ValueError, match="bias must have shape"):
        L.ln_linear_bwd(d, x, lw, lb, 1e-5, w, b[:5])
    with pytest.raises(TypeError, match="bias"):
        L.ln_linear_bwd(d.half(), x.half(), lw.half(), lb.half(), 1e-5, w.half(), b.bfloat16())
    res = torch.randn(10, 40)
    torch.library.opcheck(torch.ops.fast_unet.ln_linear_backward.default,
                          (d, x, lw, lb, 1e-5, w, b, True, res, torch.randn(40)))
    with pytest.raises(ValueError, match="res must be like x"):
        L.ln_linear_bwd(d, x, lw, lb, 1e-5, w, b, True, res[:9], torch.randn(40))
    with pytest.raises(ValueError, match="res_bias must have shape"):
        L.ln_linear_bwd(d, x, lw, lb, 1e-5, w, b, True, res, None)
    with pytest.raises(TypeError, match="res_bias"):
        L.ln_linear_bwd(d, x, lw, lb, 1e-5, w, b, True, res, torch.randn(40, dtype=torch.float64))


@pytest.mark.op("ln_linear")
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_ln_parameter_gradients_reduce_in_parallel_over_rows():
    """Many row blocks (M = 4160 rows: 130 programs of partial d ln_w, d ln_b): the parameter gradients
    are right (float64 reference) and their reduction runs on many programs, not one or two looping over
    every row block (the grids of the launches after the GEMM, recorded)."""
    from fast_unet.kernels import ln_backward as L
    from helpers import launches

    torch.manual_seed(0)
    M, K, N = 4160, 64, 64
    x = torch.randn(M, K) * 1.3 + 0.5
    lw, w, d = torch.randn(K) * 0.5 + 1.0, torch.randn(N, K) * 0.2, torch.randn(M, N)
    with launches() as rec:
        dx, dlw, dlb, db, _h, _d2, _ = L.ln_linear_bwd(d, x, lw, torch.zeros(K), 1e-5, w, torch.zeros(N))
    x64 = x.double()
    x_hat = (x64 - x64.mean(1, keepdim=True)) / torch.sqrt(x64.var(1, unbiased=False, keepdim=True) + 1e-5)
    dh = d.double() @ w.double()
    torch.testing.assert_close(dlw.double(), (dh * x_hat).sum(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dlb.double(), dh.sum(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(db.double(), d.double().sum(0), rtol=1e-5, atol=1e-4)
    gemm, *reduction = rec
    assert gemm["name"] == "_ln_linear_bwd_kernel"
    programs = gemm["grid"][0]
    assert programs >= 128
    # no program of the reduction loops over more than ~sqrt(programs) rows of partials (the batch-sum
    # kernel alone looped over all of them, on cdiv(K, 128) = 1 program), and one launch has many programs
    bound = 2 * math.isqrt(programs) + 16
    for r in reduction:
        serial = r["args"]["ROWS_PER_PROG"] if "ROWS_PER_PROG" in r["args"] else r["args"]["R"]
        assert serial <= bound, (r["name"], r["grid"], serial, bound)
    assert max(math.prod(r["grid"]) for r in reduction) >= 8, [(r["name"], r["grid"]) for r in reduction]
