"""The CUDA GroupNorm + ReLU + embedding kernels of fast_unet._C (run only where a GPU and a CUDA build
of _C exist; skipped, with the reason, elsewhere)."""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, require_ext

ext_ops = require_ext()
if not ext_ops.CUDA_BUILT:
    pytest.skip("fast_unet._C was built without CUDA kernels", allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

pytestmark = pytest.mark.gpu
EPS = 1e-5
# Tolerances against a float64 reference: float32 tight; half types at most twice eager PyTorch's own error.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


def make(b, c, h, w, fmt, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, c, h, w, generator=g) * 2 + 0.5)
    wt, bs, emb = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.3, torch.randn(b, c, generator=g)
    to = lambda t: t.to("cuda", dtype)  # noqa: E731
    return to(x).contiguous(memory_format=fmt), to(wt), to(bs), to(emb)


def ref64(x, w, b, emb):
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b, emb)]
    y = torch.relu(F.group_norm(leaves[0], 1, leaves[1], leaves[2], EPS)) + leaves[3][:, :, None, None]
    return y, leaves


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(1, 64, 64, 64), (3, 128, 32, 32), (3, 256, 5, 7), (2, 512, 8, 8), (3, 96, 9, 9)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cuda_group_norm_relu(dtype, fmt, shape):
    x, w, b, emb = make(*shape, fmt, dtype)
    y_ref, leaves = ref64(x, w, b, emb)
    gy = torch.randn(y_ref.shape, device="cuda", dtype=torch.float64)
    y_ref.backward(gy)
    xs, ws, bs, es = (t.clone().requires_grad_() for t in (x, w, b, emb))
    y = ext_ops.group_norm_relu(xs, ws, bs, EPS, es)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    y.backward(gy.to(dtype))
    # eager PyTorch in the same dtype, for the "at most twice eager's error" rule
    xe, we, be, ee = (t.clone().requires_grad_() for t in (x, w, b, emb))
    ye = torch.relu(F.group_norm(xe, 1, we, be, EPS)) + ee[:, :, None, None]
    ye.backward(gy.to(dtype))
    rtol, atol = TOL[dtype]
    for name, got, eag, want in (("y", y, ye, y_ref), ("dx", xs.grad, xe.grad, leaves[0].grad),
                                 ("dw", ws.grad, we.grad, leaves[1].grad), ("db", bs.grad, be.grad, leaves[2].grad),
                                 ("demb", es.grad, ee.grad, leaves[3].grad)):
        scale = want.abs().max().item()
        err = (got.double() - want).abs().max().item()
        eager_err = (eag.double() - want).abs().max().item()
        assert err <= max(2 * eager_err, atol * max(scale, 1.0), rtol * scale), \
            f"{name}: err {err:.3g} vs eager {eager_err:.3g} (scale {scale:.3g})"
