"""time_embedding: the sinusoidal encoding + ReLU/SiLU + the stacked Linear of every block, in one
launch. The Triton kernel (kernels/time_embedding.py) against eager and float64 (the flash-attention rule),
under the interpreter and at the model's batch on CUDA; the extension has no implementation of it.

The parity tests through the dispatched op run on every CPU backend (eager, ext: skipped, it has no
implementation, triton under the interpreter); the kernel-level tests on triton only.
"""
import pytest
import torch

from fast_unet import eager, ops
from helpers import assert_close_rule, grads_in

pytestmark = pytest.mark.op("time_embedding")


# ---------------------------------------------------------------------------------------------------
# the Triton kernels under the interpreter (CPU tensors); the dispatched-op parity tests on eager too

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
C_DOWN, C_UP = 128 + 256 + 256, 128 + 64 + 64  # the model's stacked Down and Up blocks


def _time_embedding_f64(t, dim, relu_weight, relu_bias, silu_weight, silu_bias):
    """The op entirely in float64, the encoding included (eager's encoding is float32 by design)."""
    j = torch.arange(0, dim, 2, dtype=torch.float64, device=t.device)
    arg = t.to(torch.float64)[:, None] / 10000.0 ** (j / dim)
    enc = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
    return (torch.nn.functional.linear(torch.relu(enc), relu_weight, relu_bias),
            torch.nn.functional.linear(torch.nn.functional.silu(enc), silu_weight, silu_bias))


def _params(dim, dtype):
    g = lambda *s: (torch.randn(*s, dtype=torch.float64) * 0.2).to(dtype).double()  # noqa: E731
    return g(C_DOWN, dim), g(C_DOWN), g(C_UP, dim), g(C_UP)


def _run(fn, t, dim, params, dtype, gd, gu):
    leaves = [p.to(dtype).detach().requires_grad_() for p in params]
    down, up = fn(t, dim, *leaves)
    ((down.double() * gd).sum() + (up.double() * gu).sum()).backward()
    return (down, up), [p.grad for p in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b", [1, 3, 20])
@pytest.mark.backends("eager", "ext", "triton")
@pytest.mark.usefixtures("backend")
def test_vs_eager_and_float64(b, dtype):
    dim = 128
    t = torch.randint(0, 1000, (b,))
    params = _params(dim, dtype)
    gd, gu = torch.randn(b, C_DOWN, dtype=torch.float64), torch.randn(b, C_UP, dtype=torch.float64)
    outs, grads = _run(ops.time_embedding, t, dim, params, dtype, gd, gu)
    outs_e, grads_e = _run(eager.time_embedding, t, dim, params, dtype, gd, gu)
    outs_r, grads_r = _run(_time_embedding_f64, t, dim, params, torch.float64, gd, gu)
    for name, o, oe, orf in zip(("down", "up"), outs, outs_e, outs_r):
        assert o.dtype == dtype
        assert_close_rule(name, o, oe, orf, dtype)
    for name, g, ge, gr in zip(("d relu_weight", "d relu_bias", "d silu_weight", "d silu_bias"), grads, grads_e, grads_r):
        assert g.dtype == dtype
        assert_close_rule(name, g, ge, gr, dtype)


def _split_params(sizes_down, sizes_up, dim, dtype):
    """One (C_i, dim) weight and (C_i,) bias per block, float64 values representable in ``dtype``."""
    g = lambda *s: (torch.randn(*s, dtype=torch.float64) * 0.2).to(dtype).double()  # noqa: E731
    return ([g(c, dim) for c in sizes_down], [g(c) for c in sizes_down],
            [g(c, dim) for c in sizes_up], [g(c) for c in sizes_up])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes_down, sizes_up", [((40, 17, 67), (5, 130, 64)),  # the model's 3 + 3, odd C
                                                  ((9, 33, 1, 70), (48,))],  # more Down blocks than slots
                         ids=["3+3", "4+1"])
@pytest.mark.backends("eager", "ext", "triton")
@pytest.mark.usefixtures("backend")
def test_one_tensor_per_block_vs_eager_and_float64(sizes_down, sizes_up, dtype):
    """The parameters as lists, one tensor per block, read where they are: each block's output and each
    parameter's gradient against eager and float64, in the parameter's dtype (B = 3, dim = 94)."""
    b, dim = 3, 94
    t = torch.tensor([0, 517, 999])  # t = 0: every cos term 1, a rounding bias would add up over them
    params = _split_params(sizes_down, sizes_up, dim, dtype)
    gs = [torch.randn(b, c, dtype=torch.float64) for c in sizes_down + sizes_up]

    def run(fn, dt):
        leaves = [[p.to(dt).detach().requires_grad_() for p in ps] for ps in params]
        down, up = fn(t, dim, *leaves)
        assert isinstance(down, list) and isinstance(up, list)
        sum((o.double() * g).sum() for o, g in zip(down + up, gs)).backward()
        return down + up, [p.grad for ps in leaves for p in ps]

    def f64(t, dim, rws, rbs, sws, sbs):
        down = [_time_embedding_f64(t, dim, w, bb, w, bb)[0] for w, bb in zip(rws, rbs)]
        up = [_time_embedding_f64(t, dim, w, bb, w, bb)[1] for w, bb in zip(sws, sbs)]
        return down, up

    outs, grads = run(ops.time_embedding, dtype)
    outs_e, grads_e = run(eager.time_embedding, dtype)
    outs_r, grads_r = run(f64, torch.float64)
    assert [o.shape for o in outs] == [(b, c) for c in sizes_down + sizes_up]
    for i, (o, oe, orf) in enumerate(zip(outs, outs_e, outs_r)):
        assert o.dtype == dtype and o.is_contiguous()
        assert_close_rule(f"out {i}", o, oe, orf, dtype)
    for i, (g, ge, gr) in enumerate(zip(grads, grads_e, grads_r)):
        assert g.dtype == dtype
        assert_close_rule(f"grad {i}", g, ge, gr, dtype)


@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_per_block_parameters_take_one_launch_each_way_and_no_torch_op():
    """The model's 3 + 3 blocks: one forward and one backward launch, and no torch kernel around them (no
    concatenation of the weights, no zero-fill or cast of their gradients), bf16 weights, float32 biases
    (autocast's parameters)."""
    from bench import kernels as bk
    from bench import recorder

    params = _split_params((64, 128, 256), (128, 64, 32), 128, torch.bfloat16)
    rws, rbs, sws, sbs = ([p.to(torch.bfloat16 if p.dim() == 2 else torch.float32).requires_grad_() for p in ps]
                          for ps in params)
    t = torch.tensor([3, 250])
    ops.time_embedding(t, 128, rws, rbs, sws, sbs)  # warm-up: the frequency table is built once, then cached
    trace = bk.Trace()
    with recorder.TritonRecorder(trace), bk.OpCounter(trace, "cpu"):
        down, up = ops.time_embedding(t, 128, rws, rbs, sws, sbs)
        sum(o.float().sum() for o in down + up).backward()
    names = [x.name for x in trace.launches if x.kind == "triton"]
    assert names == ["_temb_fwd_kernel", "_temb_bwd_kernel"]
    inside = [x.name for x in trace.launches if x.kind == "torch" and x.inside]
    assert inside == [], inside
    assert not [x.name for x in trace.launches if "cat" in x.name]
    assert all(p.grad.dtype == p.dtype for p in rws + rbs + sws + sbs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_encoding_rounded_before_the_activation_as_in_eager(dtype):
    """The eager op rounds the encoding to the weights' dtype, then applies ReLU/SiLU (in that dtype): the
    kernel rounds at the same places. For SiLU, round(silu(enc)) instead of silu(round(enc)) moves about
    half the outputs by an ulp (a correlated shift that the autocast model test's gradients felt); here
    each output against the correctly rounded product of eager's activated encoding, float64 sums."""
    dim, t = 128, torch.tensor([0, 1, 37, 250, 517, 999])
    params = _split_params((64, 128), (128, 64), dim, dtype)
    rws, rbs, sws, sbs = ([p.to(dtype if p.dim() == 2 else torch.float32) for p in ps] for ps in params)
    down, up = ops.time_embedding(t, dim, rws, rbs, sws, sbs)
    enc = eager.sinusoidal_encoding(t, dim).to(dtype)
    for act, outs, ws, bs in ((torch.relu, down, rws, rbs), (torch.nn.functional.silu, up, sws, sbs)):
        a = act(enc).double()
        for o, w, b in zip(outs, ws, bs):
            want = (a @ w.double().t() + b.double()).to(torch.float32).to(dtype)
            differ = (o != want).sum().item()
            assert differ <= 0.01 * o.numel(), f"{act.__name__}: {differ}/{o.numel()} outputs differ"
            ulp = torch.finfo(dtype).eps * want.double().abs().clamp_min(torch.finfo(dtype).tiny)
            assert ((o.double() - want.double()).abs() <= ulp).all()


@pytest.mark.backends("eager", "ext", "triton")
@pytest.mark.usefixtures("backend")
def test_float_timesteps_odd_dim_and_broadcast_t():
    """Float t, an expanded (stride 0) t as the model passes for one timestep, dim = 96 (not a power of 2)."""
    dim = 96
    params = [p.float() for p in _params(dim, torch.float32)]
    for t in (torch.tensor([0.5, 17.25, 999.0]), torch.tensor([42]).expand(5)):
        down, up = ops.time_embedding(t, dim, *params)
        rd, ru = _time_embedding_f64(t, dim, *(p.double() for p in params))
        torch.testing.assert_close(down.double(), rd, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(up.double(), ru, atol=1e-4, rtol=1e-4)


@pytest.mark.backends("eager", "ext", "triton")
@pytest.mark.usefixtures("backend")
def test_t_gets_no_gradient():
    params = [p.float().requires_grad_() for p in _params(128, torch.float32)]
    t = torch.tensor([1.0, 2.0])
    down, up = ops.time_embedding(t, 128, *params)
    (down.sum() + up.sum()).backward()
    assert t.grad is None and all(p.grad is not None for p in params)


@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_bad_inputs_name_the_argument():
    rw, rb, sw, sb = (p.float() for p in _params(128, torch.float32))
    t = torch.arange(3)
    with pytest.raises(RuntimeError, match="dim must be a positive even int"):
        ops.time_embedding(t, 127, rw[:, :127], rb, sw[:, :127], sb)
    with pytest.raises(RuntimeError, match=r"relu_weight must be \(C, dim=128\)"):
        ops.time_embedding(t, 128, rw[:, :64], rb, sw, sb)
    with pytest.raises(RuntimeError, match="silu_bias must have shape"):
        ops.time_embedding(t, 128, rw, rb, sw, sb[:-1])
    with pytest.raises(RuntimeError, match="t must be 1-D"):
        ops.time_embedding(t[None], 128, rw, rb, sw, sb)
    with pytest.raises(RuntimeError, match="silu_weight must share relu_weight's dtype"):
        ops.time_embedding(t, 128, rw, rb, sw.half(), sb.half())
    with pytest.raises(RuntimeError, match="silu_bias has dtype torch.float16; a \\(C,\\) parameter must be float32"):
        ops.time_embedding(t, 128, rw.bfloat16(), rb, sw.bfloat16(), sb.half())
    with pytest.raises(RuntimeError, match="silu_bias must share relu_bias's dtype"):
        ops.time_embedding(t, 128, rw.bfloat16(), rb, sw.bfloat16(), sb.bfloat16())


# the Triton kernels on CUDA at the model's batch

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.backends("triton-cuda")
@pytest.mark.usefixtures("backend")
def test_time_embedding_b64(dtype):
    from fast_unet import eager, ops

    t = torch.randint(0, 1000, (64,), device="cuda")
    p = [torch.randn(640, 128, device="cuda") * 0.1, torch.randn(640, device="cuda"),
         torch.randn(256, 128, device="cuda") * 0.1, torch.randn(256, device="cuda")]
    p = [x.to(dtype) for x in p]
    gd, gu = torch.randn(64, 640, device="cuda").to(dtype), torch.randn(64, 256, device="cuda").to(dtype)
    out, g = grads_in(ops.time_embedding, (t, 128, *p), dtype, [gd, gu])
    out_e, g_e = grads_in(eager.time_embedding, (t, 128, *p), dtype, [gd, gu])
    out_r, g_r = grads_in(_time_embedding_f64, (t, 128, *p), torch.float64, [gd.double(), gu.double()])
    for name, a, e, r in zip(("down", "up"), out, out_e, out_r):
        assert_close_rule(name, a, e, r, dtype)
    for name, a, e, r in zip(("drw", "drb", "dsw", "dsb"), g, g_e, g_r):
        assert_close_rule(name, a, e, r, dtype)


def test_frequency_table_is_built_on_the_device_without_copies():
    """kernels/time_embedding.freq_table builds its table on the target device (here ``meta``, which
    stands for a GPU: a CPU tensor or a host-device copy shows up as a CPU argument or a ``_to_copy``),
    once per (dim, device); a second call runs no torch op at all (graph capture after warm-up)."""
    pytest.importorskip("triton")
    from torch.utils._python_dispatch import TorchDispatchMode

    from fast_unet import backends

    if backends.load_error("triton"):
        pytest.skip(backends.load_error("triton"))
    K = backends.kernel_module("time_embedding")

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            devs = {a.device.type for a in torch.utils._pytree.tree_leaves((args, kwargs, out))
                    if isinstance(a, torch.Tensor)}
            self.calls.append((str(func), devs))
            return out

    dim = 94  # a dim no other test uses: the first call builds the table
    K._FREQ.pop((dim, torch.device("meta")), None)
    with Log() as first:
        table = K.freq_table(dim, torch.device("meta"))
    assert table.device.type == "meta" and table.dtype == torch.float32 and table.shape == (dim // 2,)
    assert first.calls, "the first call builds the table"
    assert all(devs == {"meta"} for _, devs in first.calls), first.calls  # no CPU tensor, no copy from one
    with Log() as second:
        assert K.freq_table(dim, "meta") is table
    assert second.calls == []
