"""float32 dots follow PyTorch's TF32 settings (issue 10): convolutions follow the cuDNN convolution
setting (``torch.backends.cudnn.allow_tf32`` / ``torch.backends.cudnn.conv.fp32_precision``, TF32 by
default), matmuls (the token GEMMs, their LayerNorm backward, attention, the time embedding) follow
``torch.set_float32_matmul_precision`` / ``torch.backends.cuda.matmul.fp32_precision`` ("highest", the
default: exact). The interpreter computes every dot in float32 whatever the flag, so these tests record
the ``IEEE`` constexpr each launcher passes (dry launches: nothing runs; no GPU or interpreter needed)."""
import pytest
import torch

from helpers import launches

pytest.importorskip("triton")

CONV = {"_conv3x3_kernel"}
MATMUL = {"_linear_kernel", "_ln_linear_bwd_kernel", "_attn_fwd", "_attn_bwd", "_attn_bwd_dq",
          "_temb_fwd_kernel", "_temb_bwd_kernel"}


def _kernels():
    from fast_unet import backends

    if backends.load_error("triton"):
        pytest.skip(backends.load_error("triton"))
    return backends.kernel_module


def _launch_all(dtype):
    """One call of every launcher with a dot, float32 or half inputs on the CPU, recorded dry."""
    k = _kernels()
    conv, linear, lnb, attn, temb = (k(n) for n in ("conv", "linear", "ln_backward", "attention", "time_embedding"))
    x = torch.randn(2, 16, 8, 8, dtype=dtype).contiguous(memory_format=torch.channels_last)
    tok = torch.randn(2, 9, 32, dtype=dtype)
    w32, b32 = torch.randn(48, 32, dtype=dtype), torch.randn(48, dtype=dtype)
    ln_w, ln_b = torch.ones(32, dtype=dtype), torch.zeros(32, dtype=dtype)
    qkv = torch.randn(2, 37, 3, 2, 16, dtype=dtype)
    t = torch.tensor([3, 500])
    with launches(dry=True) as rec:
        conv.conv3x3_stats(x, torch.randn(32, 16, 3, 3, dtype=dtype), torch.randn(32, dtype=dtype))
        linear.ln_linear(tok, ln_w, ln_b, 1e-5, w32, b32)
        linear.linear_residual(tok, torch.randn(32, 32, dtype=dtype), ln_b, tok)
        lnb.ln_linear_bwd(torch.randn(18, 48, dtype=dtype), tok.reshape(18, 32), ln_w, ln_b, 1e-5, w32, b32, True)
        o, lse = attn.attention_fwd(qkv)
        attn.attention_bwd(torch.randn_like(o), qkv, o, lse)
        attn.attention_bwd(torch.randn_like(o), qkv, o, lse, deterministic=True)
        temb.time_embedding_fwd(t, 32, [w32], [b32], [w32], [b32])
        temb.time_embedding_bwd([torch.randn(2, 48)], [torch.randn(2, 48)], t, 32, [w32], [b32], [w32], [b32])
    ieee = {}
    for r in rec:
        if "IEEE" in r["kwargs"]:
            ieee.setdefault(r["name"], set()).add(r["kwargs"]["IEEE"])
    assert set(ieee) == CONV | MATMUL, sorted(ieee)
    return {name: flags.pop() for name, flags in ieee.items() if len(flags) == 1}


@pytest.mark.parametrize("conv_tf32,matmul_precision", [(False, "highest"), (True, "highest"), (False, "high"),
                                                         (True, "medium")])
def test_float32_dots_follow_the_tf32_settings_legacy_api(conv_tf32, matmul_precision):
    torch.backends.cudnn.allow_tf32 = conv_tf32  # restored by tests/conftest.py's _exact_float32
    torch.set_float32_matmul_precision(matmul_precision)
    ieee = _launch_all(torch.float32)
    matmul_tf32 = matmul_precision != "highest"
    assert {n: ieee[n] for n in CONV} == {n: not conv_tf32 for n in CONV}
    assert {n: ieee[n] for n in MATMUL} == {n: not matmul_tf32 for n in MATMUL}


@pytest.mark.skipif(not hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"),
                    reason="this torch has no fp32_precision API")
@pytest.mark.parametrize("conv,matmul", [("tf32", "ieee"), ("ieee", "tf32")])
def test_float32_dots_follow_the_tf32_settings_new_api(conv, matmul):
    """torch >= 2.9's ``fp32_precision`` settings. Once they are used, reading the legacy flags raises, so
    they are set and restored here through the new API alone."""
    saved = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    try:
        torch.backends.cudnn.conv.fp32_precision = conv
        torch.backends.cuda.matmul.fp32_precision = matmul
        ieee = _launch_all(torch.float32)
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved
    assert all(ieee[n] == (conv == "ieee") for n in CONV), ieee
    assert all(ieee[n] == (matmul == "ieee") for n in MATMUL), ieee


def test_defaults_are_pytorchs(monkeypatch):
    """With PyTorch's defaults (outside the suite's exact-float32 pin): TF32 convolutions, exact matmuls."""
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default; restored by the autouse fixture
    torch.set_float32_matmul_precision("highest")
    ieee = _launch_all(torch.float32)
    assert all(not ieee[n] for n in CONV) and all(ieee[n] for n in MATMUL), ieee


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_never_takes_the_ieee_path(dtype):
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    assert not any(_launch_all(dtype).values())
