"""Eager PyTorch implementations of fast_unet's ops: the fallback of every kernel, and the tests' twin.

Each function here is the plain-PyTorch twin of one op of ``fast_unet.ops`` (whose Triton kernels live in
``kernels/`` and C++/CUDA kernels in ``csrc/``); ``fast_unet.dispatch`` picks, per call, which runs. They
run on any device and dtype that PyTorch supports, and they are written to be fast: no ``.repeat``, no
needless copies or transposes, SDPA instead of materialised attention weights.

The twin of a fused op is the composition it fuses. Its pieces come in as arguments (``normalize``,
``ln_linear``) defaulting to the eager ones here; ``fast_unet.ops`` registers them with the dispatched
ops instead, so a fused op that falls back still runs its pieces on the best backend that takes them.
This module imports nothing else of fast_unet.
"""
import torch
import torch.nn.functional as F


def _spatial_view(t):
    """A 3-D view of a (B, C, H, W) tensor with its channel axis dense, and the spatial axis's index:
    (B, HW, C), 1 for channels_last; (B, C, HW), 2 otherwise. Per-channel broadcasts and per-(B, C)
    reductions on it are plain strided loops."""
    b, c, h, w = t.shape
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return t.permute(0, 2, 3, 1).reshape(b, h * w, c), 1
    return t.reshape(b, c, h * w), 2


def _from_spatial_view(t3, sdim, shape):
    """The (B, C, H, W) tensor behind a ``_spatial_view`` result (channels_last when ``sdim`` is 1)."""
    b, c, h, w = shape
    return t3.view(b, h, w, c).permute(0, 3, 1, 2) if sdim == 1 else t3.view(b, c, h, w)


class _GroupNormReLU(torch.autograd.Function):
    """GroupNorm(1, C) + affine + ReLU (+ embedding), accurate in float32 both ways.

    PyTorch's CPU GroupNorm loses digits in float32 when a sample's mean is large against its spread:
    its forward takes the variance as E[x^2] - E[x]^2 from long running sums (at mean 20, std 1: 0.6%
    off in rstd), and its backward's sums are uncentred (``sum(dy * x) - mean * sum(dy)``); in the UNet
    at 48x80 channels_last that cost 1% of dx. Here the statistics are two-pass (mean, then the mean
    square of the centred values) and the backward works on the centred ``xhat``, both with torch's cascade-summed reductions: about 1e-6
    relative in float32. Saved: x, the ReLU output and the (B,) statistics, as the unfused
    ops save. ``tests/ops/test_group_norm.py`` holds it to float64 on inputs whose mean is 20x their spread.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, emb):
        acc = torch.promote_types(x.dtype, torch.float32)
        x3, sdim = _spatial_view(x)
        flat = x3.reshape(x3.shape[0], -1)
        mean = flat.mean(1, dtype=acc)
        # Two passes, centred: as accurate as var_mean (1e-7 at a mean 20x the spread) and 4x faster on
        # the CPU; the apply also works on the centred values, so nothing cancels there either.
        centred = flat.to(acc) - mean[:, None]
        rstd = torch.rsqrt(torch.linalg.vecdot(centred, centred, dim=1) / flat.shape[1] + eps)
        a = (rstd[:, None] * weight.to(acc)).unsqueeze(sdim)    # (B, C) -> broadcast per channel
        y3 = torch.relu_(torch.addcmul(bias.to(acc)[None, :].unsqueeze(sdim), centred.view(x3.shape), a))
        y3 = y3.to(x.dtype)
        y = _from_spatial_view(y3, sdim, x.shape)
        ctx.save_for_backward(x, weight, y, mean, rstd)
        ctx.has_emb = emb is not None
        return y + emb[:, :, None, None] if emb is not None else y

    @staticmethod
    def backward(ctx, dout):
        x, weight, y, mean, rstd = ctx.saved_tensors
        acc = torch.promote_types(x.dtype, torch.float32)
        x3, sdim = _spatial_view(x)
        shape3 = x3.shape
        dz = torch.ops.aten.threshold_backward(dout, y, 0)
        dz3 = (dz.permute(0, 2, 3, 1) if sdim == 1 else dz).reshape(shape3).to(acc)
        mean, rstd = mean.to(acc).view(-1, 1, 1), rstd.to(acc).view(-1, 1, 1)
        xhat = torch.addcmul(-mean * rstd, x3.to(acc), rstd)
        p = dz3.sum(sdim)                  # (B, C): spatial sums of dz
        q = (dz3 * xhat).sum(sdim)         # (B, C): spatial sums of dz * xhat
        w = weight.to(acc)
        m = x[0].numel()
        s1, s2 = (p * w).sum(1) / m, (q * w).sum(1) / m
        cw = (rstd.view(-1, 1) * w).unsqueeze(sdim)  # rstd * w, broadcast per channel
        dx = torch.addcmul((-rstd.view(-1) * s1).view(-1, 1, 1), dz3, cw)
        dx = dx.addcmul_(xhat, (-rstd.view(-1) * s2).view(-1, 1, 1)).to(x.dtype)
        demb = dout.sum(dim=(2, 3)) if ctx.has_emb else None
        return _from_spatial_view(dx, sdim, x.shape), q.sum(0).to(weight.dtype), p.sum(0).to(weight.dtype), None, demb


def group_norm_relu(x, weight, bias, eps, emb=None, partials=None):
    """``relu(group_norm(x, 1, weight, bias, eps)) (+ emb[:, :, None, None])``.

    x: (B, C, H, W), NCHW or channels_last; weight, bias: (C,); emb: (B, C) or None. Statistics and
    the backward's reductions in float32, computed here in two passes (``partials``, x's statistics
    per tile from a conv epilogue, are not needed); output in x's dtype and memory format.
    """
    return _GroupNormReLU.apply(x, weight, bias, eps, emb)


def attention(qkv):
    """Softmax attention over tokens, read from the packed QKV projection.

    qkv: (B, N, 3, heads, d), the ``in_proj`` output viewed in token order.
    Returns (B, N, heads * d), the layout ``out_proj`` reads. Scale is 1/sqrt(d).
    """
    b, n, _, heads, d = qkv.shape
    q, k, v = qkv.unbind(2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).reshape(b, n, heads * d)


def sinusoidal_encoding(t, dim):
    """The reference's ``pos_encoding``: (B,) timesteps -> (B, dim) float32, sin half then cos half."""
    t = t.to(torch.float32).unsqueeze(-1)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=t.device, dtype=torch.float32) / dim))
    arg = t * inv_freq
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


def time_embedding(t, dim, relu_weight, relu_bias, silu_weight, silu_bias):
    """Every block's time-embedding vector: one F.linear per block (or per side, stacked).

    t: (B,) timesteps. ``relu_weight``/``relu_bias``: the Down blocks' Linear weights and biases (their
    activation is ReLU), one tensor each (stacked along their outputs) or a list with one per block;
    ``silu_*`` likewise for the Up blocks. Returns (down, up) in the weights' dtype: tensors for tensor
    arguments, lists with one (B, C_i) tensor per block for lists.
    """
    single = isinstance(relu_weight, torch.Tensor)
    rws, rbs, sws, sbs = ([p] if single else list(p) for p in (relu_weight, relu_bias, silu_weight, silu_bias))
    enc = sinusoidal_encoding(t, dim).to(rws[0].dtype)
    a_down, a_up = torch.relu(enc), F.silu(enc)
    down = [F.linear(a_down, w, b) for w, b in zip(rws, rbs)]
    up = [F.linear(a_up, w, b) for w, b in zip(sws, sbs)]
    return (down[0], up[0]) if single else (down, up)


def conv3x3(x, x2, partials, gn_weight, gn_bias, eps, weight, bias, pool, normalize=group_norm_relu):
    """(y, None): the 3x3 conv (padding 1) of x; of ``normalize(x, gn_weight, gn_bias, eps, None, partials)``
    when ``gn_weight`` is given (normalise on load); of cat([x, x2], 1) when ``x2`` is given; of
    max_pool2d(x, 2) when ``pool``. y is channels_last; no GroupNorm statistics are written (None)."""
    if gn_weight is not None:
        x = normalize(x, gn_weight, gn_bias, eps, None, partials)
    if x2 is not None:
        x = torch.cat([x, x2], dim=1)
    x = x.contiguous(memory_format=torch.channels_last)
    if pool:
        x = F.max_pool2d(x, 2)
    return F.conv2d(x, weight, bias, padding=1), None


def gn_relu_maxpool(y, partials, gn_weight, gn_bias, eps, normalize=group_norm_relu):
    """(x, max_pool2d(x, 2)) with x = relu(GroupNorm(1, C)(y))."""
    x = normalize(y, gn_weight, gn_bias, eps, None, partials)
    return x, F.max_pool2d(x, 2)


def upsample2x(x, partials, gn_weight, gn_bias, eps, normalize=group_norm_relu):
    """Bilinear 2x upsampling (align_corners=True) of x, or of relu(GroupNorm(1, C)(x)) when ``gn_weight``
    is given; channels_last."""
    if gn_weight is not None:
        x = normalize(x, gn_weight, gn_bias, eps, None, partials)
    x = x.contiguous(memory_format=torch.channels_last)
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


def linear_residual(x, weight, bias, residual):
    """``x @ weight.T + bias + residual`` with the residual as the GEMM's accumulator (addmm's beta=1)."""
    n = weight.shape[0]
    out = torch.addmm(residual.reshape(-1, n), x.reshape(-1, x.shape[-1]), weight.t())
    return out.add_(bias).view(*x.shape[:-1], n)


def ln_linear(x, ln_weight, ln_bias, ln_eps, weight, bias, gelu=False):
    """``[gelu](layer_norm(x, (K,), ln_weight, ln_bias, ln_eps) @ weight.T + bias)``."""
    out = F.linear(F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, ln_eps), weight, bias)
    return F.gelu(out) if gelu else out


def mlp_residual(x, ln_weight, ln_bias, ln_eps, weight1, bias1, weight2, bias2, ln_linear=ln_linear,
                 linear_residual=linear_residual):
    """``x + linear(gelu(linear(layer_norm(x), weight1, bias1)), weight2, bias2)``: ``ln_linear`` with GELU, then
    ``linear_residual`` with x as the residual."""
    f = ln_linear(x, ln_weight, ln_bias, ln_eps, weight1, bias1, True)
    return linear_residual(f, weight2, bias2, x)


def gn_ln_linear(y, partials, gn_weight, gn_bias, gn_eps, emb, ln_weight, ln_bias, ln_eps, weight, bias,
                 normalize=group_norm_relu, ln_linear=ln_linear):
    """(out (B, HW, N_out), t): t = relu(GroupNorm(1, C)(y)) + emb, channels_last; out = the token GEMM
    ``ln_linear`` of t's (B, HW, C) tokens (a view of channels_last t)."""
    t = normalize(y, gn_weight, gn_bias, gn_eps, emb, partials).contiguous(memory_format=torch.channels_last)
    b, c, h, w = t.shape
    return ln_linear(t.permute(0, 2, 3, 1).reshape(b, h * w, c), ln_weight, ln_bias, ln_eps, weight, bias, False), t


__all__ = ["attention", "conv3x3", "gn_ln_linear", "gn_relu_maxpool", "group_norm_relu", "linear_residual",
           "ln_linear", "mlp_residual", "sinusoidal_encoding", "time_embedding", "upsample2x"]
