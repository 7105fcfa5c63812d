"""Eager PyTorch implementations of fast_unet's ops: the fallback of every kernel.

Each function here is the plain-PyTorch twin of one kernel in ``kernels/`` (Triton) and ``csrc/``
(C++/CUDA); ``fast_unet.ops`` routes every call through ``fast_unet.dispatch``, which picks one of them.
They run on any device and dtype that PyTorch supports, and they are written to be fast:
no ``.repeat``, no needless copies or transposes, SDPA instead of materialised attention weights.
"""
import torch
import torch.nn.functional as F


def group_norm_relu(x, weight, bias, eps, emb=None):
    """``relu(group_norm(x, 1, weight, bias, eps)) (+ emb[:, :, None, None])``.

    x: (B, C, H, W), NCHW or channels_last; weight, bias: (C,); emb: (B, C) or None.
    """
    y = F.group_norm(x, 1, weight, bias, eps)
    y = torch.relu_(y)
    if emb is not None:
        y = y + emb[:, :, None, None]
    return y


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
    """Every block's time-embedding vector in two GEMMs.

    t: (B,) timesteps. ``relu_weight`` (sum of the Down blocks' C, dim) is the Down blocks' Linear
    weights stacked along their outputs (their activation is ReLU); ``silu_*`` likewise for the Up blocks.
    Returns (relu_out (B, sum C_down), silu_out (B, sum C_up)) in the weights' dtype.
    """
    enc = sinusoidal_encoding(t, dim).to(relu_weight.dtype)
    down = F.linear(torch.relu(enc), relu_weight, relu_bias)
    up = F.linear(F.silu(enc), silu_weight, silu_bias)
    return down, up


__all__ = ["group_norm_relu", "attention", "sinusoidal_encoding", "time_embedding"]
