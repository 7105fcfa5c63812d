"""``python -m bench.ops``: every dispatched op of fast_unet on each backend that can run it, against its
eager twin, over a range of sizes: achieved GB/s and TFLOP/s and the fraction of the device's measured
peak, printed as a table and plotted (in the style of Triton's ``perf_report`` tutorials).

Run: ``python -m bench.ops`` (CPU: B=1 at 16, 32, 64; GPU: B=64 at 16, 32, 64, 128, bfloat16), or e.g.
``python -m bench.ops --batch 4 --sizes 32,64 --directions fwd``. ``--dry``: run each op's code paths once on every
backend, no timing (how it is checked without a GPU, under ``TRITON_INTERPRET=1``).

The cases are the model's own: one forward of ``fast_unet.UNet`` at each size records every top-level
call of ``fast_unet.dispatch.call`` (op and arguments; an op's calls inside another op's eager twin count
only when it is called nowhere else), so every op the model dispatches is covered at the shapes it really runs, and a new op
needs no change here. For each op and size, all its calls of one forward are timed together, on:
- ``eager``: its eager twin with ``FAST_UNET_BACKEND=eager`` (the PyTorch composition the fused op
  replaces: for the conv, GroupNorm + ReLU, then cat / max-pool, then the convolution);
- ``ext``: the C++/CUDA extension (``FAST_UNET_BACKEND=ext``), where it has the op for these inputs;
- ``triton``: the Triton kernels (``FAST_UNET_BACKEND=triton``): on a GPU only. On a CPU Triton runs
  only under its interpreter, whose times mean nothing.
A backend whose reasons (``fast_unet.dispatch.reasons``) refuse an input shows why instead of a time.
Directions: ``fwd`` (no grad) and ``fwd+bwd`` (forward, then backward of ones through every output).
Times: interleaved rounds, median (CPU: perf_counter; CUDA: CUDA events around each call).

Work: bytes are compulsory traffic: forward, every distinct input tensor read once and every output
written once; forward+backward, 3 x inputs + 2 x outputs (forward; the output gradient read, the inputs
read again and their gradients written). FLOPs: torch.utils.flop_counter on the eager twin (convolutions,
matmuls), attention from its shape (4 N^2 d per head forward, 8 N^2 d backward: the gradient's four GEMMs,
recomputation not counted). Peak: the device's best measured copy bandwidth (bytes read + written) and
best measured matmul rate in the dtype; "of roofline" is the time at those ceilings (the larger of bytes /
bandwidth and FLOPs / matmul rate) over the measured time.
"""
import argparse
import datetime
import json
import os
import statistics
import sys

import torch

from .core import backend_env, write_json


# The fused ops on their eager twins (as bench.kernels' fast_unet+unfused): where the unfused ops run.
UNFUSED_OPS = "conv3x3=eager,gn_relu_maxpool=eager,upsample2x=eager,gn_ln_linear=eager,mlp_residual=eager"


def capture(batch, size, dtype, device):
    """[(op, args)]: the dispatched calls of one forward of fast_unet.UNet at (batch, size), each op's at the
    outermost level it occurs at (an op that only runs inside another's eager twin, as group_norm_relu
    inside the conv's on a CPU, is taken from there); an op the forward never calls (group_norm_relu when
    the fused ops run on Triton) from a second forward with the fused ops on their eager twins."""
    from fast_unet import UNet, dispatch

    from . import core

    torch.manual_seed(0)
    model = UNet().to(device=device, dtype=dtype).train(True)
    x, t, _ = core.make_inputs(batch, size, size, dtype, device)
    calls, depth = [], [0]
    original = dispatch.call

    def call(op, *args):
        calls.append((depth[0], op, args))
        depth[0] += 1
        try:
            return original(op, *args)
        finally:
            depth[0] -= 1

    dispatch.call = call
    try:
        with torch.no_grad():
            model(x, t)
            if {op for _, op, _ in calls} != set(dispatch.OPS):
                # an op the fused path never calls (group_norm_relu under Triton): from the unfused forward
                seen = {op for _, op, _ in calls}
                n = len(calls)
                with backend_env(f"{os.environ.get('FAST_UNET_BACKEND', 'auto').split(',')[0]},{UNFUSED_OPS}"):
                    model(x, t)
                calls[n:] = [c for c in calls[n:] if c[1] not in seen]
    finally:
        dispatch.call = original
    top = {}
    for d, op, _ in calls:
        top[op] = min(d, top.get(op, d))
    return [(op, args) for d, op, args in calls if d == top[op]]


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _unique_bytes(ts):
    seen, n = set(), 0
    for t in ts:
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            n += t.numel() * t.element_size()
    return n


def _leaves(args):
    return tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def _variants(calls):
    """One call per code path: the first call of each pattern of None arguments and non-tensor values
    (the conv plain, normalising on load, pooling on load, reading a concatenation...). ``--dry`` runs
    these, not every shape."""
    out = {}
    for args in calls:
        key = tuple("T" if isinstance(a, torch.Tensor) else repr(a) for a in args)
        out.setdefault(key, args)
    return list(out.values())


def runner(op, backend, calls, direction):
    """A closure running every call of ``op`` on ``backend`` once (the op's impl called directly, its inner
    dispatched pieces under FAST_UNET_BACKEND=backend)."""
    from fast_unet import dispatch

    fn = dispatch.implementations(op)[backend]

    def fwd():
        with backend_env(backend), torch.no_grad():
            for args in calls:
                fn(*args)

    def fwd_bwd():
        with backend_env(backend):
            for args in calls:
                outs = [o for o in _tensors(fn(*_leaves(args))) if o.requires_grad]
                torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    return fwd if direction == "fwd" else fwd_bwd


def work(op, calls, direction):
    """(bytes, flops) of every call of ``op`` once, in ``direction`` (see the module's docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    nbytes, flops = 0, 0
    for args in calls:
        with backend_env("eager"), torch.no_grad():
            from fast_unet import dispatch

            out = dispatch.implementations(op)["eager"](*args)
        i, o = _unique_bytes(_tensors(args)), _unique_bytes(_tensors(out))
        nbytes += i + o if direction == "fwd" else 3 * i + 2 * o
        if op == "attention":
            b, n, _, h, d = args[0].shape
            flops += (4 if direction == "fwd" else 12) * b * h * n * n * d
        else:
            with FlopCounterMode(display=False) as counter:
                runner(op, "eager", [args], direction)()
            flops += counter.get_total_flops()
    return nbytes, flops


def run(sizes, batch, dtype_name, device, directions, backends, repeats, warmup, dry=False, say=lambda m: None):
    from fast_unet import dispatch

    from . import core

    dtype = core.DTYPES[dtype_name]
    dev_type = torch.device(device).type
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": core.device_name(device), "torch": torch.__version__, "dtype": dtype_name, "batch": batch,
        "directions": directions, "backends": [], "rows": [], "repeats": repeats, "dry": dry,
        "what": f"all calls of one forward at B={batch}, {dtype_name}",
    }
    if dry:
        result["peak_gbs"] = result["peak_tflops"] = None
    else:
        say("measuring the device's peaks (best of 5 copies, best of 5 matmuls)")
        result["peak_gbs"] = core.copy_bandwidth(device) / 1e9
        result["peak_tflops"] = core.matmul_rate(dtype, device) / 1e12
    notes = []
    for b in backends:
        why = dispatch.backend_status().get(b)
        if b == "triton" and dev_type == "cpu" and not dry:
            why = ("its kernels need a GPU; on a CPU they run only under TRITON_INTERPRET=1 (for tests), "
                   "whose times mean nothing")
        if why and b != "eager":
            notes.append(f"{b}: not timed ({why})")
            continue
        result["backends"].append(b)
    result["notes"] = list(dict.fromkeys(notes))
    seen_ops = set()
    for size in sizes:
        say(f"capturing the ops of one forward at B={batch}, {size}x{size}")
        calls = capture(batch, size, dtype, device)
        by_op = {}
        for op, args in calls:
            by_op.setdefault(op, []).append(args)
        for op in dispatch.OPS:
            if op not in by_op:
                continue
            seen_ops.add(op)
            cs = by_op[op]
            for d in directions:
                row = {"op": op, "x": size, "x_name": f"model size (H = W), B={batch}", "direction": d,
                       "calls": len(cs), "results": {}}
                fns = {}
                for b in result["backends"]:
                    if dispatch.unavailable(op, b):
                        continue  # no implementation of this op: listed in the notes
                    why = [r for args in cs for r in dispatch.reasons(op, b, *args)]
                    if why:
                        row["results"].setdefault(b, {})[d] = {"unavailable": why[0]}
                        continue
                    fns[b] = runner(op, b, cs, d)
                if dry:
                    fns = {b: runner(op, b, _variants(cs), d) for b in fns}
                    for b, fn in fns.items():
                        fn()
                        row["results"].setdefault(b, {})[d] = {"ran": True}
                    result["rows"].append(row)
                    continue
                nbytes, flops = work(op, cs, d)
                row.update(bytes=nbytes, flops=flops)
                intensity = flops / nbytes if nbytes else 0
                balance = result["peak_tflops"] * 1e12 / (result["peak_gbs"] * 1e9)
                row["metric"] = "tflops" if intensity > balance else "gbs"
                say(f"{op} {size}x{size} {d}: timing {', '.join(fns)}")
                times = core.time_interleaved(fns, device, warmup, repeats)
                floor = max(nbytes / (result["peak_gbs"] * 1e9), flops / (result["peak_tflops"] * 1e12))
                for b, ts in times.items():
                    med = statistics.median(ts)
                    row["results"].setdefault(b, {})[d] = {
                        "ms": med * 1e3, "gbs": nbytes / med / 1e9, "tflops": flops / med / 1e12,
                        "of_roofline": floor / med}
                eager = row["results"].get("eager", {}).get(d, {}).get("ms")
                for b in times:
                    if eager:
                        row["results"][b][d]["vs_eager"] = eager / row["results"][b][d]["ms"]
                result["rows"].append(row)
    for b in result["backends"]:
        if b != "eager":
            has = [op for op in dispatch.OPS if not dispatch.unavailable(op, b)]
            result["notes"].append(f"{b} implements {', '.join(has) or 'no op'}; '-': no implementation")
    missing = [op for op in dispatch.OPS if op not in seen_ops]
    if missing:
        result["notes"].append(f"not called in a forward at these sizes: {', '.join(missing)}")
    # the plot's metric of an op: the one of its largest size (rows of one op share a panel)
    for op in seen_ops:
        rs = [r for r in result["rows"] if r["op"] == op and "metric" in r]
        if rs:
            m = max(rs, key=lambda r: r["x"])["metric"]
            for r in rs:
                r["metric"] = m
    return result


def table(result):
    head = (f"Per-op benchmark: {result['device']}, torch {result['torch']}, {result['date']}; {result['what']}; "
            f"medians of {result['repeats']} interleaved rounds")
    if result["peak_gbs"]:
        head += (f"; peaks (best measured): copy {result['peak_gbs']:.1f} GB/s, {result['dtype']} matmul "
                 f"{result['peak_tflops'] * 1e3:.0f} GFLOP/s")
    lines = [head, ""]
    cols = [b for b in result["backends"]]
    lines.append("| op | size | dir | calls | MB | GFLOP | " + " | ".join(
        f"{b} ms | {b} GB/s | {b} GFLOP/s | {b} of roofline" + ("" if b == "eager" else f" | {b} vs eager")
        for b in cols) + " |")
    ncol = 6 + sum(4 if b == "eager" else 5 for b in cols)
    lines.append("|---|---:|---|" + "---:|" * (ncol - 3))
    for r in result["rows"]:
        cells = []
        for b in cols:
            c = r["results"].get(b, {}).get(r["direction"], {})
            n = 4 if b == "eager" else 5
            if "ms" in c:
                cells += [f"{c['ms']:.3f}", f"{c['gbs']:.1f}", f"{c['tflops'] * 1e3:.1f}", f"{c['of_roofline'] * 100:.0f}%"]
                if b != "eager":
                    cells.append(f"{c['vs_eager']:.2f}x" if "vs_eager" in c else "-")
            elif "unavailable" in c:
                cells += [f"n/a: {c['unavailable'][:60]}"] + [""] * (n - 1)
            else:
                cells += ["ran" if c.get("ran") else "-"] + ["-"] * (n - 1)
        mb = f"{r['bytes'] / 1e6:.1f}" if "bytes" in r else "-"
        gf = f"{r['flops'] / 1e9:.3f}" if "flops" in r else "-"
        lines.append(f"| {r['op']} | {r['x']} | {r['direction']} | {r['calls']} | {mb} | {gf} | " + " | ".join(cells) + " |")
    for n in result["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch", type=int, default=None, help="default 1 on a CPU, 64 on a GPU")
    p.add_argument("--sizes", default=None, help="model sizes (square), default 16,32,64 on a CPU, 16,32,64,128 on a GPU")
    p.add_argument("--dtype", default=None, help="default float32 on a CPU, bfloat16 on a GPU")
    p.add_argument("--directions", default="fwd,fwd+bwd")
    p.add_argument("--backends", default="eager,ext,triton")
    p.add_argument("--repeats", type=int, default=None, help="default 5 on a CPU, 20 on a GPU")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dry", action="store_true", help="run each op's code paths once on every backend, no timing")
    p.add_argument("--json", default=os.path.join("bench_results", "ops.json"), help="'' for none")
    p.add_argument("--out", default=None, help="also one JSON object per row, one per line (JSONL)")
    p.add_argument("--plot", default=os.path.join("bench_results", "ops.png"), help="'' for none")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    sizes = [int(s) for s in (args.sizes or ("16,32,64,128" if cuda else "16,32,64")).split(",") if s]
    batch = args.batch or (64 if cuda else 1)
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    repeats = args.repeats or (20 if cuda else 5)
    say = (lambda m: None) if args.quiet else (lambda m: print(f"[bench.ops] {m}", file=sys.stderr, flush=True))
    result = run(sizes, batch, dtype, device, [d for d in args.directions.split(",") if d],
                 [b for b in args.backends.split(",") if b], repeats, args.warmup, args.dry, say)
    text = table(result)
    print(text)
    if args.plot and not args.dry:
        from . import plots

        result["plot"] = plots.ops_plot(result, args.plot)
        print(f"wrote {result['plot']}")
    if args.out:
        with open(args.out, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in result["rows"]))
    if args.json:
        write_json(args.json, {**result, "table": text})
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
