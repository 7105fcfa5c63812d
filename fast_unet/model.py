"""The drop-in UNet: the reference's constructor, submodule names and ``state_dict`` keys, fast forward.

Every module keeps the reference's parameters where the reference has them (``conv1 = Sequential(Conv2d,
GroupNorm, ReLU)``, ``mha = MultiheadAttention``, ...) so checkpoints load both ways with ``strict=True``;
only the forward passes differ. They are written once, in fast_unet's ops (``fast_unet.ops``), each of which
dispatches to Triton, the C++/CUDA extension or eager PyTorch; between blocks, activations travel as
``ops.Lazy`` tensors, normalised by whichever op reads them.

Differences from the reference that a user can see, all of them lifted limits:
- any batch size, any H and W divisible by 8 (square or not): ``SelfAttention.size`` is kept but unused;
- float32, bfloat16 and float16 models; integer or float timesteps, one per sample or one for the batch;
- activations run channels_last inside the model; the output has the input's memory format.
"""
import numbers

import torch
import torch.nn as nn

from . import ops


def _norm(gn):
    """(weight, bias, eps) of a GroupNorm module."""
    return gn.weight, gn.bias, gn.eps


class DoubleConv(nn.Module):
    def __init__(self, in_c, out_c):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_c, out_c, kernel_size=3, padding=1), nn.GroupNorm(1, out_c), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(out_c, out_c, kernel_size=3, padding=1), nn.GroupNorm(1, out_c), nn.ReLU())

    def forward(self, x, emb=None):
        """x: (B, in_c, H, W). ``emb`` (B, out_c), if given, is added after the last ReLU."""
        return self.lazy(x)._replace(emb=emb).materialize()

    def lazy(self, x, x2=None, pool=False):
        """The block's output before its last GroupNorm + ReLU, as a ``Lazy``.

        x: a tensor, or a ``Lazy`` (normalised as the first conv loads it); ``x2``: a tensor whose channels
        follow x's (the Up blocks' concatenation, read in place); ``pool``: the first conv reads
        max_pool2d(x, 2) (the Down blocks)."""
        (conv1, gn1), (conv2, gn2) = self.conv1[:2], self.conv2[:2]
        if isinstance(x, ops.Lazy) and x.emb is not None:
            x = x.materialize()
        if isinstance(x, ops.Lazy):
            y1, p1 = ops.conv3x3(x.y, conv1.weight, conv1.bias, norm=x.norm())
        else:
            y1, p1 = ops.conv3x3(x, conv1.weight, conv1.bias, x2=x2, pool=pool)
        y2, p2 = ops.conv3x3(y1, conv2.weight, conv2.bias, norm=(p1, *_norm(gn1)))
        return ops.Lazy(y2, p2, *_norm(gn2))


class Down(nn.Module):
    def __init__(self, in_c, out_c, emb_dim=128):
        super().__init__()
        self.down = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_c, out_c))
        self.emb_layer = nn.Sequential(nn.ReLU(), nn.Linear(emb_dim, out_c))

    def forward(self, x, t, emb=None):
        """x: (B, in_c, H, W); t: (B, emb_dim) time encoding, or None when ``emb`` (B, out_c), this
        block's already projected embedding, is given."""
        return self.lazy(x, self.emb_layer(t) if emb is None else emb).materialize()

    def lazy(self, x, emb, pooled=False):
        """The block's output as a ``Lazy`` carrying ``emb``; ``pooled``: x is already max-pooled."""
        return self.down[1].lazy(x, pool=not pooled)._replace(emb=emb)


class Up(nn.Module):
    def __init__(self, in_c, out_c, emb_dim=128):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = DoubleConv(in_c, out_c)
        self.emb_layer = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_c))

    def forward(self, x, skip_x, t, emb=None):
        """x: (B, C_x, H/2, W/2); skip_x: (B, C_skip, H, W); t and emb as in ``Down.forward``."""
        return self.lazy(x, skip_x, self.emb_layer(t) if emb is None else emb).materialize()

    def lazy(self, x, skip_x, emb):
        """The block's output as a ``Lazy`` carrying ``emb``. x: a tensor, or a ``Lazy`` that the upsample
        normalises as it reads it; the first conv reads cat([skip_x, up(x)]) from the two tensors."""
        if isinstance(x, ops.Lazy) and x.emb is not None:
            x = x.materialize()
        up = ops.upsample2x(x.y, x.norm()) if isinstance(x, ops.Lazy) else ops.upsample2x(x)
        return self.conv.lazy(skip_x, x2=up)._replace(emb=emb)


class SelfAttention(nn.Module):
    """The reference's attention block over the H*W spatial tokens, at any H and W.

    ``size`` is accepted and stored for compatibility; the forward reads H and W from its input.
    """

    def __init__(self, channels, size=None):
        super().__init__()
        self.channels = channels
        self.size = size
        self.mha = nn.MultiheadAttention(channels, 4, batch_first=True)
        self.ln = nn.LayerNorm([channels])
        self.ff_self = nn.Sequential(
            nn.LayerNorm([channels]), nn.Linear(channels, channels), nn.GELU(), nn.Linear(channels, channels)
        )

    def forward(self, x):
        """x: (B, C, H, W), or a ``Lazy`` (a block's output still to be normalised: the first GEMM normalises
        it as it loads it and writes it once, as the residual). Returns (B, C, H, W) channels_last."""
        mha, ln1, (ln2, fc1, _, fc2) = self.mha, self.ln, self.ff_self
        if isinstance(x, ops.Lazy):
            qkv, t = ops.gn_ln_linear(x.y, x.partials, x.weight, x.bias, x.eps, x.emb, ln1.weight, ln1.bias, ln1.eps,
                                      mha.in_proj_weight, mha.in_proj_bias)
        else:
            t = x.contiguous(memory_format=torch.channels_last)
            qkv = None
        b, c, h, w = t.shape
        n, heads = h * w, mha.num_heads
        # (B, C, H, W) channels_last is (B, H, W, C) in memory: the token view costs nothing.
        tokens = t.permute(0, 2, 3, 1).reshape(b, n, c)
        if qkv is None:
            qkv = ops.ln_linear(tokens, ln1.weight, ln1.bias, ln1.eps, mha.in_proj_weight, mha.in_proj_bias)
        o = ops.attention(qkv.view(b, n, 3, heads, c // heads))
        a = ops.linear_residual(o, mha.out_proj.weight, mha.out_proj.bias, tokens)
        out = ops.mlp_residual(a, ln2.weight, ln2.bias, ln2.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        return out.view(b, h, w, c).permute(0, 3, 1, 2)  # channels_last (B, C, H, W), no copy


class UNet(nn.Module):
    """Drop-in for the reference DDPM UNet: ``forward(x, t)`` -> predicted noise, shaped like x.

    x: (B, c_in, H, W) floating, H and W divisible by 8, NCHW or channels_last, on the parameters'
    device and in their dtype. t: (B,) integer or float timesteps, or one timestep (a number, a 0-d or a
    1-element tensor) for the whole batch. ``device`` is stored, as in the reference, and otherwise
    unused: the model lives where its parameters are.
    """

    def __init__(self, c_in=3, c_out=3, time_dim=128, device="cuda"):
        super().__init__()
        self.device = device
        self.time_dim = time_dim
        self.c_in = c_in
        self.inc = DoubleConv(c_in, 64)
        self.down1 = Down(64, 128)
        self.sa1 = SelfAttention(128, 32)
        self.down2 = Down(128, 256)
        self.sa2 = SelfAttention(256, 16)
        self.down3 = Down(256, 256)
        self.sa3 = SelfAttention(256, 8)
        self.bot1 = DoubleConv(256, 512)
        self.bot2 = DoubleConv(512, 512)
        self.bot3 = DoubleConv(512, 256)
        self.up1 = Up(512, 128)
        self.sa4 = SelfAttention(128, 16)
        self.up2 = Up(256, 64)
        self.sa5 = SelfAttention(64, 32)
        self.up3 = Up(128, 64)
        self.sa6 = SelfAttention(64, 64)
        self.outc = nn.Conv2d(64, c_out, kernel_size=1)
        # Activations run channels_last; keeping the 3x3 weights in that format too saves a weight
        # copy per convolution per call. Shapes and state_dict keys are unchanged (only strides differ).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)

    def pos_encoding(self, t, channels):
        """The reference's sinusoidal encoding: t (B, 1) or (B,) -> (B, channels) float32."""
        from .eager import sinusoidal_encoding

        return sinusoidal_encoding(t.reshape(-1), channels)

    def _check_inputs(self, x, t):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (B, {self.c_in}, H, W), got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x must be 4-D (B, C, H, W) with C={self.c_in}, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor (float32, bfloat16 or float16), got {x.dtype}")
        b, c, h, w = x.shape
        if c != self.c_in:
            raise ValueError(f"x has {c} channels (shape {tuple(x.shape)}) but the model was built with c_in={self.c_in}")
        if h % 8 or w % 8 or h == 0 or w == 0:
            raise ValueError(f"x's height and width must be positive multiples of 8 (three 2x poolings), got {h}x{w}")
        p = self.outc.weight
        if x.device != p.device:
            raise ValueError(f"x is on {x.device} but the model's parameters are on {p.device}; move one of them")
        if x.dtype != p.dtype and not (x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"x has dtype {x.dtype} but the model's parameters are {p.dtype}; cast x or the model "
                            f"(or run under torch.autocast)")
        if isinstance(t, numbers.Real) and not isinstance(t, bool):
            # filled on the device: no host-to-device copy (CUDA-graph safe)
            return torch.full((b,), t, device=x.device,
                              dtype=torch.int64 if isinstance(t, numbers.Integral) else torch.float32)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t must be a tensor of {b} timesteps or one number, got {type(t).__name__}")
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"t must hold integer or float timesteps, got dtype {t.dtype}")
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] not in (1, b)):
            raise ValueError(f"t must have shape ({b},) to match x's batch, or hold one timestep; got shape {tuple(t.shape)}")
        return t.reshape(-1).to(x.device).expand(b)

    def _time_embeddings(self, t):
        """((d1, d2, d3), (u1, u2, u3)): every Down and Up block's projected embedding, in one op that reads
        the six Linear layers' parameters where they are."""
        downs, ups = (self.down1, self.down2, self.down3), (self.up1, self.up2, self.up3)
        e_down, e_up = ops.time_embedding(
            t, self.time_dim,
            [m.emb_layer[1].weight for m in downs], [m.emb_layer[1].bias for m in downs],
            [m.emb_layer[1].weight for m in ups], [m.emb_layer[1].bias for m in ups],
        )
        return tuple(e_down), tuple(e_up)

    def forward(self, x, t):
        t = self._check_inputs(x, t)
        out_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() else torch.contiguous_format
        (d1, d2, d3), (u1, u2, u3) = self._time_embeddings(t)
        # Between blocks the activations are Lazy: a conv output whose consumer applies its GroupNorm + ReLU
        # (+ the block's time embedding) as it reads it. The first conv reads x through its strides.
        x1 = self.inc.lazy(x)
        x1, h = ops.gn_relu_maxpool(x1.y, x1.partials, x1.weight, x1.bias, x1.eps)  # the skip, and its pool
        x2 = self.sa1(self.down1.lazy(h, d1, pooled=True))
        x3 = self.sa2(self.down2.lazy(x2, d2))
        x4 = self.sa3(self.down3.lazy(x3, d3))
        b = self.bot3.lazy(self.bot2.lazy(self.bot1.lazy(x4)))
        h = self.sa4(self.up1.lazy(b, x3, u1))
        h = self.sa5(self.up2.lazy(h, x2, u2))
        h = self.sa6(self.up3.lazy(h, x1, u3))
        return self.outc(h).contiguous(memory_format=out_format)
