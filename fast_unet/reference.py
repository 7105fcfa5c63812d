"""The reference UNet: the seed's model exactly as ``docs/spec.md`` (the seed's SPEC.md) states it.

This module is the oracle of every parity test. Do not optimise it, do not "fix" it (Down's
embedding uses ReLU and Up's uses SiLU on purpose; attention materialises its weights because
``nn.MultiheadAttention`` is called with its default ``need_weights=True``).

The one fix the specification names: ``pos_encoding`` keeps ``t`` as the (B, 1) float tensor and builds
``inv_freq`` on ``t``'s device (the document's ``torch.tensor([t])`` fails for any batch > 1).
Everything else, including the hard-coded ``size`` of ``SelfAttention``, is as written.
"""
import torch
import torch.nn as nn


class DoubleConv(nn.Module):
    def __init__(self, in_c, out_c):
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel_size=3, padding=1),
            nn.GroupNorm(1, out_c),
            nn.ReLU(),
        )
        self.conv2 = nn.Sequential(
            nn.Conv2d(out_c, out_c, kernel_size=3, padding=1),
            nn.GroupNorm(1, out_c),
            nn.ReLU(),
        )

    def forward(self, x):
        x = self.conv1(x)
        x = self.conv2(x)
        return x


class Down(nn.Module):
    def __init__(self, in_c, out_c, emb_dim=128):
        super().__init__()
        self.down = nn.Sequential(
            nn.MaxPool2d(2),
            DoubleConv(in_c, out_c),
        )
        self.emb_layer = nn.Sequential(
            nn.ReLU(),
            nn.Linear(emb_dim, out_c),
        )

    def forward(self, x, t):
        x = self.down(x)
        t_emb = self.emb_layer(t)[:, :, None, None].repeat(1, 1, x.shape[-2], x.shape[-1])
        return x + t_emb


class Up(nn.Module):
    def __init__(self, in_c, out_c, emb_dim=128):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = DoubleConv(in_c, out_c)
        self.emb_layer = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_dim, out_c),
        )

    def forward(self, x, skip_x, t):
        x = self.up(x)
        x = torch.cat([skip_x, x], dim=1)
        x = self.conv(x)
        emb = self.emb_layer(t)[:, :, None, None].repeat(1, 1, x.shape[-2], x.shape[-1])
        return x + emb


class SelfAttention(nn.Module):
    def __init__(self, channels, size):
        super(SelfAttention, self).__init__()
        self.channels = channels
        self.size = size
        self.mha = nn.MultiheadAttention(channels, 4, batch_first=True)
        self.ln = nn.LayerNorm([channels])
        self.ff_self = nn.Sequential(
            nn.LayerNorm([channels]),
            nn.Linear(channels, channels),
            nn.GELU(),
            nn.Linear(channels, channels),
        )

    def forward(self, x):
        x = x.view(-1, self.channels, self.size * self.size).swapaxes(1, 2)
        x_ln = self.ln(x)
        attention_value, _ = self.mha(x_ln, x_ln, x_ln)
        attention_value = attention_value + x
        attention_value = self.ff_self(attention_value) + attention_value
        return attention_value.swapaxes(2, 1).view(-1, self.channels, self.size, self.size)


class UNet(nn.Module):
    def __init__(self, c_in=3, c_out=3, time_dim=128, device="cuda"):
        super().__init__()
        self.device = device
        self.time_dim = time_dim
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

    def pos_encoding(self, t, channels):
        # The one fix (SPEC.md): keep t as the (B, 1) float tensor; inv_freq on t's device.
        inv_freq = 1.0 / (
            10000
            ** (torch.arange(0, channels, 2, device=t.device).float() / channels)
        )
        pos_enc_a = torch.sin(t.repeat(1, channels // 2) * inv_freq)
        pos_enc_b = torch.cos(t.repeat(1, channels // 2) * inv_freq)
        pos_enc = torch.cat([pos_enc_a, pos_enc_b], dim=-1)
        return pos_enc

    def forward(self, x, t):
        t = t.unsqueeze(-1).type(torch.float)
        t = self.pos_encoding(t, self.time_dim)

        x1 = self.inc(x)

        x2 = self.down1(x1, t)
        x2 = self.sa1(x2)
        x3 = self.down2(x2, t)
        x3 = self.sa2(x3)
        x4 = self.down3(x3, t)
        x4 = self.sa3(x4)

        x4 = self.bot1(x4)
        x4 = self.bot2(x4)
        x4 = self.bot3(x4)

        x = self.up1(x4, x3, t)
        x = self.sa4(x)
        x = self.up2(x, x2, t)
        x = self.sa5(x)
        x = self.up3(x, x1, t)
        x = self.sa6(x)

        output = self.outc(x)
        return output


class AdaptedSelfAttention(SelfAttention):
    """The reference ``SelfAttention`` with two knobs the benchmark and tests need, math unchanged.

    - it reads H and W from its input instead of the hard-coded ``size`` (non-square inputs);
    - ``need_weights``: the reference calls ``mha`` with PyTorch's default ``True`` (materialising the
      (B, heads, N, N) weights); ``False`` is the *fair eager baseline*, where PyTorch runs SDPA.
    """

    need_weights = True

    def forward(self, x):
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w).swapaxes(1, 2)
        x_ln = self.ln(x)
        attention_value, _ = self.mha(x_ln, x_ln, x_ln, need_weights=self.need_weights)
        attention_value = attention_value + x
        attention_value = self.ff_self(attention_value) + attention_value
        return attention_value.swapaxes(2, 1).reshape(b, c, h, w)


_ATTENTION = ("sa1", "sa2", "sa3", "sa4", "sa5", "sa6")


def make_reference(height=64, width=None, need_weights=True, **kwargs):
    """A reference UNet able to run a ``height`` x ``width`` input.

    Square inputs with ``need_weights=True`` get the untouched reference with each ``size`` set to what
    that resolution needs. Non-square inputs, or ``need_weights=False`` (the fair baseline), swap the
    attention blocks' class for ``AdaptedSelfAttention``: same parameters, same math.
    """
    width = height if width is None else width
    model = UNet(**kwargs)
    side = {"sa1": 2, "sa2": 4, "sa3": 8, "sa4": 4, "sa5": 2, "sa6": 1}
    for name in _ATTENTION:
        block = getattr(model, name)
        if height == width:
            block.size = height // side[name]
        if height != width or not need_weights:
            block.__class__ = AdaptedSelfAttention
            block.need_weights = need_weights
    return model


def cast_reference(model, dtype):
    """Cast a reference UNet to ``dtype`` so it can run there (float64 for the oracle, bf16/fp16 for
    PyTorch's own low-precision error).

    The reference builds its time encoding in float32 whatever the parameters' dtype, so its
    ``emb_layer`` Linears would reject it; a forward pre-hook casts their input to the parameters'
    dtype, which is what fast_unet does. Nothing else changes.
    """
    model = model.to(dtype)
    for name in ("down1", "down2", "down3", "up1", "up2", "up3"):
        getattr(model, name).emb_layer.register_forward_pre_hook(
            lambda module, args: tuple(a.to(dtype) for a in args))
    return model
