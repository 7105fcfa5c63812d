"""Time each Triton op against its eager twin at the model's B=64, 64x64, bf16 shapes (CUDA only).

    python scripts/bench_kernels.py [--out FILE.json]

Forward and forward+backward, median of triton.testing.do_bench, one JSON object per line (also to FILE).
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
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time")
        return 0
    import triton.testing

    from fast_unet import eager
    from fast_unet import triton_ops as T

    B, dt, dev = args.batch, torch.bfloat16, "cuda"
    cases = []
    for c, hw in ((64, 64), (128, 32), (256, 16), (512, 8)):
        x = torch.randn(B, c, hw, hw, device=dev, dtype=dt).contiguous(memory_format=torch.channels_last)
        w, b = torch.ones(c, device=dev, dtype=dt), torch.zeros(c, device=dev, dtype=dt)
        emb = torch.randn(B, c, device=dev, dtype=dt)
        cases.append((f"group_norm_relu C={c} {hw}x{hw}", (x, w, b, 1e-5, emb), T.group_norm_relu, eager.group_norm_relu))
    for n, d in ((4096, 16), (1024, 16), (1024, 32), (256, 32), (256, 64), (64, 64)):
        qkv = torch.randn(B, n, 3, 4, d, device=dev, dtype=dt)
        cases.append((f"attention N={n} d={d}", (qkv,), T.attention, eager.attention))
    t = torch.randint(0, 1000, (B,), device=dev)
    p = (torch.randn(640, 128, device=dev, dtype=dt), torch.randn(640, device=dev, dtype=dt),
         torch.randn(256, 128, device=dev, dtype=dt), torch.randn(256, device=dev, dtype=dt))
    cases.append(("time_embedding", (t, 128, *p), T.time_embedding, eager.time_embedding))

    rows = []
    for name, inputs, fast, slow in cases:
        row = {"op": name, "batch": B, "dtype": "bfloat16"}
        for label, fn in (("triton", fast), ("eager", slow)):
            row[f"{label}_fwd_ms"] = triton.testing.do_bench(lambda: fn(*inputs))
            leaves = [x.detach().requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                      for x in inputs]

            def fwd_bwd():
                out = fn(*leaves)
                outs = out if isinstance(out, tuple) else (out,)
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

            row[f"{label}_fwd_bwd_ms"] = triton.testing.do_bench(fwd_bwd)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
