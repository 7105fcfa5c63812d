"""attention: softmax(q k^T / sqrt(d)) v on the packed (B, N, 3, heads, d) QKV, every backend and each
backend's own tests.

(a) every backend (eager, ext, triton under the interpreter, triton on CUDA) through the dispatched op
    against a float64 formula;
(b) the Triton flash attention (kernels/attention.py) against eager SDPA and float64 under the
    flash-attention rule, forward and dqkv, bad inputs, its dispatch; at the model's full sizes on CUDA;
(c) the extension's CPU flash attention (csrc/) against eager SDPA and float64, opcheck, bad inputs.
"""
import math

import pytest
import torch

import fast_unet
from fast_unet import dispatch, eager, ops
from helpers import assert_close, assert_close_rule, grads_in, run_or_skip

pytestmark = pytest.mark.op("attention")


# ---------------------------------------------------------------------------------------------------
# (a) every backend, through the dispatched op, against a float64 formula written out by hand

def attention_formula(qkv):
    b, n, _, h, d = qkv.shape
    q, k, v = qkv.double().permute(2, 0, 3, 1, 4)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return (p @ v).transpose(1, 2).reshape(b, n, h * d)


@pytest.mark.parametrize("b,n,h,d", [(1, 64, 4, 16), (3, 100, 4, 32), (2, 37, 4, 64)])
def test_attention(backend, b, n, h, d):
    qkv = torch.randn(b, n, 3, h, d).to(backend.device)
    out = run_or_skip(ops.attention, qkv)
    assert out.shape == (b, n, h * d)
    assert_close(out, attention_formula(qkv), atol=1e-5, rtol=1e-4, what="attention")


def test_attention_reads_a_strided_view(backend):
    """The op takes the in_proj output viewed (B, N, 3, h, d), not a contiguous copy."""
    flat = torch.randn(2, 50, 3 * 64).to(backend.device)
    qkv = flat.view(2, 50, 3, 4, 16)
    assert_close(run_or_skip(ops.attention, qkv), attention_formula(qkv), atol=1e-5, rtol=1e-4, what="view")
    padded = torch.randn(2, 50, 3 * 64 + 8).to(backend.device)
    padded = padded[..., : 3 * 64].unflatten(-1, (3, 4, 16))  # non-contiguous rows
    assert_close(run_or_skip(ops.attention, padded), attention_formula(padded), atol=1e-5, rtol=1e-4, what="strided")


# ---------------------------------------------------------------------------------------------------
# (b) the Triton kernels, under the interpreter (CPU tensors)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _run(fn, qkv64, dtype, do):
    qkv = qkv64.to(dtype).detach().requires_grad_()
    out = fn(qkv)
    (out.double() * do).sum().backward()
    return out, qkv.grad


def _check(b, n, heads, d, dtype, make_view=None):
    qkv64 = torch.randn(b, n, 3, heads, d, dtype=torch.float64) * 1.5
    qkv64 = qkv64.to(dtype).double()  # identical rounded inputs for kernel, eager and float64
    do = torch.randn(b, n, heads * d, dtype=torch.float64)
    if make_view is None:
        out, g = _run(ops.attention, qkv64, dtype, do)
    else:
        leaf = qkv64.to(dtype).detach().requires_grad_()
        out = ops.attention(make_view(leaf))
        (out.double() * do).sum().backward()
        g = leaf.grad
    out_e, g_e = _run(eager.attention, qkv64, dtype, do)
    ref, g_r = _run(eager.attention, qkv64, torch.float64, do)
    assert out.dtype == dtype and out.shape == (b, n, heads * d) and out.is_contiguous()
    assert_close_rule("o", out, out_e, ref, dtype)
    assert_close_rule("dqkv", g, g_e, g_r, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [16, 32, 64])
@pytest.mark.parametrize("b,n", [(1, 64), (3, 100)], ids=["b1-n64", "b3-n100"])
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_vs_eager_and_float64(b, n, d, dtype):
    _check(b, n, 4, d, dtype)


@pytest.fixture(params=["one-pass", "deterministic"])
def bwd_path(request):
    """The backward's two paths: the default one-pass kernel (dQ by atomic adds) and, under
    ``torch.use_deterministic_algorithms(True)``, the two-kernel path."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param == "deterministic")
    try:
        yield request.param
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [16, 32, 64])
@pytest.mark.parametrize("n", [60, 128], ids=["n60-ragged", "n128-even"])
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_backward_paths(bwd_path, n, d, dtype):
    """Both backward paths, every head dim and dtype, N a multiple of every tile (EVEN_N: no mask) and not
    (a partial last tile in every loop and program): forward and dqkv against float64."""
    _check(1, n, 2, d, dtype)


@pytest.mark.parametrize("n", [1, 191, 192])
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_backward_paths_at_the_edges(bwd_path, n):
    """One token, and three tiles with and without a partial last one (bf16, head dim 16). sa6's 4,096
    tokens take about 10 minutes here (the interpreter runs the forward's NaN-propagating row max
    element by element): they run on CUDA in test_attention_full_sizes."""
    _check(2, n, 2, 16, torch.bfloat16)


@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_backward_launches_per_path():
    """The default backward is delta + the one-pass kernel (adding dQ) + the cast; the deterministic one
    runs no atomics (dK/dV, then dQ by query tile) and gives bit-identical gradients run after run."""
    from helpers import launches

    qkv = torch.randn(2, 70, 3, 2, 16, requires_grad=True)
    do = torch.randn(2, 70, 32)

    def grad():
        qkv.grad = None
        ops.attention(qkv).backward(do)
        return qkv.grad.clone()

    before = torch.are_deterministic_algorithms_enabled()
    try:
        with launches() as rec:
            g_fast = grad()
        assert [r["name"] for r in rec if r["name"].startswith("_attn_bwd")] == \
            ["_attn_bwd_preprocess", "_attn_bwd", "_attn_bwd_dq_cast"]
        assert rec[[r["name"] for r in rec].index("_attn_bwd")]["kwargs"]["ADD_DQ"] is True
        torch.use_deterministic_algorithms(True)
        with launches() as rec:
            g_det = grad()
        assert [r["name"] for r in rec if r["name"].startswith("_attn_bwd")] == \
            ["_attn_bwd_preprocess", "_attn_bwd", "_attn_bwd_dq"]
        assert rec[[r["name"] for r in rec].index("_attn_bwd")]["kwargs"]["ADD_DQ"] is False
        assert torch.equal(grad(), g_det) and torch.equal(grad(), g_det)
    finally:
        torch.use_deterministic_algorithms(before)
    torch.testing.assert_close(g_fast, g_det, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 5, 17])
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_tiny_sequences(n):
    """N smaller than one tile (the model's 2x2 and 4x4 feature maps at a 16x16 input)."""
    _check(2, n, 4, 16, torch.float32)


@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_long_sequence_once():
    """N = 1024 (sa1/sa5 at 64x64), batch 1, bf16: many key tiles through the online softmax."""
    _check(1, 1024, 2, 16, torch.bfloat16)


@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_strided_qkv_view_is_read_in_place():
    """qkv with non-default strides (heads and the q/k/v axis permuted in memory): no copy needed."""
    b, n, heads, d = 2, 40, 4, 32

    def view(leaf):  # leaf (B, N, 3, H, D) -> the same values stored as (B, H, 3, N, D) in memory
        stored = leaf.permute(0, 3, 2, 1, 4).contiguous()
        v = stored.permute(0, 3, 2, 1, 4)
        assert not v.is_contiguous()
        return v

    _check(b, n, heads, d, torch.float32, make_view=view)


@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_large_logits_are_stable():
    """Scores of order 1e3: exp2 of (s - running max) must not overflow."""
    qkv = torch.randn(1, 70, 3, 4, 16) * 30
    out = ops.attention(qkv)
    ref = eager.attention(qkv.double())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def _exp2_kernels():
    """Test kernels over the forward's two exp2 helpers (defined here, at test time, so that triton.jit
    sees the process's TRITON_INTERPRET; a jit function resolves names in its module's globals, hence
    ``_kernels_attention``)."""
    import triton
    import triton.language as tl

    global _kernels_attention
    from fast_unet.kernels import attention as _kernels_attention

    @triton.jit
    def poly(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, _kernels_attention._exp2_poly(tl.load(x_ptr + offs)))

    @triton.jit
    def quarter(x_ptr, y_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(y_ptr + offs, _kernels_attention._exp2_quarter_poly(tl.load(x_ptr + offs), BLOCK_M, BLOCK_N))

    return poly, quarter


@pytest.mark.backends("triton", "triton-cuda")
def test_exp2_on_the_fma_units(backend):
    """``_exp2_poly`` (2^x for x <= 0 without the SFU): within 1.1e-4 of 2^x (relative) down to -125, exactly
    2^-125 below that and at -inf (never garbage from the exponent bits); and ``_exp2_quarter_poly`` puts
    each score's exponential back in its own place, with a quarter of them by the polynomial."""
    poly, quarter = _exp2_kernels()
    x = torch.cat([-torch.rand(4096, dtype=torch.float64) * 126, torch.linspace(-4, 0, 1023, dtype=torch.float64),
                   torch.tensor([-125.0, -125.5, -126.0, -300.0, -1e30, float("-inf"), -0.5, 0.5 - 1.0])])
    x = torch.nn.functional.pad(x, (0, -x.numel() % 256), value=-1.0)
    xf = x.float().to(backend.device)
    y = torch.empty_like(xf)
    poly[(xf.numel() // 256,)](xf, y, BLOCK=256)
    y, ref = y.double().cpu(), torch.exp2(xf.double().cpu())
    normal = xf.cpu() >= -125
    rel = ((y - ref) / ref)[normal].abs().max().item()
    assert rel < 1.1e-4, rel
    assert (y[~normal] == 2.0 ** -125).all(), y[~normal]
    tile = (torch.rand(64, 128) * -40).to(backend.device)
    out = torch.empty_like(tile)
    quarter[(1,)](tile, out, BLOCK_M=64, BLOCK_N=128)
    rel = ((out.double() - torch.exp2(tile.double())) / torch.exp2(tile.double())).abs().cpu()
    assert rel.max() < 1.1e-4
    by_poly = (rel > 1e-6).sum().item()  # the SFU's (and numpy's) exp2 are within 1e-6; the polynomial is not, mostly
    assert 0.15 * tile.numel() < by_poly <= 0.25 * tile.numel(), by_poly


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [16, 32])
@pytest.mark.parametrize("scale", [1.5, 12.0], ids=["plain", "large-logits"])
@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_fast_softmax_over_many_key_tiles(scale, d, dtype):
    """The forward's FAST_SOFTMAX builds (half precision, d <= 32, N a multiple of the tiles) over three key
    tiles: the running max rescales the tensor-core row sums, and with large logits (scores spread over
    thousands in base 2) most scores fall below the polynomial's clamp (2^-125) or round to 0 in P.
    Against float64 under the flash-attention rule: the output, and dqkv (whose P comes from the
    forward's log-sum-exp) at plain logits. At large logits only the output is judged: there the
    backward's delta = rowsum(dO * O), from the rounded O as in FlashAttention-2, makes the bf16 dQ and dK
    errors several times those of CPU eager (which keeps the softmax's backward in float32), with or
    without FAST_SOFTMAX."""
    from fast_unet.kernels import attention as A

    assert A.fwd_fast_softmax(d, dtype, A.even_n(384, 64, 128))
    qkv64 = (torch.randn(1, 384, 3, 2, d, dtype=torch.float64) * scale).to(dtype).double()
    do = torch.randn(1, 384, 2 * d, dtype=torch.float64)
    out, g = _run(ops.attention, qkv64, dtype, do)
    out_e, g_e = _run(eager.attention, qkv64, dtype, do)
    ref, g_r = _run(eager.attention, qkv64, torch.float64, do)
    assert_close_rule("o", out, out_e, ref, dtype)
    if scale < 10:
        assert_close_rule("dqkv", g, g_e, g_r, dtype)


@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_bad_inputs_name_the_argument(monkeypatch):
    with pytest.raises(RuntimeError, match=r"head_dim .* must be one of \(16, 32, 64\), got 24"):
        ops.attention(torch.randn(1, 8, 3, 4, 24))
    with pytest.raises(RuntimeError, match=r"qkv must be \(B, N, 3, heads, head_dim\)"):
        ops.attention(torch.randn(1, 8, 2, 4, 16))
    with pytest.raises(RuntimeError, match="qkv must be float32, bfloat16 or float16"):
        ops.attention(torch.randn(1, 8, 3, 4, 16, dtype=torch.float64))
    from fast_unet.kernels.attention import attention_fwd

    with pytest.raises(ValueError, match="head_dim"):
        attention_fwd(torch.randn(1, 8, 3, 4, 8))
    # auto: head dim 24 goes to eager, and the dispatcher says why triton did not take it
    monkeypatch.setenv("FAST_UNET_BACKEND", "auto")
    qkv = torch.randn(1, 8, 3, 4, 24)
    why = fast_unet.dispatch.explain("attention", qkv)["triton"]
    assert any("head_dim" in r for r in why), why
    torch.testing.assert_close(ops.attention(qkv), eager.attention(qkv))


@pytest.mark.backends("triton")
@pytest.mark.usefixtures("backend")
def test_dispatch_needs_interpreter_for_cpu_tensors(monkeypatch):
    monkeypatch.setenv("FAST_UNET_BACKEND", "auto")
    qkv = torch.randn(1, 8, 3, 4, 16)
    assert fast_unet.dispatch.select("attention", qkv)[0] == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = fast_unet.dispatch.explain("attention", qkv)["triton"]
    assert any("TRITON_INTERPRET" in r for r in why), why
    assert fast_unet.dispatch.select("attention", qkv)[0] != "triton"


# (b) the Triton kernels on CUDA at the model's full sizes

# (B, N, heads, d) of the six attention blocks at 64x64
ATTN_SHAPES = [(4, 1024, 4, 32), (8, 256, 4, 64), (8, 64, 4, 64), (8, 256, 4, 32), (4, 1024, 4, 16), (2, 4096, 4, 16),
               (2, 4095, 4, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.backends("triton-cuda")
@pytest.mark.usefixtures("backend")
def test_attention_full_sizes(bwd_path, shape, dtype):
    """The six blocks' shapes at 64x64 (and sa6's with a partial last tile), both backward paths."""

    b, n, h, d = shape
    qkv = torch.randn(b, n, 3, h, d, device="cuda").to(dtype)
    do = torch.randn(b, n, h * d, device="cuda").to(dtype)
    out, g = grads_in(ops.attention, (qkv,), dtype, do)
    out_e, g_e = grads_in(eager.attention, (qkv,), dtype, do)
    ref, g_r = grads_in(eager.attention, (qkv,), torch.float64, do.double())
    assert_close_rule("o", out, out_e, ref, dtype)
    assert_close_rule("dqkv", g[0], g_e[0], g_r[0], dtype)


# ---------------------------------------------------------------------------------------------------
# (c) the extension, CPU

def make_qkv(b, n, heads, d, seed=0, strided=False):
    """qkv (B, N, 3, heads, d) viewed from a linear layer's output, as the model makes it; ``strided``
    takes it from a wider buffer so it is not contiguous."""
    g = torch.Generator().manual_seed(seed)
    width = 3 * heads * d
    buf = torch.randn(b, n, width + (8 if strided else 0), generator=g) * 1.5
    return buf[..., :width].view(b, n, 3, heads, d) if not strided else buf[..., :width].unflatten(-1, (3, heads, d))


def reference64(qkv):
    q, k, v = qkv.double().unbind(2)
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) / q.shape[-1] ** 0.5
    o = torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v)
    return o.reshape(*o.shape[:2], -1), torch.logsumexp(s, -1)


CASES = [  # (B, N, heads, d)
    (1, 64, 4, 64),
    (3, 64, 4, 16),
    (3, 100, 4, 32),   # N not a multiple of 16: padded keys must be masked
    (1, 100, 2, 16),
    (3, 1024, 4, 16),
    (1, 1024, 4, 32),
    (1, 256, 4, 64),
    (3, 33, 4, 64),
    (1, 1, 4, 16),     # one token
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-N{}-h{}-d{}".format(*c))
@pytest.mark.parametrize("strided", [False, True], ids=["view", "strided"])
def test_ext_forward_backward_vs_eager_and_float64(ext_ops, case, strided):
    qkv = make_qkv(*case, strided=strided)
    ref, lse = reference64(qkv)
    q64 = qkv.detach().double().requires_grad_()
    gout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference64(q64)[0].backward(gout)

    out, lse2 = ext_ops.attention_fwd(qkv)
    assert out.shape == ref.shape and out.is_contiguous()
    assert_close(out, ref, rtol=2e-5, atol=2e-5, what="out vs float64")
    assert_close(out, eager.attention(qkv), rtol=2e-5, atol=2e-5, what="out vs eager SDPA")
    assert_close(lse2 * 0.6931471805599453, lse, rtol=1e-5, atol=1e-5, what="logsumexp")

    qs = qkv.detach().clone().requires_grad_()
    ext_ops.attention(qs).backward(gout.float())
    for i, name in enumerate("qkv"):
        assert_close(qs.grad[:, :, i], q64.grad[:, :, i], rtol=1e-4, atol=5e-5, what=f"d{name}")



# bf16: the tile-unit (AMX) forward where this CPU and build have one, and the float32 kernel on an upcast copy
# (FAST_UNET_CPU_AMX=0, as on a CPU without one); the backward is the float32 kernel on upcast copies.
BF16_PATHS = {"amx": None, "upcast": "0"}


@pytest.mark.parametrize("path", list(BF16_PATHS))
@pytest.mark.parametrize("case", CASES + [(2, 17, 1, 32), (1, 129, 4, 16)], ids=lambda c: "B{}-N{}-h{}-d{}".format(*c))
@pytest.mark.parametrize("strided", [False, True], ids=["view", "strided"])
def test_ext_bf16_vs_eager_and_float64(ext_ops, monkeypatch, path, case, strided):
    """bf16 qkv, float32 accumulation and softmax: out and dqkv within the flash-attention rule of eager SDPA's own
    bf16 error (same rounded inputs, float64 reference); lse2 float32, close to the exact log-sum-exp."""
    if path == "amx" and ext_ops._C.build_info()["cpu_bf16_attention"] != "amx":
        pytest.skip("no AMX tile unit on this CPU or in this build")
    if BF16_PATHS[path] is not None:
        monkeypatch.setenv("FAST_UNET_CPU_AMX", BF16_PATHS[path])
    qkv = make_qkv(*case, strided=strided).to(torch.bfloat16)
    if strided:
        qkv = torch.empty(*qkv.shape[:2], qkv.shape[2] * qkv.shape[3] * qkv.shape[4] + 8,
                          dtype=torch.bfloat16)[..., :-8].unflatten(-1, qkv.shape[2:]).copy_(qkv)
    assert qkv.is_contiguous() != strided or qkv.shape[0] * qkv.shape[1] == 1
    ref, lse = reference64(qkv)
    gout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q64 = qkv.detach().double().requires_grad_()
    reference64(q64)[0].backward(gout)
    qe = qkv.detach().clone().requires_grad_()
    out_e = eager.attention(qe)
    out_e.backward(gout.to(torch.bfloat16))

    out, lse2 = ext_ops.attention_fwd(qkv)
    assert out.dtype == torch.bfloat16 and lse2.dtype == torch.float32 and out.shape == ref.shape
    assert_close_rule("out", out, out_e, ref, torch.bfloat16)
    assert_close(lse2.double() * math.log(2), lse, rtol=1e-4, atol=1e-4, what="logsumexp")
    qs = qkv.detach().clone().requires_grad_()
    ext_ops.attention(qs).backward(gout.to(torch.bfloat16))
    assert qs.grad.dtype == torch.bfloat16
    assert_close_rule("dqkv", qs.grad, qe.grad, q64.grad, torch.bfloat16)


def test_ext_bf16_large_logits_and_nan(ext_ops):
    """Scores in the hundreds stay finite (online rescaling); a NaN in one key's row reaches the outputs of every
    query, as in SDPA, and nothing else."""
    qkv = (make_qkv(1, 200, 2, 16) * 30).to(torch.bfloat16)
    ref, _ = reference64(qkv)
    out = ext_ops.attention(qkv)
    assert torch.isfinite(out).all()
    assert_close_rule("out", out, eager.attention(qkv), ref, torch.bfloat16)
    qkv[0, 7, 1, 0, 3] = float("nan")  # key 7 of head 0
    out = ext_ops.attention(qkv)
    assert out[..., :16].isnan().all() and not out[..., 16:].isnan().any()


@pytest.mark.slow
def test_ext_sa6_shape_n4096(ext_ops):
    qkv = make_qkv(1, 4096, 2, 16, seed=3)
    ref, _ = reference64(qkv)
    q64 = qkv.detach().double().requires_grad_()
    gout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    reference64(q64)[0].backward(gout)
    qs = qkv.detach().clone().requires_grad_()
    out = ext_ops.attention(qs)
    assert_close(out, ref, rtol=2e-5, atol=2e-5, what="out N=4096")
    out.backward(gout.float())
    assert_close(qs.grad, q64.grad, rtol=1e-4, atol=5e-5, what="dqkv N=4096")


def test_ext_backward_is_the_same_run_to_run(ext_ops):
    """With several threads handing out work items dynamically, dqkv is still bit-identical run to run (each
    dQ slot buffer gets fixed key blocks in a fixed order), so a training run on the CPU is reproducible."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(2, old))
    try:
        qkv = make_qkv(4, 300, 4, 16, seed=5)
        gout = torch.randn(4, 300, 64, generator=torch.Generator().manual_seed(6))
        grads = []
        for _ in range(4):
            qs = qkv.detach().clone().requires_grad_()
            ext_ops.attention(qs).backward(gout)
            grads.append(qs.grad)
        for g in grads[1:]:
            assert torch.equal(g, grads[0]), (g - grads[0]).abs().max().item()
    finally:
        torch.set_num_threads(old)


def test_ext_large_logits_stay_finite(ext_ops):
    qkv = make_qkv(1, 128, 2, 16) * 30  # scores in the hundreds: online softmax must rescale
    ref, _ = reference64(qkv)
    out = ext_ops.attention(qkv)
    assert torch.isfinite(out).all()
    assert_close(out, ref, rtol=1e-4, atol=1e-4, what="out with large logits")


def test_ext_opcheck(ext_ops):
    qkv = make_qkv(2, 40, 2, 16)
    torch.library.opcheck(ext_ops.attention_fwd, (qkv,),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("qkv,match", [
    (torch.randn(2, 16, 3, 4, 8), "head dim"),
    (torch.randn(2, 16, 2, 4, 16), "qkv must have shape"),
    (torch.randn(2, 16, 3, 4, 16, dtype=torch.float64), "qkv must be float32"),
    (torch.randn(2, 16, 48), "qkv must have shape"),
], ids=["head-dim-8", "not-3", "float64", "3-d"])
def test_ext_bad_inputs_name_the_argument(ext_ops, qkv, match):
    with pytest.raises(RuntimeError, match=match):
        ext_ops._C.attention_fwd_cpu(qkv)
    assert ext_ops.attention_reasons(qkv), "reasons must explain why ext cannot take it"


def test_ext_backward_checks_its_arguments(ext_ops):
    qkv = make_qkv(1, 32, 2, 16)
    out, lse2 = ext_ops._C.attention_fwd_cpu(qkv)
    with pytest.raises(RuntimeError, match="dout"):
        ext_ops._C.attention_bwd_cpu(out[:, :16], qkv, out, lse2)
    with pytest.raises(RuntimeError, match="lse2"):
        ext_ops._C.attention_bwd_cpu(out, qkv, out, lse2[:, :1])


def test_ext_dispatch(ext_ops, monkeypatch):
    monkeypatch.setenv("FAST_UNET_BACKEND", "auto")
    qkv = make_qkv(1, 32, 2, 16)
    assert dispatch.reasons("attention", "ext", qkv) == []
    bad = torch.randn(1, 32, 3, 2, 8)
    assert any("head dim" in r for r in dispatch.reasons("attention", "ext", bad))
    assert dispatch.select("attention", bad)[0] == "eager"
    monkeypatch.setenv("FAST_UNET_BACKEND", "ext")
    with pytest.raises(RuntimeError, match="head dim"):
        dispatch.call("attention", bad)
