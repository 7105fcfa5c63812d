"""Every (C,) parameter (biases, norm weights and biases) may be a strided view, such as ``w_full[::2]``:
only its shape is checked, so a kernel that reads it as ``ptr + c`` would read the wrong elements (issue 10).
Each op runs once with strided views and once with contiguous copies of the same values, on every
backend: outputs and gradients must be identical."""
import pytest
import torch

from fast_unet import ops
from helpers import run_or_skip


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


# (op, inputs: dict name -> (tensor, is a (C,) parameter), fn(**inputs) -> tensor or tuple)
CASES = {
    "group_norm_relu": ("group_norm_relu", lambda: dict(x=_cl(torch.randn(2, 16, 5, 6)), w=16, b=16,
                                                        emb=torch.randn(2, 16)),
                        lambda x, w, b, emb: ops.group_norm_relu(x, w, b, 1e-5, emb)),
    "group_norm_relu-nchw": ("group_norm_relu", lambda: dict(x=torch.randn(2, 16, 5, 6), w=16, b=16),
                             lambda x, w, b: ops.group_norm_relu(x, w, b, 1e-5)),
    "conv3x3": ("conv3x3", lambda: dict(x=_cl(torch.randn(2, 8, 6, 6)), w=torch.randn(16, 8, 3, 3) * 0.2, b=16),
                lambda x, w, b: ops.conv3x3(x, w, b)[0]),
    "conv3x3-norm": ("conv3x3", lambda: dict(x=_cl(torch.randn(2, 8, 6, 6)), gw=8, gb=8,
                                             w=torch.randn(16, 8, 3, 3) * 0.2, b=16),
                     lambda x, gw, gb, w, b: ops.conv3x3(x, w, b, norm=(None, gw, gb, 1e-5))[0]),
    "gn_relu_maxpool": ("gn_relu_maxpool", lambda: dict(x=_cl(torch.randn(2, 16, 6, 8)), gw=16, gb=16),
                        lambda x, gw, gb: ops.gn_relu_maxpool(x, None, gw, gb, 1e-5)),
    "upsample2x-norm": ("upsample2x", lambda: dict(x=_cl(torch.randn(2, 16, 3, 4)), gw=16, gb=16),
                        lambda x, gw, gb: ops.upsample2x(x, norm=(None, gw, gb, 1e-5))),
    "linear_residual": ("linear_residual", lambda: dict(x=torch.randn(2, 9, 32), w=torch.randn(48, 32) * 0.2, b=48,
                                                        res=torch.randn(2, 9, 48)),
                        lambda x, w, b, res: ops.linear_residual(x, w, b, res)),
    "ln_linear": ("ln_linear", lambda: dict(x=torch.randn(2, 9, 32), lw=32, lb=32, w=torch.randn(48, 32) * 0.2,
                                            b=48),
                  lambda x, lw, lb, w, b: ops.ln_linear(x, lw, lb, 1e-5, w, b, True)),
    "gn_ln_linear": ("gn_ln_linear", lambda: dict(x=_cl(torch.randn(2, 32, 3, 3)), gw=32, gb=32,
                                                  emb=torch.randn(2, 32), lw=32, lb=32,
                                                  w=torch.randn(96, 32) * 0.2, b=96),
                     lambda x, gw, gb, emb, lw, lb, w, b: ops.gn_ln_linear(x, None, gw, gb, 1e-5, emb, lw, lb, 1e-5,
                                                                           w, b)),
    "time_embedding": ("time_embedding", lambda: dict(t=torch.tensor([3, 250, 999]), w=torch.randn(40, 32) * 0.2,
                                                      b=40, sw=torch.randn(24, 32) * 0.2, sb=24),
                       lambda t, w, b, sw, sb: ops.time_embedding(t, 32, w, b, sw, sb)),
}


def _run(fn, inputs):
    leaves = {k: (v.detach().requires_grad_(True) if v.is_floating_point() else v) for k, v in inputs.items()}
    out = fn(**leaves)
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(5)
    loss = sum((o.double() * torch.randn(o.shape, generator=g, dtype=torch.float64)).sum() for o in outs)
    names = [k for k, v in leaves.items() if v.requires_grad]
    return [o.detach() for o in outs], dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])))


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.op(CASES[c][0])) for c in CASES])
def test_strided_parameter_views(backend, case):
    _, make, fn = CASES[case]
    torch.manual_seed(0)
    spec = make()
    strided, dense = {}, {}
    for k, v in spec.items():
        if isinstance(v, int):  # a (C,) parameter: every other element of a (2C,) tensor
            full = torch.randn(2 * v) * 0.7 + (1.0 if k in ("w", "gw", "lw") and case != "conv3x3" else 0.0)
            strided[k] = full[::2]
            assert strided[k].stride() == (2,)
            dense[k] = strided[k].contiguous()
        else:
            strided[k] = dense[k] = v
    strided = {k: v.to(backend.device) for k, v in strided.items()}
    dense = {k: v.to(backend.device) for k, v in dense.items()}
    outs, grads = run_or_skip(_run, fn, strided)
    outs_d, grads_d = _run(fn, dense)
    for i, (o, od) in enumerate(zip(outs, outs_d)):
        torch.testing.assert_close(o, od, rtol=0, atol=0, msg=lambda m: f"{case} output {i}: {m}")
    assert grads.keys() == grads_d.keys()
    for k in grads:
        torch.testing.assert_close(grads[k], grads_d[k], rtol=0, atol=0, msg=lambda m: f"{case} grad {k}: {m}")
