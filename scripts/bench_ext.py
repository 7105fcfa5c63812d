"""Side-by-side CPU timings of fast_unet (ext backend) against the reference, the fair baseline and
torch.compile(fair baseline), B=4, 64x64, float32, per op and whole model. Not the project benchmark
(``python -m bench``); run: ``PYTHONPATH=. python scripts/bench_ext.py [--reps 7] [--no-compile]``.

Every repetition runs each candidate once, in turn (interleaved), so load from other processes hits all
of them alike; the table shows medians. "forward" is inference (no_grad); "train step" is forward,
MSE loss, backward. Model FLOPs are counted with FlopCounterMode on the reference's forward (its
attention runs as bmm, so QK^T and PV are counted; the CPU SDPA kernel of the baseline is not counted).
Also times sa6's attention alone (B=4, N=4096, 4 heads, d=16): ext kernel vs PyTorch's SDPA.
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("FAST_UNET_BACKEND", "ext")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import fast_unet  # noqa: E402
from fast_unet.reference import make_reference  # noqa: E402


def matmul_rate(n=2048, reps=10):
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n**3 / best


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    b, s = args.batch, args.size
    ref = make_reference(s)
    base = make_reference(s, need_weights=False)
    base.load_state_dict(ref.state_dict())
    fast = fast_unet.UNet()
    fast.load_state_dict(ref.state_dict())
    x, t, target = torch.randn(b, 3, s, s), torch.randint(1, 1000, (b,)), torch.randn(b, 3, s, s)

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        ref(x, t)
    flops = fc.get_total_flops()
    import importlib

    from fast_unet import backends, eager

    ext_attention = importlib.import_module("fast_unet.ops.attention").ext_attention

    qkv_buf = torch.randn(b, 4096, 3 * 64)
    qkv = qkv_buf.view(b, 4096, 3, 4, 16)
    gout = torch.randn(b, 4096, 64)

    def attn_step(fn):
        def run():
            q = qkv_buf.detach().requires_grad_()
            fn(q.view(b, 4096, 3, 4, 16)).backward(gout)
        return run

    def fwd(m):
        def run():
            with torch.no_grad():
                m(x, t)
        return run

    def step(m):
        def run():
            m.zero_grad(set_to_none=True)
            F.mse_loss(m(x, t), target).backward()
        return run

    cands = {
        "fast_unet ext forward": fwd(fast), "reference forward": fwd(ref), "fair baseline forward": fwd(base),
        "fast_unet ext train step": step(fast), "reference train step": step(ref), "fair baseline train step": step(base),
    }
    cands["sa6 attention ext fwd"] = lambda: ext_attention(qkv)
    cands["sa6 attention SDPA fwd"] = lambda: eager.attention(qkv)
    cands["sa6 attention ext fwd+bwd"] = attn_step(ext_attention)
    cands["sa6 attention SDPA fwd+bwd"] = attn_step(eager.attention)
    if not args.no_compile:
        comp = torch.compile(base)
        t0 = time.perf_counter()
        fwd(comp)()
        print(f"torch.compile warm-up {time.perf_counter() - t0:.0f} s")
        cands["compile(fair baseline) forward"] = fwd(comp)
    for fn in cands.values():  # warm-up
        fn()
    times = {k: [] for k in cands}
    rates = []
    for _ in range(args.reps):
        rates.append(matmul_rate(reps=3))
        for k, fn in cands.items():
            times[k].append(_timed(fn))
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    peak = statistics.median(rates)
    print(f"fast_unet._C build: {backends.build_info()}")
    print(f"B={b} {s}x{s} float32, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"backend {os.environ['FAST_UNET_BACKEND']}, {args.reps} interleaved reps (median, min)")
    print(f"fp32 matmul rate (2048^3 torch.mm, median of reps): {peak / 1e9:.0f} GFLOP/s; "
          f"model forward FLOPs {flops / 1e9:.2f} GFLOP")
    print(f"| {'what':<32} | {'median ms':>9} | {'min ms':>8} |")
    print(f"|{'-' * 34}|{'-' * 11}|{'-' * 10}|")
    for k, v in med.items():
        print(f"| {k:<32} | {v:9.1f} | {min(times[k]) * 1e3:8.1f} |")
    f, r = med["fast_unet ext forward"], med["reference train step"] / med["fast_unet ext train step"]
    print(f"forward achieved {flops / (f / 1e3) / 1e9:.0f} GFLOP/s = {flops / (f / 1e3) / peak:.0%} of matmul rate (target >= 85%)")
    print(f"train step speed-up vs reference: {r:.2f}x (target >= 3.3x)")
    if "compile(fair baseline) forward" in med:
        c = med["compile(fair baseline) forward"]
        print(f"forward vs torch.compile(fair baseline): {c / f:.2f}x ({'meets' if f <= c else 'misses'} 'at least as fast')")


if __name__ == "__main__":
    main()
