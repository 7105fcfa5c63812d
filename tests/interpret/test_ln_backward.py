"""The LayerNorm backward fused into the GEMM that forms the normalised input's gradient
(kernels/ln_backward.py, ``fast_unet::ln_linear_backward``): dx, d ln_weight, d ln_bias vs eager and
float64, three dtypes, every K config (padded K 64 to 512), rows not a multiple of the block."""
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_rule

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(35, 48, 144), (70, 80, 80), (33, 128, 384), (64, 256, 256), (9, 512, 64)]  # (M, K, N_out)


def _grads(x, lw, lb, w, d, dtype):
    """Autograd of LayerNorm(x) @ w^T in ``dtype``: (dx, d ln_w, d ln_b)."""
    leaves = [t.to(dtype).detach().requires_grad_() for t in (x, lw, lb)]
    out = F.layer_norm(leaves[0], (x.shape[1],), leaves[1], leaves[2], 1e-5) @ w.to(dtype).t()
    out.backward(d.to(dtype))
    return [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ln_linear_backward(shape, dtype):
    import fast_unet.ops  # noqa: F401  (registers the custom ops)

    m, k, n = shape
    x = (torch.randn(m, k, dtype=torch.float64) * 2 + 0.5).to(dtype).double()
    lw = (torch.randn(k, dtype=torch.float64) * 0.5 + 1).to(dtype).double()
    lb = torch.randn(k, dtype=torch.float64).to(dtype).double()
    w = (torch.randn(n, k, dtype=torch.float64) / k ** 0.5).to(dtype).double()
    d = torch.randn(m, n, dtype=torch.float64).to(dtype).double()
    got = torch.ops.fast_unet.ln_linear_backward(d.to(dtype), x.to(dtype), lw.to(dtype), 1e-5, w.to(dtype))
    eager = _grads(x, lw, lb, w, d, dtype)
    ref = _grads(x, lw, lb, w, d, torch.float64)
    for name, g, ge, gr in zip(("dx", "dln_weight", "dln_bias"), got, eager, ref):
        assert g.dtype == dtype, name
        assert_close_rule(name, g, ge, gr, dtype)


def test_registration_and_bad_inputs():
    import fast_unet.ops  # noqa: F401  (registers the custom ops)
    from fast_unet.kernels import ln_backward as L

    args = (torch.randn(10, 24), torch.randn(10, 40), torch.randn(40), 1e-5, torch.randn(24, 40))
    torch.library.opcheck(torch.ops.fast_unet.ln_linear_backward.default, args)
    with pytest.raises(ValueError, match="weight must have shape"):
        L.ln_linear_bwd(args[0], args[1], args[2], 1e-5, torch.randn(24, 41))
    with pytest.raises(ValueError, match="at most 512"):
        L.ln_linear_bwd(torch.randn(2, 3), torch.randn(2, 520), torch.randn(520), 1e-5, torch.randn(3, 520))
    with pytest.raises(TypeError, match="ln_weight"):
        L.ln_linear_bwd(args[0], args[1], args[2].double(), 1e-5, args[4])
