"""Flash attention on the packed QKV: the Triton kernels vs eager (SDPA) and float64, forward and dqkv."""
import pytest
import torch

import fast_unet
from fast_unet import eager, ops
from helpers import assert_close_rule

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
def test_vs_eager_and_float64(b, n, d, dtype):
    _check(b, n, 4, d, dtype)


@pytest.mark.parametrize("n", [1, 5, 17])
def test_tiny_sequences(n):
    """N smaller than one tile (the model's 2x2 and 4x4 feature maps at a 16x16 input)."""
    _check(2, n, 4, 16, torch.float32)


def test_long_sequence_once():
    """N = 1024 (sa1/sa5 at 64x64), batch 1, bf16: many key tiles through the online softmax."""
    _check(1, 1024, 2, 16, torch.bfloat16)


def test_strided_qkv_view_is_read_in_place():
    """qkv with non-default strides (heads and the q/k/v axis permuted in memory): no copy needed."""
    b, n, heads, d = 2, 40, 4, 32

    def view(leaf):  # leaf (B, N, 3, H, D) -> the same values stored as (B, H, 3, N, D) in memory
        stored = leaf.permute(0, 3, 2, 1, 4).contiguous()
        v = stored.permute(0, 3, 2, 1, 4)
        assert not v.is_contiguous()
        return v

    _check(b, n, heads, d, torch.float32, make_view=view)


def test_large_logits_are_stable():
    """Scores of order 1e3: exp2 of (s - running max) must not overflow."""
    qkv = torch.randn(1, 70, 3, 4, 16) * 30
    out = ops.attention(qkv)
    ref = eager.attention(qkv.double())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


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


def test_dispatch_needs_interpreter_for_cpu_tensors(monkeypatch):
    monkeypatch.setenv("FAST_UNET_BACKEND", "auto")
    qkv = torch.randn(1, 8, 3, 4, 16)
    assert fast_unet.dispatch.select("attention", qkv)[0] == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = fast_unet.dispatch.explain("attention", qkv)["triton"]
    assert any("TRITON_INTERPRET" in r for r in why), why
    assert fast_unet.dispatch.select("attention", qkv)[0] != "triton"
