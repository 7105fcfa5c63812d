"""``python -m bench --sweep``: how time and peak memory grow with the resolution and the batch, for the
reference, the fair baseline, (``--compile``) torch.compile of it, and fast_unet.

Run: ``python -m bench --sweep`` (on a CPU: sizes 32, 64, 128 and 48x80 at B=1, and B=1, 4, 16 at 64x64;
on a GPU: sizes 32, 64, 128, 256, 48x80 at B=1 and B=1, 4, 16, 64 at 64x64), or choose:
``python -m bench --sweep --sizes 32,64,128,256 --batches 64`` (the sizes at the first of --batches, the
batches at --sweep-size). Writes JSON (``--json``, default bench_results/sweep.json) and PNG plots
(``--plots DIR``, default bench_results/): time and memory against the token count and against the batch,
log-log, one line per model; on a GPU also the roofline (achieved FLOP/s against FLOPs per byte moved).

Each point (batch, size) is measured as ``python -m bench`` measures its one point: every model's
forward (no grad) and training step (forward, MSE loss, backward), medians of interleaved rounds after a
warm-up, so load from other processes falls on all of them alike; FLOPs counted on the reference. Peak
memory and the limits come first, per cell (model, step):
- CPU: one step in a fresh process (``bench/_memory.py``): the resident-set growth, with the process's
  address space capped at ``--mem-limit-gib`` more (a cell past it is "out of memory") and its wall time
  at ``--cell-limit`` seconds (past it: "time limit"); such a cell is reported and not timed, and the
  sweep goes on. ``compiled`` has no memory figure on a CPU (compiling again in a child would dominate).
- CUDA: in this process, ``max_memory_allocated`` of one step after a warm-up step; an out-of-memory
  error, or that step past ``--cell-limit``, marks the cell.
Fitted exponents: least squares of log(peak memory) and log(time) against log(tokens) over the sizes at
one batch (and against log(batch) over the batches): 2 means quadratic growth, 1 linear; and, since a
constant part (the weights' gradients in a training step, ~90 MB) flattens the log-log slope at small
sizes, the exponent k of the best fit memory = c + a * tokens^k.
"""
import datetime
import math
import os
import statistics
import time

import torch

from . import core

CPU_SIZES, GPU_SIZES = ("32", "64", "128", "48x80"), ("32", "64", "128", "256", "48x80")
CPU_BATCHES, GPU_BATCHES = (1, 4, 16), (1, 4, 16, 64)


def points(sizes, batches, sweep_size):
    """[(batch, (h, w), axes)]: every size at the first batch (axis "size"), every batch at ``sweep_size``
    (axis "batch"); a point on both axes is measured once."""
    out = {}
    for s in sizes:
        out.setdefault((batches[0], core.parse_size(s)), set()).add("size")
    for b in batches:
        out.setdefault((b, core.parse_size(sweep_size)), set()).add("batch")
    return [(b, hw, sorted(ax)) for (b, hw), ax in sorted(out.items(), key=lambda kv: (kv[0][0], kv[0][1][0] * kv[0][1][1]))]


def _cuda_memory(fn, model, limit_s):
    """(peak bytes, None) of one step after a warm-up step (compilation, autotuning, cuDNN's search), or
    (None, why not): out of memory, or the measured step past ``limit_s``."""
    try:
        fn()
        torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        if time.perf_counter() - t0 > limit_s:
            return None, "time limit"
        return torch.cuda.max_memory_allocated() - before, None
    except torch.cuda.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        return None, "out of memory"


def measure_point(names, modes, batch, h, w, dtype_name, device, state, args, mm, say):
    """{model: {mode: cell}} for one point; a cell has median_ms, min_ms, gflops, peak_mib, or error."""
    dtype = core.DTYPES[dtype_name]
    cuda = torch.device(device).type == "cuda"
    cells = {n: {m: {} for m in modes} for n in names}
    flops = dict(zip(("forward", "train"), core.count_flops(h, w, batch)))
    if not cuda and args.memory:
        for n in names:
            for m in modes:
                if n == "compiled":
                    continue
                say(f"B={batch} {h}x{w}: peak memory of {n} {m} (fresh process)")
                peak, err = core.measure_memory(n, m, batch, h, w, dtype_name, device,
                                                limit_bytes=args.mem_limit_gib * 2**30, timeout=args.cell_limit)
                if err:
                    cells[n][m]["error"] = err
                else:
                    cells[n][m]["peak_mib"] = peak / 2**20
    models = {}
    for n in names:
        try:
            models[n] = core.build_model(n, h, w, dtype, device, state)
            models[n].train(True)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # noqa: PERF203
            for m in modes:
                cells[n][m]["error"] = "out of memory" if core._is_oom(e) else f"{type(e).__name__}: {e}"[:200]
    x, t, noise = core.make_inputs(batch, h, w, dtype, device)
    rate = None
    for m in modes:
        fns = {}
        for n, model in models.items():
            if "error" in cells[n][m]:
                continue
            fn = core.forward_fn(model, x, t) if m == "forward" else core.train_fn(model, x, t, noise)
            if cuda and args.memory:
                peak, err = _cuda_memory(fn, model, args.cell_limit)
                if err:
                    cells[n][m]["error"] = err
                    continue
                cells[n][m]["peak_mib"] = peak / 2**20
            fns[n] = fn
        if not fns:
            continue
        say(f"B={batch} {h}x{w}: timing {m} ({', '.join(fns)})")
        try:
            times, r = core.time_interleaved(fns, device, args.warmup, args.repeats, rate=mm)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
            if not core._is_oom(e):
                raise
            for n in fns:
                cells[n][m]["error"] = "out of memory (while timing)"
            continue
        rate = max(rate or 0, r)
        for n, ts in times.items():
            med = statistics.median(ts)
            cells[n][m].update(median_ms=med * 1e3, min_ms=min(ts) * 1e3, gflops=flops[m] / med / 1e9)
    models.clear()
    if cuda:
        torch.cuda.empty_cache()
    return {"batch": batch, "height": h, "width": w, "tokens": h * w, "model_gflop": {k: v / 1e9 for k, v in flops.items()},
            "matmul_gflops": None if rate is None else rate / 1e9, "cells": cells}


def fit_exponent(xs, ys):
    """Least-squares slope of log(y) against log(x) (None with fewer than two points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sum((p[0] - mx) ** 2 for p in pts)


def fit_offset_exponent(xs, ys):
    """k of the best fit y = c + a * x^k (c, a >= 0; k on a 0.01 grid from 0.3 to 3, relative residuals):
    the exponent of the part that grows, with a constant part (weights' gradients, buffers) fitted
    alongside. None with fewer than three distinct x."""
    import numpy as np

    pts = [(x, y) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len({x for x, _ in pts}) < 3:
        return None
    x = np.array([p[0] for p in pts], dtype=float)
    y = np.array([p[1] for p in pts], dtype=float)
    best = None
    for k in np.arange(0.3, 3.0 + 1e-9, 0.01):
        a = np.stack([np.ones_like(x), x**k], 1) / y[:, None]
        sol = np.linalg.lstsq(a, np.ones_like(y), rcond=None)[0]
        if sol[0] < 0 or sol[1] <= 0:
            continue
        r = float(((a @ sol - 1) ** 2).sum())
        if best is None or r < best[0]:
            best = (r, float(k))
    return None if best is None else round(best[1], 2)


def axis_series(result, axis, name, mode, key):
    """[(x, value)] of one model's ``key`` along ``axis`` ("size": x = tokens, "batch": x = batch)."""
    out = []
    for p in result["points"]:
        if axis not in p["axes"]:
            continue
        v = p["cells"].get(name, {}).get(mode, {}).get(key)
        if v is not None:
            out.append((p["tokens"] if axis == "size" else p["batch"], v))
    return out


def exponents(result):
    """{(axis, model, mode, quantity): fitted exponent}; quantity "memory" and "time" (log-log slopes) and
    "memory_above_constant" (``fit_offset_exponent``)."""
    out = {}
    for axis in ("size", "batch"):
        for n in result["models"]:
            for m in result["modes"]:
                for q, key in (("memory", "peak_mib"), ("time", "median_ms")):
                    s = axis_series(result, axis, n, m, key)
                    out[(axis, n, m, q)] = fit_exponent([a for a, _ in s], [b for _, b in s]) if len(s) > 1 else None
                s = axis_series(result, axis, n, m, "peak_mib")
                out[(axis, n, m, "memory_above_constant")] = fit_offset_exponent([a for a, _ in s], [b for _, b in s])
    return out


def run(args, say):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    sizes = [s for s in (args.sizes or ",".join(GPU_SIZES if cuda else CPU_SIZES)).split(",") if s]
    batches = [int(b) for b in (args.batches or ",".join(map(str, GPU_BATCHES if cuda else CPU_BATCHES))).split(",") if b]
    names = [m for m in args.models.split(",") if m]
    if args.compile and "compiled" not in names:
        names.insert(names.index("fast_unet") if "fast_unet" in names else len(names), "compiled")
    modes = [m for m in args.modes.split(",") if m]
    torch.manual_seed(0)
    from fast_unet import UNet

    state = UNet().state_dict()
    mm = core.matmul_fn(core.DTYPES[args.dtype], device)
    pts = points(sizes, batches, args.sweep_size)
    t0 = time.perf_counter()
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": core.device_name(device), "device_type": torch.device(device).type, "torch": torch.__version__,
        "dtype": args.dtype, "warmup": args.warmup, "repeats": args.repeats, "models": names, "modes": modes,
        "cell_limit_s": args.cell_limit, "mem_limit_gib": None if cuda else args.mem_limit_gib,
        "size_batch": batches[0], "sweep_size": args.sweep_size, "points": [],
        "memory_method": ("not measured (--no-memory)" if not args.memory else
                          "max_memory_allocated of one step after a warm-up step" if cuda else
                          "resident-set growth of a fresh process running one step (after a B=1 8x8 warm-up)"),
    }
    for b, (h, w), axes in pts:
        p = measure_point(names, modes, b, h, w, args.dtype, device, state, args, mm, say)
        p["axes"] = axes
        result["points"].append(p)
    rates = [p["matmul_gflops"] for p in result["points"] if p["matmul_gflops"]]
    result["matmul_gflops"] = max(rates) if rates else None
    if cuda and args.roofline:
        say("roofline: bytes per step (python -m bench.kernels' tracer) and the copy bandwidth")
        try:
            add_roofline(result, device)
        except Exception as e:  # the plots and tables still come out
            result["roofline_error"] = f"{type(e).__name__}: {e}"[:300]
    result["seconds"] = time.perf_counter() - t0
    result["exponents"] = [{"axis": a, "model": n, "mode": m, "quantity": q, "exponent": v}
                           for (a, n, m, q), v in exponents(result).items()]
    return result


def add_roofline(result, device):
    """Per cell: compulsory bytes of the step (bench.kernels' trace) and FLOPs per byte; the device's best
    measured copy bandwidth and matmul rate as the roofline's ceilings."""
    from . import kernels

    dtype = core.DTYPES[result["dtype"]]
    result["copy_gbs"] = core.copy_bandwidth(device) / 1e9
    for p in result["points"]:
        for n, cells in p["cells"].items():
            name = "baseline" if n == "compiled" else n
            for m, c in cells.items():
                if "median_ms" not in c:
                    continue
                trace = kernels.trace_step(name, m, p["batch"], p["height"], p["width"], dtype,
                                           device if name == "fast_unet" else "meta")
                s = kernels.summarise(trace)
                c["bytes"] = s["read_bytes"] + s["written_bytes"]
                c["flops_per_byte"] = p["model_gflop"][m] * 1e9 / c["bytes"]


def _cell_text(c):
    if "error" in c:
        return c["error"], c["error"] if "peak_mib" not in c else f"{c['peak_mib']:.0f}"
    t = "-" if "median_ms" not in c else f"{c['median_ms']:.1f}"
    return t, "-" if c.get("peak_mib") is None else f"{c['peak_mib']:.0f}"


def table(result):
    lines = [f"Sweep: {result['device']}, torch {result['torch']}, {result['dtype']}, {result['date']}; medians of "
             f"{result['repeats']} interleaved rounds after {result['warmup']} warm-up; peak memory: "
             f"{result['memory_method']}; cell limits: {result['cell_limit_s']} s"
             + (f", {result['mem_limit_gib']} GiB" if result["mem_limit_gib"] else "")
             + (f"; best measured {result['dtype']} matmul rate {result['matmul_gflops']:.0f} GFLOP/s"
                if result["matmul_gflops"] else ""), ""]
    names, modes = result["models"], result["modes"]
    head = "| B | size | tokens | " + " | ".join(f"{n} {m} ms | {n} {m} MiB" for m in modes for n in names) + " |"
    lines += [head, "|" + "---:|" * 3 + "---:|" * (2 * len(names) * len(modes))]
    for p in result["points"]:
        cells = []
        for m in modes:
            for n in names:
                cells += list(_cell_text(p["cells"][n][m]))
        lines.append(f"| {p['batch']} | {p['height']}x{p['width']} | {p['tokens']} | " + " | ".join(cells) + " |")
    lines += ["", "Fitted exponents: memory or time ~ tokens^a over the sizes at "
              f"B={result['size_batch']}, ~ batch^a over the batches at {result['sweep_size']} (least squares, "
              "log-log); 'above a constant': k of memory = c + a * tokens^k, the growing part alone (>= 3 sizes):", "",
              "| model | step | memory vs tokens | memory above a constant vs tokens | time vs tokens | memory vs batch "
              "| time vs batch |",
              "|---|---|---:|---:|---:|---:|---:|"]
    ex = {(e["axis"], e["model"], e["mode"], e["quantity"]): e["exponent"] for e in result["exponents"]}
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for n in names:
        for m in modes:
            lines.append(f"| {n} | {m} | {f(ex.get(('size', n, m, 'memory')))} | "
                         f"{f(ex.get(('size', n, m, 'memory_above_constant')))} | {f(ex.get(('size', n, m, 'time')))} | "
                         f"{f(ex.get(('batch', n, m, 'memory')))} | {f(ex.get(('batch', n, m, 'time')))} |")
    if result.get("roofline_error"):
        lines.append(f"\nroofline: not drawn ({result['roofline_error']})")
    lines.append(f"\nsweep took {result['seconds']:.0f} s")
    return "\n".join(lines)


def main(args, say):
    """Run the sweep, print its tables, write the JSON and the plots; 0."""
    from . import plots

    result = run(args, say)
    text = table(result)
    print(text)
    out_json = args.json if args.json != os.path.join("bench_results", "latest.json") else os.path.join(
        "bench_results", "sweep.json")
    result["table"] = text
    if args.plots:
        result["plots"] = plots.sweep_plots(result, args.plots)
        for path in result["plots"]:
            print(f"wrote {path}")
    if out_json:
        core.write_json(out_json, result)
        print(f"wrote {out_json}")
    return 0
