"""Each block of the drop-in against the reference block with the same weights (float32)."""
import pytest
import torch

import fast_unet.model as fm
import fast_unet.reference as rm
from fast_unet import ops
from fast_unet.reference import AdaptedSelfAttention

from helpers import assert_close


def _pair(fast_cls, ref_cls, *args):
    ref = ref_cls(*args)
    fast = fast_cls(*args)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return fast, ref


@pytest.mark.parametrize("in_c,out_c,hw,batch", [(3, 64, (16, 16), 1), (64, 128, (8, 24), 3), (512, 256, (8, 8), 2)])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_double_conv(in_c, out_c, hw, batch, channels_last):
    fast, ref = _pair(fm.DoubleConv, rm.DoubleConv, in_c, out_c)
    x = torch.randn(batch, in_c, *hw)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_close(fast(x), ref(x), atol=1e-5, rtol=1e-4, what="DoubleConv")


@pytest.mark.parametrize("in_c,out_c,batch", [(64, 128, 1), (128, 256, 3)])
def test_down(in_c, out_c, batch):
    fast, ref = _pair(fm.Down, rm.Down, in_c, out_c)
    x, t = torch.randn(batch, in_c, 16, 24), torch.randn(batch, 128)
    with torch.no_grad():
        assert_close(fast(x, t), ref(x, t), atol=1e-5, rtol=1e-4, what="Down")


@pytest.mark.parametrize("in_c,out_c,batch", [(512, 128, 1), (128, 64, 3)])
def test_up(in_c, out_c, batch):
    fast, ref = _pair(fm.Up, rm.Up, in_c, out_c)
    x, skip, t = torch.randn(batch, in_c // 2, 8, 4), torch.randn(batch, in_c // 2, 16, 8), torch.randn(batch, 128)
    with torch.no_grad():
        assert_close(fast(x, skip, t), ref(x, skip, t), atol=1e-5, rtol=1e-4, what="Up")


@pytest.mark.parametrize("channels,hw,batch", [(64, (16, 16), 2), (128, (8, 8), 3), (256, (4, 4), 1), (64, (8, 24), 2)])
def test_self_attention(channels, hw, batch):
    ref = rm.SelfAttention(channels, hw[0])
    if hw[0] != hw[1]:
        ref.__class__ = AdaptedSelfAttention
    fast = fm.SelfAttention(channels, hw[0])
    fast.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(batch, channels, *hw, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out, expected = fast(x), ref(x2)
    assert_close(out, expected, atol=1e-5, rtol=1e-4, what="SelfAttention")
    g = torch.randn_like(out)
    out.backward(g)
    expected.backward(g)
    assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-4, what="SelfAttention grad")


def test_pos_encoding_matches_reference():
    t = torch.tensor([0, 1, 10, 999]).unsqueeze(-1).float()
    ref = rm.UNet(device="cpu").pos_encoding(t, 128)
    assert_close(fm.UNet().pos_encoding(t, 128), ref, atol=0, rtol=0, what="pos_encoding")
    # The document's own example: pos_encoding(10, 16)
    doc = torch.tensor([-0.5440, -0.0207, 0.8415, 0.3110, 0.0998, 0.0316, 0.0100, 0.0032,
                        -0.8391, -0.9998, 0.5403, 0.9504, 0.9950, 0.9995, 0.9999, 1.0000])
    assert_close(fm.UNet().pos_encoding(torch.tensor([[10.0]]), 16)[0], doc, atol=1e-4, rtol=0, what="document")


def test_time_embedding_op_matches_every_blocks_emb_layer():
    ref = rm.UNet(device="cpu")
    t = torch.tensor([3, 500, 999])
    enc = ref.pos_encoding(t.unsqueeze(-1).float(), 128)
    downs, ups = (ref.down1, ref.down2, ref.down3), (ref.up1, ref.up2, ref.up3)
    d, u = ops.time_embedding(
        t, 128,
        torch.cat([m.emb_layer[1].weight for m in downs]), torch.cat([m.emb_layer[1].bias for m in downs]),
        torch.cat([m.emb_layer[1].weight for m in ups]), torch.cat([m.emb_layer[1].bias for m in ups]))
    assert_close(d, torch.cat([m.emb_layer(enc) for m in downs], 1), atol=1e-5, rtol=1e-5, what="down emb")
    assert_close(u, torch.cat([m.emb_layer(enc) for m in ups], 1), atol=1e-5, rtol=1e-5, what="up emb")
