"""GPU-only checks of the Triton backend (skipped without CUDA; nothing is asked of the GPU at import).

Kernel parity at the model's full sizes (the float64 references use a smaller batch where the N x N
attention would not fit), the whole UNet at B=64, 64x64, bfloat16 against the reference, gradients,
and torch.compile over the custom ops. Run by scripts/gpu_check.sh.
"""
import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FLOOR = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 1e-3}


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("GPU tests run with TRITON_INTERPRET unset")
    monkeypatch.setenv("FAST_UNET_BACKEND", "triton")
    torch.manual_seed(0)


def _rule(name, out, out_eager, ref, dtype):
    err = (out.double() - ref.double()).abs().max().item()
    err_e = (out_eager.double() - ref.double()).abs().max().item()
    floor = FLOOR[dtype] * max(ref.abs().max().item(), 1e-3)
    assert torch.isfinite(out).all(), name
    assert err <= 2 * err_e + floor, f"{name} ({dtype}): {err:.3g} > 2 x {err_e:.3g} + {floor:.3g}"


def _grads(fn, inputs, dtype, gout):
    leaves = [t.to(dtype).detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in inputs]
    out = fn(*leaves)
    torch.autograd.backward(out, gout if isinstance(gout, (list, tuple)) else [gout])
    return out, [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# every (B, C, H, W) GroupNorm input of the UNet at 64x64 (B=8 to keep the float64 reference quick)
GN_SHAPES = [(8, 64, 64, 64), (8, 128, 32, 32), (8, 256, 16, 16), (8, 256, 8, 8), (8, 512, 8, 8), (8, 64, 32, 32)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_full_sizes(shape, dtype):
    from fast_unet import eager, ops

    b, c = shape[:2]
    x = (torch.randn(shape, device="cuda") * 1.5 + 0.7).to(dtype).contiguous(memory_format=torch.channels_last)
    w, bias = (torch.randn(c, device="cuda") * 0.5 + 1).to(dtype), (torch.randn(c, device="cuda") * 0.5).to(dtype)
    emb = torch.randn(b, c, device="cuda").to(dtype)
    dy = torch.randn(shape, device="cuda").to(dtype)
    inputs = (x, w, bias, 1e-5, emb)
    out, g = _grads(ops.group_norm_relu, inputs, dtype, dy)
    out_e, g_e = _grads(eager.group_norm_relu, inputs, dtype, dy)
    ref, g_r = _grads(eager.group_norm_relu, inputs, torch.float64, dy.double())
    assert out.is_contiguous(memory_format=torch.channels_last)
    _rule("y", out, out_e, ref, dtype)
    for name, a, e, r in zip(("dx", "dw", "db", "demb"), g, g_e, g_r):
        _rule(name, a, e, r, dtype)


# (B, N, heads, d) of the six attention blocks at 64x64
ATTN_SHAPES = [(4, 1024, 4, 32), (8, 256, 4, 64), (8, 64, 4, 64), (8, 256, 4, 32), (4, 1024, 4, 16), (2, 4096, 4, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_attention_full_sizes(shape, dtype):
    from fast_unet import eager, ops

    b, n, h, d = shape
    qkv = torch.randn(b, n, 3, h, d, device="cuda").to(dtype)
    do = torch.randn(b, n, h * d, device="cuda").to(dtype)
    out, g = _grads(ops.attention, (qkv,), dtype, do)
    out_e, g_e = _grads(eager.attention, (qkv,), dtype, do)
    ref, g_r = _grads(eager.attention, (qkv,), torch.float64, do.double())
    _rule("o", out, out_e, ref, dtype)
    _rule("dqkv", g[0], g_e[0], g_r[0], dtype)


def _time_embedding_f64(t, dim, relu_weight, relu_bias, silu_weight, silu_bias):
    """The op entirely in float64, the encoding included (eager's encoding is float32 by design)."""
    j = torch.arange(0, dim, 2, dtype=torch.float64, device=t.device)
    arg = t.to(torch.float64)[:, None] / 10000.0 ** (j / dim)
    enc = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
    return (torch.nn.functional.linear(torch.relu(enc), relu_weight, relu_bias),
            torch.nn.functional.linear(torch.nn.functional.silu(enc), silu_weight, silu_bias))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_time_embedding_b64(dtype):
    from fast_unet import eager, ops

    t = torch.randint(0, 1000, (64,), device="cuda")
    p = [torch.randn(640, 128, device="cuda") * 0.1, torch.randn(640, device="cuda"),
         torch.randn(256, 128, device="cuda") * 0.1, torch.randn(256, device="cuda")]
    p = [x.to(dtype) for x in p]
    gd, gu = torch.randn(64, 640, device="cuda").to(dtype), torch.randn(64, 256, device="cuda").to(dtype)
    out, g = _grads(ops.time_embedding, (t, 128, *p), dtype, [gd, gu])
    out_e, g_e = _grads(eager.time_embedding, (t, 128, *p), dtype, [gd, gu])
    out_r, g_r = _grads(_time_embedding_f64, (t, 128, *p), torch.float64, [gd.double(), gu.double()])
    for name, a, e, r in zip(("down", "up"), out, out_e, out_r):
        _rule(name, a, e, r, dtype)
    for name, a, e, r in zip(("drw", "drb", "dsw", "dsb"), g, g_e, g_r):
        _rule(name, a, e, r, dtype)


def _models(h):
    """(fast_unet.UNet, reference) on CUDA, float32, with the same weights."""
    import fast_unet
    from fast_unet.reference import make_reference

    ref = make_reference(h, need_weights=False).cuda()
    model = fast_unet.UNet().cuda()
    model.load_state_dict(ref.state_dict())
    return model, ref


@pytest.mark.parametrize("fused", ["all", "none"])
def test_unet_b64_64x64_bf16_forward(monkeypatch, fused):
    """The whole model at B=64, 64x64, bf16 (Triton backend) vs the float32 reference; the bound is the
    error of the same bf16 model on the eager backend (the reference itself cannot run in bf16: its
    time encoding is float32)."""
    monkeypatch.setenv("FAST_UNET_FUSED", fused)
    torch.manual_seed(0)
    model, ref32 = _models(64)
    model = model.bfloat16()
    x = torch.randn(64, 3, 64, 64, device="cuda")
    t = torch.randint(0, 1000, (64,), device="cuda")
    with torch.no_grad():
        y = model(x.bfloat16(), t)
        monkeypatch.setenv("FAST_UNET_BACKEND", "eager")
        y_eager = model(x.bfloat16(), t)
        y32 = ref32(x, t)
    assert y.shape == (64, 3, 64, 64) and y.dtype == torch.bfloat16
    err = (y.float() - y32).abs().max().item()
    err_eager = (y_eager.float() - y32).abs().max().item()
    assert err <= 2 * err_eager + 1e-2 * y32.abs().max().item(), (err, err_eager)


@pytest.mark.parametrize("fused", ["all", "none"])
def test_unet_gradients_float32(monkeypatch, fused):
    monkeypatch.setenv("FAST_UNET_FUSED", fused)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model, ref = _models(32)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    t = torch.randint(0, 1000, (4,), device="cuda")
    y, y_ref = model(x, t), ref(x, t)
    torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-3)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    refp = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        r = refp[name].grad
        assert (p.grad - r).abs().max().item() <= 1e-3 * r.abs().max().item() + 1e-6, name


def test_torch_compile_over_custom_ops():
    """Dynamo + AOTAutograd trace the custom ops through their fake and autograd registrations
    (``aot_eager``: the same tracing as inductor without its code generation, which would take minutes)."""
    import fast_unet

    model, _ = _models(16)
    x = torch.randn(2, 3, 16, 16, device="cuda")
    t = torch.tensor([1, 500], device="cuda")
    eager_out = model(x, t)
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(x, t)
    torch.testing.assert_close(out, eager_out, atol=1e-4, rtol=1e-3)
    out.sum().backward()
    assert fast_unet.dispatch.select("attention", torch.randn(1, 8, 3, 4, 16, device="cuda"))[0] == "triton"
