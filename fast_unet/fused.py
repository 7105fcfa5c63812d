"""The fused model path: ``UNet.forward`` as a chain of fused Triton kernels (``FAST_UNET_FUSED``).

Unfused, every ``Sequential(Conv2d, GroupNorm(1, C), ReLU)`` writes the conv output, reads it for the
statistics, reads it again to write the normalised tensor, which the next layer reads. Here the conv
(kernels/conv.py) writes its output y once with the GroupNorm partial statistics of each tile in its
epilogue, and y stays *lazily normalised* (``Lazy``): its consumer applies relu(GroupNorm(y)) (+ emb) as
it loads it, folding the partials into mean and rstd in its own prologue:

- the next conv (a DoubleConv's second conv; bot2's and bot3's first) normalises on load;
- ``inc``'s output goes through one normalise + 2x2 max-pool pass that also writes the normalised
  tensor, the skip connection ``x1`` (kernels/resample.py); the other Down blocks' first convs read
  the 2x2 max-pool of their input on load (the pooled tensor is never written);
- ``bot3``'s output is normalised by the bilinear upsample as it reads it, and each Up block's first
  conv reads the concatenation [skip, upsampled] from its two tensors (no ``torch.cat``);
- a Down/Up block's output (+ its time embedding) is normalised by the attention block's first GEMM
  (``attention`` path, fast_unet/triton_block.py), or materialised in one pass when that path is off.

Each piece is a ``torch.library`` custom op with its own backward (fast_unet/triton_ops.py), so autograd
sees an ordinary graph; a lazily normalised tensor's consumers each return its gradient through the
Triton GroupNorm backward, and autograd sums them.
"""
from typing import NamedTuple, Optional

import torch

from . import dispatch


def _tops():
    from . import triton_ops

    return triton_ops


class Lazy(NamedTuple):
    """relu(GroupNorm(1, C)(y)) + emb[:, :, None, None], not yet materialised: y (B, C, H, W) channels_last
    and its (B, P, 3) float32 partial statistics, the GroupNorm module (weight, bias, eps), emb (B, C)."""

    y: torch.Tensor
    partials: torch.Tensor
    gn: torch.nn.GroupNorm
    emb: Optional[torch.Tensor] = None

    def norm(self):
        if self.emb is not None:
            raise ValueError("a lazily normalised tensor with an embedding can only be materialised")
        return (self.partials, self.gn.weight, self.gn.bias, self.gn.eps)

    def materialize(self):
        return _tops().gn_relu_partials(self.y, self.partials, self.gn.weight, self.gn.bias, self.gn.eps, self.emb)


def double_conv(dc, x, x2=None, pool=False):
    """``DoubleConv`` -> Lazy output. x: a tensor, or a Lazy (normalised on load); x2: a second input
    whose channels follow x's (the Up blocks' concatenation, read in place); pool: the first conv reads
    max_pool2d(x, 2) on load (the Down blocks)."""
    tops = _tops()
    conv1, gn1 = dc.conv1[0], dc.conv1[1]
    conv2, gn2 = dc.conv2[0], dc.conv2[1]
    if isinstance(x, Lazy):
        x = x.materialize() if x.emb is not None else x
    if isinstance(x, Lazy):
        y1, p1 = tops.conv3x3(x.y, conv1.weight, conv1.bias, norm=x.norm())
    else:
        y1, p1 = tops.conv3x3(x, conv1.weight, conv1.bias, x2=x2, pool=pool)
    y2, p2 = tops.conv3x3(y1, conv2.weight, conv2.bias, norm=(p1, gn1.weight, gn1.bias, gn1.eps))
    return Lazy(y2, p2, gn2)


def _attention(sa, x, attention_on):
    """SelfAttention on a Lazy input: normalised by its first GEMM (``attention`` path), or materialised."""
    if attention_on:
        from . import triton_block

        return triton_block.self_attention(sa, x.y, (x.partials, x.gn.weight, x.gn.bias, x.gn.eps, x.emb))
    return sa(x.materialize())


def unet_forward(model, x, t):
    """The UNet's forward on the fused path; x channels_last (or NCHW: the first conv reads any strides),
    t (B,) checked timesteps. Returns outc's output (channels_last)."""
    tops = _tops()
    attention_on = dispatch.fused_on("attention", x)
    (d1, d2, d3), (u1, u2, u3) = model._time_embeddings(t)
    x1l = double_conv(model.inc, x)
    x1, h = tops.gn_relu_maxpool(x1l.y, *x1l.norm())
    x2 = _attention(model.sa1, double_conv(model.down1.down[1], h)._replace(emb=d1), attention_on)
    x3 = _attention(model.sa2, double_conv(model.down2.down[1], x2, pool=True)._replace(emb=d2), attention_on)
    x4 = _attention(model.sa3, double_conv(model.down3.down[1], x3, pool=True)._replace(emb=d3), attention_on)
    b3 = double_conv(model.bot3, double_conv(model.bot2, double_conv(model.bot1, x4)))
    h = _attention(model.sa4, double_conv(model.up1.conv, x3, tops.upsample2x(b3.y, b3.norm()))._replace(emb=u1),
                   attention_on)
    h = _attention(model.sa5, double_conv(model.up2.conv, x2, tops.upsample2x(h))._replace(emb=u2), attention_on)
    h = _attention(model.sa6, double_conv(model.up3.conv, x1, tops.upsample2x(h))._replace(emb=u3), attention_on)
    return model.outc(h)
