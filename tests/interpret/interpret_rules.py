"""The tolerance rule of tests/interpret (flash-attention's)."""
import torch

# Tolerance rule (flash-attention's): the kernel's error against a float64 reference must be at most
# twice the error of eager PyTorch computing in the same dtype, plus a small floor relative to the
# reference's magnitude.
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 1e-3}


def assert_close_rule(name, out, out_eager, ref64, dtype):
    """out, out_eager: the kernel's and eager's results in ``dtype``; ref64: the float64 reference."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values in the kernel's result"
    err = (out.double() - ref64).abs().max().item()
    err_eager = (out_eager.double() - ref64).abs().max().item()
    floor = FLOOR[dtype] * max(ref64.abs().max().item(), 1e-3)
    assert err <= 2 * err_eager + floor, (
        f"{name} ({dtype}): kernel error {err:.3g} > 2 x eager error {err_eager:.3g} + floor {floor:.3g}")
    return err, err_eager


def assert_param_grads_close(model, ref, rel=1e-4):
    """Every parameter gradient of ``model`` within ``rel`` of the largest element of ``ref``'s (+1e-6)."""
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        r = ref_params[name].grad
        assert p.grad is not None, name
        scale = r.abs().max().item() + 1e-6
        err = (p.grad - r).abs().max().item()
        assert err <= rel * scale + 1e-6, f"{name}: grad error {err:.3g} (scale {scale:.3g})"


def assert_matches_reference(model, ref, y, x, t):
    """y = model(x, t) (float32) within 2e-5 + 1e-4 relative of ref(x, t), and every parameter gradient of
    the two within ``assert_param_grads_close`` after the same random upstream gradient."""
    y_ref = ref(x, t)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    assert_param_grads_close(model, ref)


def partials_of(y, pieces):
    """(B, P, 3) float32 (count, mean, M2) partials of each sample of y, in ``pieces`` uneven chunks of its
    flattened values: the layout a conv epilogue writes, built independently of the kernels."""
    flat = y.detach().double().reshape(y.shape[0], -1)
    rows = []
    for chunk in flat.tensor_split(pieces, dim=1):
        mean = chunk.mean(1)
        rows.append(torch.stack([torch.full_like(mean, chunk.shape[1]), mean,
                                 ((chunk - mean[:, None]) ** 2).sum(1)], dim=-1))
    return torch.stack(rows, dim=1).float()


def combine_partials(partials):
    """(mean, var) float64 per sample from (B, P, 3) partials (Chan's formula, in float64)."""
    p = partials.double()
    n = p[..., 0].sum(1)
    mean = (p[..., 0] * p[..., 1]).sum(1) / n
    m2 = (p[..., 2] + p[..., 0] * (p[..., 1] - mean[:, None]) ** 2).sum(1)
    return mean, m2 / n
