"""The whole UNet on the Triton backend (under the interpreter) vs the reference, forward and every
parameter gradient; per-op overrides that put fused ops on their eager twins; and the fallback of the ops
that cannot take an input (head dims and widths the kernels do not take) while the others stay on Triton.

Under the interpreter a conv launch costs ~1 s per thousand K-steps, so the model tests replace the
conv's and the linear's tile tables with one large tile per small sample (``interpreter_tiles``): the
wiring is what these tests check; every real config is checked in tests/ops/test_conv.py and test_linear.py."""
import pytest
import torch

import fast_unet
from fast_unet import dispatch
from fast_unet.reference import make_reference
from helpers import (KINK_MARGIN, assert_block_falls_back, assert_matches_reference,
                     conditioned_inputs, float64_oracle, kink_margin, model_pair, reference_copy)

FUSED = {"conv3x3", "gn_relu_maxpool", "upsample2x", "gn_ln_linear"}


@pytest.mark.parametrize("setting", ["triton", "triton,conv3x3=eager", "triton,gn_ln_linear=eager,upsample2x=eager,mlp_residual=eager"])
def test_unet_matches_reference(monkeypatch, interpreter_tiles, choices, setting):
    """Float32, 16x16, batch 2, NCHW input (read in place by the first conv). ``triton``: every op on
    Triton; an override runs that op on its eager twin, whose pieces still run on Triton, and the ops
    downstream of a conv without partial statistics step aside for their eager twins."""
    monkeypatch.setenv("FAST_UNET_BACKEND", setting)
    model, ref = model_pair(16)
    x, t = conditioned_inputs(ref, 2, 16)
    y = model(x, t)
    ran = set(choices)
    # every op runs; group_norm_relu only where a fused op's eager twin materialises a Lazy, ln_linear only in
    # mlp_residual's eager twin (the UNet's attention blocks get Lazy inputs: their first GEMM is gn_ln_linear)
    expected = set(dispatch.OPS) - {"group_norm_relu"} - (set() if "mlp_residual=eager" in setting else {"ln_linear"})
    assert {op for op, _ in ran} >= expected
    overridden = {part.split("=")[0] for part in setting.split(",")[1:]}
    for op, backend in ran:
        if op in overridden:
            assert backend == "eager", (op, backend)
        elif op not in FUSED:
            assert backend == "triton", (op, backend)
    if not overridden:
        assert {b for _, b in ran} == {"triton"}, ran
    assert y.is_contiguous()
    assert_matches_reference(model, ref, y, x, t)


def test_unet_non_square_channels_last(monkeypatch, interpreter_tiles):
    """8x16 (a 1x2 bottleneck), batch 1, channels_last input: the output keeps the input's format."""
    model, ref = model_pair(8, 16)
    x, t = conditioned_inputs(ref, 1, 8, 16)
    x = x.contiguous(memory_format=torch.channels_last)
    y = model(x, t)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_matches_reference(model, ref, y, x, t)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_unet_half_precision_forward(monkeypatch, interpreter_tiles, dtype):
    """bf16/fp16 vs the float64 reference, judged by the eager model's own error in the same dtype (the
    flash-attention rule, on the whole forward)."""
    model, ref = model_pair(8, 8)
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([3, 517])
    ref64 = reference_copy(ref, torch.float64, 8, 8)
    with torch.no_grad():
        y = model.to(dtype)(x.to(dtype), t)
        monkeypatch.setenv("FAST_UNET_BACKEND", "eager")
        y_eager = model(x.to(dtype), t)
        y64 = ref64(x.to(dtype).double(), t)
    assert y.dtype == dtype
    err = (y.double() - y64).abs().max().item()
    err_eager = (y_eager.double() - y64).abs().max().item()
    assert err <= 2 * err_eager + 1e-2 * y64.abs().max().item(), (err, err_eager)


def _reference_block(sa):
    """The seed's SelfAttention (need_weights as the seed has it) with ``sa``'s parameters."""
    ref = make_reference(8, 8).sa1.__class__(sa.channels, 4)
    ref.mha = torch.nn.MultiheadAttention(sa.channels, sa.mha.num_heads, batch_first=True)
    ref.load_state_dict(sa.state_dict(), strict=True)
    return ref


@pytest.mark.parametrize("channels, heads", [(32, 4), (1024, 4), (128, 16)], ids=["C32", "C1024", "d8"])
def test_attention_block_falls_back_op_by_op(monkeypatch, choices, channels, heads):
    """With the default backend, a SelfAttention whose head dim (8, 256) or width (1024 > the LayerNorm
    prologue's 512) the kernels do not take runs: those ops fall back, the others stay on Triton."""
    monkeypatch.setenv("FAST_UNET_BACKEND", "auto")
    torch.manual_seed(3)
    sa = fast_unet.SelfAttention(channels)
    sa.mha = torch.nn.MultiheadAttention(channels, heads, batch_first=True)
    ref = _reference_block(sa)
    h, w = (2, 3) if channels > 512 else (4, 6)
    x = torch.randn(2, channels, h, w)
    ref.size = None
    y = sa(x)
    ran = dict(choices)
    assert ran["attention"] != "triton"  # head dim channels // heads not in (16, 32, 64)
    assert ran["linear_residual"] == "triton"
    assert ran["ln_linear"] == ("triton" if channels <= 512 else "eager")
    x_tokens = x.flatten(2).transpose(1, 2)
    x_ln = ref.ln(x_tokens)
    a = ref.mha(x_ln, x_ln, x_ln)[0] + x_tokens
    y_ref = (ref.ff_self(a) + a).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(y)
    got = torch.autograd.grad((y * g).sum(), list(sa.parameters()))
    want = torch.autograd.grad((y_ref * g).sum(), list(ref.parameters()))
    for (name, _), a_, e in zip(sa.named_parameters(), got, want):
        torch.testing.assert_close(a_, e, atol=1e-4 * e.abs().max().item() + 1e-6, rtol=1e-4, msg=name)


# The first, a middle and the last attention block (each case is a whole model's forward and backward under
# the interpreter, minutes here); every block on the CPU backends: tests/test_model.py.
@pytest.mark.parametrize("block,batch", [("sa1", 1), ("sa3", 2), ("sa6", 2)], ids=["sa1-1", "sa3-2", "sa6-2"])
def test_unet_with_an_attention_block_the_kernels_cannot_take(monkeypatch, interpreter_tiles, choices, block, batch):
    """One attention block at a time with head dim 8 in both models: its attention falls back, everything
    else runs on Triton, and the model matches the float64 reference, forward and every gradient. The
    skip connection of the Up block downstream then comes from a block whose attention ran on eager."""
    monkeypatch.setenv("FAST_UNET_BACKEND", "auto")
    assert_block_falls_back(choices, block, batch, "triton")
    assert {b for op, b in choices if op != "attention"} == {"triton"}


def test_kink_guard_rejects_a_point_within_float32_rounding_of_a_relu():
    """The parity point that made the float32 reference an unreliable oracle (seed 0, sa1 with 16 heads,
    x (1, 3, 16, 16) from the global RNG, t = 42): up2's first GroupNorm + ReLU has a pre-activation 5.9e-7
    from 0 in float64, which float32 models round to either side (oneDNN's AVX2 and AVX-512 convolutions
    disagree on it). ``kink_margin`` finds it and ``assert_matches_reference`` refuses the point."""
    torch.manual_seed(0)
    model, ref = model_pair(16)
    for m in (model, ref):
        state = m.sa1.mha.state_dict()
        m.sa1.mha = torch.nn.MultiheadAttention(128, 16, batch_first=True)
        m.sa1.mha.load_state_dict(state)
    x = torch.randn(1, 3, 16, 16)
    t = torch.tensor([42])
    margin, where = kink_margin(float64_oracle(ref), x, t)
    assert margin < 1e-6 and where == "up2.conv.conv1.2 (ReLU input)", (margin, where)
    with pytest.raises(AssertionError, match="ill-conditioned parity point: up2.conv.conv1.2"):
        assert_matches_reference(model, ref, ref(x, t), x, t)
    x_ok, t_ok = conditioned_inputs(ref, 1, 16)
    assert kink_margin(float64_oracle(ref), x_ok, t_ok)[0] >= KINK_MARGIN


@pytest.mark.parametrize("op", ["group_norm_relu", "attention", "time_embedding"])
def test_custom_op_registration(op):
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration, AOT-dispatch tracing."""
    if op == "group_norm_relu":
        x = torch.randn(2, 64, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
        args = (x, torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True), 1e-5,
                torch.randn(2, 64, requires_grad=True))
    elif op == "attention":
        args = (torch.randn(2, 20, 3, 4, 16, requires_grad=True),)
    else:
        r = lambda *s: torch.randn(*s, requires_grad=True)  # noqa: E731
        args = (torch.tensor([1, 7]), 32, [r(48, 32), r(5, 32), r(17, 32)], [r(48), r(5), r(17)],
                [r(16, 32), r(9, 32)], [r(16), r(9)])
    torch.library.opcheck(getattr(torch.ops.fast_unet, op).default, args)


def test_torch_compile_traces_the_model_in_one_graph(interpreter_tiles):
    """``torch.compile(fullgraph=True)``: dispatch, the Lazy tensors and every custom op trace without a graph
    break; the compiled model matches the eager one, forward and gradients; and under autocast (bf16) its
    output is the uncompiled model's."""
    model, ref = model_pair(8, 8)
    x, t = conditioned_inputs(ref, 1, 8)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y = compiled(x, t)
    assert_matches_reference(model, ref, y, x, t)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y_ac = compiled(x, t)
        y_ac_eager = model(x, t)
    assert y_ac.dtype == torch.bfloat16
    torch.testing.assert_close(y_ac, y_ac_eager, atol=0, rtol=0)


@pytest.mark.parametrize("where,value", [("x", float("nan")), ("t", float("inf")), ("gn_weight", float("nan")),
                                         ("attention_weight", float("nan"))],
                         ids=["x-nan", "t-inf", "gn_weight-nan", "attention_weight-nan"])  # ~1 min each here
def test_nonfinite_propagates_as_in_eager(monkeypatch, interpreter_tiles, where, value):
    """A NaN or Inf planted in the input x, the timestep t (float timesteps), a GroupNorm weight or an
    attention projection weight: the Triton model's output and every gradient are NaN exactly where the
    eager model's are (Inf: non-finite exactly where eager's are, the forward NaN/Inf exactly), and close
    elsewhere. Sample 1 carries no planted value in x and t, so its output must stay finite there."""
    from helpers import assert_close

    model, _ = model_pair(16)
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([3.0, 517.0])
    dy = torch.randn(2, 3, 16, 16)
    if where == "x":
        x[0, 1, 5, 7] = value
    elif where == "t":
        t[0] = value
    else:
        name = "down1.down.1.conv1.1.weight" if where == "gn_weight" else "sa1.mha.in_proj_weight"
        with torch.no_grad():
            dict(model.named_parameters())[name].view(-1)[5] = value

    def run(backend):
        monkeypatch.setenv("FAST_UNET_BACKEND", backend)
        model.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        y = model(xx, t)
        y.backward(dy)
        return y.detach(), [("x", xx.grad)] + [(n, p.grad) for n, p in model.named_parameters()]

    y, grads = run("triton")
    y_e, grads_e = run("eager")
    assert not torch.isfinite(y_e).all(), "the planted value must reach the output"
    if where in ("x", "t"):
        assert torch.isfinite(y_e[1]).all()
    assert_close(y, y_e, atol=1e-4, rtol=1e-3, what="output")
    for (name, g), (_, ge) in zip(grads, grads_e):
        fin = torch.isfinite(ge)
        atol = 1e-4 * max([1.0] + ([ge[fin].abs().max().item()] if fin.any() else []))
        if value != value:
            assert_close(g, ge, atol=atol, rtol=1e-3, what=f"grad {name}")
        else:  # sums of both infinite signs: NaN or Inf by the reduction's order (tests/ops/test_nonfinite.py)
            assert torch.equal(torch.isfinite(g), fin), f"grad {name}: non-finite elements differ"
            assert_close(g[fin], ge[fin], atol=atol, rtol=1e-3, what=f"grad {name} (finite part)")
