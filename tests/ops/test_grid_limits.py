"""Every launcher's grid stays within CUDA's limits at huge activations (issue 10): axis 0 up to 2^31 - 1,
axes 1 and 2 up to 65535. The launchers run on ``meta`` tensors (nothing is allocated) with the launches
recorded and skipped (``helpers.launches(dry=True)``), so this runs anywhere Triton imports."""
import pytest
import torch

from helpers import launches

pytest.importorskip("triton")

LIMITS = (2**31 - 1, 65535, 65535)
H = W = 4096  # a 4096 x 4096 activation: 16.7 M pixels per channel


def _kernels():
    from fast_unet import backends

    if backends.load_error("triton"):
        pytest.skip(backends.load_error("triton"))
    return backends.kernel_module


def _meta(*shape, cl=False, dtype=torch.bfloat16):
    t = torch.empty(shape, device="meta", dtype=dtype)
    return t.contiguous(memory_format=torch.channels_last) if cl else t


def _calls():
    k = _kernels()
    gn, conv, rs, lin, lnb, attn, temb = (k(n) for n in ("group_norm", "conv", "resample", "linear", "ln_backward",
                                                         "attention", "time_embedding"))
    B, C = 2, 64
    w, b = _meta(C), _meta(C)
    parts = _meta(B, 7, 3, dtype=torch.float32)
    mean, rstd = _meta(B, dtype=torch.float32), _meta(B, dtype=torch.float32)
    out = {}
    for cl in (False, True):
        x = _meta(B, C, H, W, cl=cl)
        lay = "nhwc" if cl else "nchw"
        out[f"group_norm_relu_fwd {lay}"] = lambda x=x: gn.group_norm_relu_fwd(x, w, b, 1e-5, _meta(B, C))
        out[f"group_norm_relu_bwd {lay}"] = lambda x=x: gn.group_norm_relu_bwd(x, x, w, b, mean, rstd)
    xcl = _meta(B, C, H, W, cl=True)
    out["apply_from_partials"] = lambda: gn.apply_from_partials(xcl, parts, 1e-5, w, b, _meta(B, C))
    wc = _meta(C, C, 3, 3).contiguous(memory_format=torch.channels_last)
    out["conv3x3"] = lambda: conv.conv3x3_stats(xcl, wc, b)
    out["conv3x3 norm"] = lambda: conv.conv3x3_stats(xcl, wc, b, norm=(parts, w, b, 1e-5))
    out["conv3x3 pool"] = lambda: conv.conv3x3_stats(xcl, wc, b, pool=True)
    out["conv3x3 concat"] = lambda: conv.conv3x3_stats(_meta(B, C // 2, H, W, cl=True),
                                                       wc, b, x2=_meta(B, C // 2, H, W, cl=True))
    out["gn_relu_maxpool"] = lambda: rs.gn_relu_maxpool(xcl, parts, w, b, 1e-5)
    out["upsample2x"] = lambda: rs.upsample2x(xcl)
    out["upsample2x norm"] = lambda: rs.upsample2x(xcl, norm=(parts, w, b, 1e-5))
    tok = _meta(B, H * W, C)
    wl, bl = _meta(3 * C, C), _meta(3 * C)
    out["linear_residual"] = lambda: lin.linear_residual(tok, _meta(C, C), b, tok)
    out["ln_linear"] = lambda: lin.ln_linear(tok, w, b, 1e-5, wl, bl, True)
    out["gn_ln_linear"] = lambda: lin.gn_ln_linear(xcl, parts, w, b, 1e-5, _meta(B, C), w, b, 1e-5, wl, bl)
    out["ln_linear_bwd"] = lambda: lnb.ln_linear_bwd(_meta(B * H * W, 3 * C), _meta(B * H * W, C), w, b, 1e-5, wl, bl,
                                                     True)
    qkv = _meta(B, H * W // 16, 3, 4, 16)  # 1 M tokens
    out["attention_fwd"] = lambda: attn.attention_fwd(qkv)
    out["attention_bwd"] = lambda: attn.attention_bwd(_meta(B, H * W // 16, 64), qkv, _meta(B, H * W // 16, 64),
                                                      _meta(B, 4, H * W // 16, dtype=torch.float32))
    t = torch.empty(2**21, device="meta", dtype=torch.int64)  # 2 M timesteps
    wt = _meta(1024, 128)
    out["time_embedding_fwd"] = lambda: temb.time_embedding_fwd(t, 128, [wt], [_meta(1024)], [wt], [_meta(1024)])
    out["time_embedding_bwd"] = lambda: temb.time_embedding_bwd([_meta(2**21, 1024)], [_meta(2**21, 1024)], t, 128,
                                                                [wt], [_meta(1024)], [wt], [_meta(1024)])
    return out


CALLS = ["group_norm_relu_fwd nchw", "group_norm_relu_fwd nhwc", "group_norm_relu_bwd nchw",
         "group_norm_relu_bwd nhwc", "apply_from_partials", "conv3x3", "conv3x3 norm", "conv3x3 pool",
         "conv3x3 concat", "gn_relu_maxpool", "upsample2x", "upsample2x norm", "linear_residual", "ln_linear",
         "gn_ln_linear", "ln_linear_bwd", "attention_fwd", "attention_bwd", "time_embedding_fwd",
         "time_embedding_bwd"]


def test_every_launcher_is_listed():
    assert sorted(_calls()) == sorted(CALLS)


@pytest.mark.parametrize("call", CALLS)
def test_launch_grids_stay_within_limits(call):
    with launches(dry=True) as rec:
        _calls()[call]()
    assert rec, f"{call}: no launch recorded"
    for r in rec:
        g = tuple(r["grid"]) + (1,) * (3 - len(r["grid"]))
        assert all(1 <= n <= lim for n, lim in zip(g, LIMITS)), f"{call}: {r['name']} grid {r['grid']}"
