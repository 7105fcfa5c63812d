"""Time each Triton op against its eager twin at the model's B=64, 64x64, bf16 shapes (CUDA only).

    python scripts/bench_kernels.py [--out FILE.json] [--batch 64] [--size 64]
    TRITON_INTERPRET=1 python scripts/bench_kernels.py --dry --batch 1 --size 8   # CPU: run each case once

Forward and forward+backward, median of triton.testing.do_bench, one JSON object per line (also to FILE).
Besides the ops, the fused model path's pieces against what they replace: the conv that normalises its
input on load (vs eager GroupNorm + ReLU, then cuDNN's conv), the plain Triton conv (vs cuDNN), the conv
that max-pools on load (vs max_pool2d + cuDNN), and the attention block in five launches (vs the unfused
block: LayerNorm, linears, SDPA, residual adds). ``--dry`` runs every case once, forward and backward,
without timing (how the script is checked without a GPU).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="the model's input resolution (square)")
    parser.add_argument("--dry", action="store_true", help="run each case once, no timing (CPU under TRITON_INTERPRET=1)")
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.dry:
        print("no CUDA device: nothing to time")
        return 0
    import triton.testing

    from fast_unet import eager
    from fast_unet import ops as T

    os.environ["FAST_UNET_BACKEND"] = "triton"  # fast_unet.ops on the Triton kernels; eager.* directly

    B, dt, dev = args.batch, torch.bfloat16, "cuda" if torch.cuda.is_available() else "cpu"
    S = args.size
    cases = _fused_cases(B, S, dt, dev)
    for c, hw in ((64, S), (128, S // 2), (256, S // 4), (512, S // 8)):
        x = torch.randn(B, c, hw, hw, device=dev, dtype=dt).contiguous(memory_format=torch.channels_last)
        w, b = torch.ones(c, device=dev, dtype=dt), torch.zeros(c, device=dev, dtype=dt)
        emb = torch.randn(B, c, device=dev, dtype=dt)
        cases.append((f"group_norm_relu C={c} {hw}x{hw}", (x, w, b, 1e-5, emb), T.group_norm_relu, eager.group_norm_relu))
    for n, d in ((S * S, 16), (S * S // 4, 16), (S * S // 4, 32), (S * S // 16, 32), (S * S // 16, 64),
                 (S * S // 64, 64)):
        qkv = torch.randn(B, n, 3, 4, d, device=dev, dtype=dt)
        cases.append((f"attention N={n} d={d}", (qkv,), T.attention, eager.attention))
    t = torch.randint(0, 1000, (B,), device=dev)
    p = (torch.randn(640, 128, device=dev, dtype=dt), torch.randn(640, device=dev, dtype=dt),
         torch.randn(256, 128, device=dev, dtype=dt), torch.randn(256, device=dev, dtype=dt))
    cases.append(("time_embedding", (t, 128, *p), T.time_embedding, eager.time_embedding))

    bench = (lambda fn: (fn(), None)[1]) if args.dry else triton.testing.do_bench  # dry: run once, no time
    rows = []
    for name, inputs, fast, slow in cases:
        row = {"op": name, "batch": B, "dtype": "bfloat16"}
        for label, fn in (("triton", fast), ("eager", slow)):
            row[f"{label}_fwd_ms"] = bench(lambda: fn(*inputs))
            leaves = [x.detach().requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                      for x in inputs]

            def fwd_bwd():
                out = fn(*leaves)
                outs = out if isinstance(out, tuple) else (out,)
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

            row[f"{label}_fwd_bwd_ms"] = bench(fwd_bwd)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return 0


def _fused_cases(B, S, dt, dev):
    """(name, inputs, fused fn, unfused fn) for the fused model path's pieces at the model's shapes."""
    import torch.nn.functional as F

    from fast_unet import eager, model
    from fast_unet import ops as T

    cl = torch.channels_last
    cases = []
    # (C_in, C_out, H): a DoubleConv's second conv (normalise on load) at every level of the UNet
    for ci, co, hw in ((64, 64, S), (128, 128, S // 2), (256, 256, S // 4), (512, 512, S // 8)):
        y_in, part = T.conv3x3(torch.randn(B, ci, hw, hw, device=dev, dtype=dt).contiguous(memory_format=cl),
                               torch.randn(ci, ci, 3, 3, device=dev, dtype=dt) / (3 * ci ** 0.5),
                               torch.zeros(ci, device=dev, dtype=dt))
        y_in, part = y_in.detach(), part.detach()
        w = (torch.randn(co, ci, 3, 3, device=dev, dtype=dt) / (3 * ci ** 0.5)).contiguous(memory_format=cl)
        b = torch.zeros(co, device=dev, dtype=dt)
        gw, gb = torch.ones(ci, device=dev, dtype=dt), torch.zeros(ci, device=dev, dtype=dt)
        cases.append((f"conv3x3 norm-on-load {ci}->{co} {hw}x{hw}", (y_in, gw, gb, w, b),
                      lambda y, gw, gb, w, b, part=part: T.conv3x3(y, w, b, norm=(part, gw, gb, 1e-5))[0],
                      lambda y, gw, gb, w, b: F.conv2d(eager.group_norm_relu(y, gw, gb, 1e-5), w, b, padding=1)))
        cases.append((f"conv3x3 plain {ci}->{co} {hw}x{hw}", (y_in, w, b),
                      lambda x, w, b: T.conv3x3(x, w, b)[0], lambda x, w, b: F.conv2d(x, w, b, padding=1)))
    for c, hw in ((128, S // 2), (256, S // 4)):  # down2's and down3's first conv: pool on load
        x = torch.randn(B, c, hw, hw, device=dev, dtype=dt).contiguous(memory_format=cl)
        w = (torch.randn(2 * c if c < 256 else c, c, 3, 3, device=dev, dtype=dt) / (3 * c ** 0.5)).contiguous(
            memory_format=cl)
        b = torch.zeros(w.shape[0], device=dev, dtype=dt)
        cases.append((f"conv3x3 pool-on-load {c}->{w.shape[0]} {hw}x{hw}", (x, w, b),
                      lambda x, w, b: T.conv3x3(x, w, b, pool=True)[0],
                      lambda x, w, b: F.conv2d(F.max_pool2d(x, 2), w, b, padding=1)))
    # the attention block (GroupNorm of its input folded in) against the unfused block on its input
    for c, hw in ((128, S // 2), (256, S // 4), (64, S)):
        sa = model.SelfAttention(c).to(device=dev, dtype=dt)
        y, part = T.conv3x3(torch.randn(B, c, hw, hw, device=dev, dtype=dt).contiguous(memory_format=cl),
                            torch.randn(c, c, 3, 3, device=dev, dtype=dt) / (3 * c ** 0.5),
                            torch.zeros(c, device=dev, dtype=dt))
        y, part = y.detach(), part.detach()
        gw, gb = torch.ones(c, device=dev, dtype=dt), torch.zeros(c, device=dev, dtype=dt)
        emb = torch.randn(B, c, device=dev, dtype=dt)

        def unfused(y, gw, gb, emb, sa=sa):
            x = eager.group_norm_relu(y, gw, gb, 1e-5, emb)
            b_, c_, h_, w_ = x.shape
            t = x.permute(0, 2, 3, 1).reshape(b_, h_ * w_, c_)
            a = sa.mha(sa.ln(t), sa.ln(t), sa.ln(t), need_weights=False)[0] + t
            return sa.ff_self(a) + a

        cases.append((f"attention block C={c} {hw}x{hw}", (y, gw, gb, emb),
                      lambda y, gw, gb, emb, sa=sa, part=part: sa(T.Lazy(y, part, gw, gb, 1e-5, emb)),
                      unfused))
    return cases


if __name__ == "__main__":
    sys.exit(main())
