"""Every op's backward takes its upstream gradient in any memory format and through any strides.

Autograd hands a backward whatever its consumer produced: a channels_last gradient for an NCHW output,
an NCHW one for a channels_last output (an eager consumer, a fallback), a slice of a larger gradient (the
two halves of a concatenation), a transposed view. Each case below runs its forward once and its backward
with the same upstream values laid out four ways: contiguous, channels_last (4-D outputs), a strided view
(every other element of a tensor twice as wide in its last dimension) and a permuted view. Every input
gradient must be the same; a kernel that read the gradient as if it had its output's layout would not be.
On every backend (tests/ops/conftest.py)."""
import pytest
import torch

from fast_unet import ops
from helpers import run_or_skip
from test_strided_params import CASES as PARAM_CASES, _cl


def _param(k, n):
    return torch.randn(n) * 0.7 + (1.0 if k in ("w", "gw", "lw") else 0.0)


CASES = {
    **{case: (op, make, fn) for case, (op, make, fn) in PARAM_CASES.items()},
    "conv3x3-cat": ("conv3x3", lambda: dict(x=_cl(torch.randn(2, 8, 6, 5)), x2=_cl(torch.randn(2, 4, 6, 5)),
                                            w=torch.randn(16, 12, 3, 3) * 0.2, b=16),
                    lambda x, x2, w, b: ops.conv3x3(x, w, b, x2=x2)[0]),
    "conv3x3-pool": ("conv3x3", lambda: dict(x=_cl(torch.randn(2, 8, 8, 6)), w=torch.randn(16, 8, 3, 3) * 0.2, b=16),
                     lambda x, w, b: ops.conv3x3(x, w, b, pool=True)[0]),
    "conv3x3-nchw": ("conv3x3", lambda: dict(x=torch.randn(2, 3, 6, 6), w=torch.randn(16, 3, 3, 3) * 0.2, b=16),
                     lambda x, w, b: ops.conv3x3(x, w, b)[0]),
    "upsample2x": ("upsample2x", lambda: dict(x=_cl(torch.randn(2, 16, 3, 4))), lambda x: ops.upsample2x(x)),
    "attention": ("attention", lambda: dict(qkv=torch.randn(2, 10, 3, 2, 16)), lambda qkv: ops.attention(qkv)),
}


def _layouts(g):
    """The same values as ``g`` in four layouts: contiguous, channels_last (4-D), a strided view and a
    permuted view."""
    out = {"contiguous": g.contiguous()}
    if g.dim() == 4:
        out["channels_last"] = g.contiguous(memory_format=torch.channels_last)
    wide = g.new_zeros((*g.shape[:-1], 2 * g.shape[-1]))
    wide[..., ::2] = g
    out["strided"] = wide[..., ::2]
    perm = list(range(g.dim()))[::-1]
    back = [perm.index(i) for i in range(g.dim())]
    out["permuted"] = g.permute(perm).contiguous().permute(back)
    for name, v in out.items():
        assert torch.equal(v, g), name
    assert not out["strided"].is_contiguous() and not out["permuted"].is_contiguous()
    return out


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.op(CASES[c][0])) for c in CASES])
def test_backward_takes_gradients_in_any_layout(backend, case):
    _, make, fn = CASES[case]
    torch.manual_seed(0)
    inputs = {k: (_param(k, v) if isinstance(v, int) else v).to(backend.device) for k, v in make().items()}
    leaves = {k: (v.detach().requires_grad_(True) if v.is_floating_point() else v) for k, v in inputs.items()}
    out = run_or_skip(lambda: fn(**leaves))
    outs = out if isinstance(out, tuple) else (out,)
    names = [k for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    g = torch.Generator().manual_seed(5)
    upstream = [_layouts(torch.randn(o.shape, generator=g).to(o.dtype).to(backend.device)) for o in outs]
    results = {}
    for layout in upstream[0]:
        gouts = [u.get(layout, u["contiguous"]) for u in upstream]
        results[layout] = torch.autograd.grad(outs, [leaves[k] for k in names], gouts, retain_graph=True)
    base = results["contiguous"]
    for layout, grads in results.items():
        for k, a, e in zip(names, grads, base):
            scale = e.abs().max().item() + 1e-12
            err = (a.double() - e.double()).abs().max().item()
            assert err <= 1e-6 * scale, f"{case}: grad {k} with a {layout} upstream gradient differs by {err:.3g} " \
                                        f"(scale {scale:.3g})"
