"""The CPU flash attention of fast_unet._C against eager SDPA and a float64 reference."""
import pytest
import torch

from helpers import assert_close, require_ext

ext_ops = require_ext()

from fast_unet import dispatch, eager  # noqa: E402


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
def test_forward_backward_vs_eager_and_float64(case, strided):
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


@pytest.mark.slow
def test_sa6_shape_n4096():
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


def test_large_logits_stay_finite():
    qkv = make_qkv(1, 128, 2, 16) * 30  # scores in the hundreds: online softmax must rescale
    ref, _ = reference64(qkv)
    out = ext_ops.attention(qkv)
    assert torch.isfinite(out).all()
    assert_close(out, ref, rtol=1e-4, atol=1e-4, what="out with large logits")


def test_opcheck():
    qkv = make_qkv(2, 40, 2, 16)
    torch.library.opcheck(ext_ops.attention_fwd, (qkv,),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("qkv,match", [
    (torch.randn(2, 16, 3, 4, 8), "head dim"),
    (torch.randn(2, 16, 2, 4, 16), "qkv must have shape"),
    (torch.randn(2, 16, 3, 4, 16, dtype=torch.float64), "qkv must be float32"),
    (torch.randn(2, 16, 48), "qkv must have shape"),
], ids=["head-dim-8", "not-3", "float64", "3-d"])
def test_bad_inputs_name_the_argument(qkv, match):
    with pytest.raises(RuntimeError, match=match):
        ext_ops._C.attention_fwd_cpu(qkv)
    assert ext_ops.attention_reasons(qkv), "reasons must explain why ext cannot take it"


def test_backward_checks_its_arguments():
    qkv = make_qkv(1, 32, 2, 16)
    out, lse2 = ext_ops._C.attention_fwd_cpu(qkv)
    with pytest.raises(RuntimeError, match="dout"):
        ext_ops._C.attention_bwd_cpu(out[:, :16], qkv, out, lse2)
    with pytest.raises(RuntimeError, match="lse2"):
        ext_ops._C.attention_bwd_cpu(out, qkv, out, lse2[:, :1])


def test_dispatch(monkeypatch):
    monkeypatch.setenv("FAST_UNET_BACKEND", "auto")
    qkv = make_qkv(1, 32, 2, 16)
    assert dispatch.reasons("attention", "ext", qkv) == []
    bad = torch.randn(1, 32, 3, 2, 8)
    assert any("head dim" in r for r in dispatch.reasons("attention", "ext", bad))
    assert dispatch.select("attention", bad)[0] == "eager"
    monkeypatch.setenv("FAST_UNET_BACKEND", "ext")
    with pytest.raises(RuntimeError, match="head dim"):
        dispatch.call("attention", bad)
