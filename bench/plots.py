"""The benchmark's figures, PNG through matplotlib's Agg backend (no display needed): measures nothing,
draws what ``python -m bench --sweep`` (``sweep_plots``) and ``python -m bench.ops`` (``ops_plot``)
measured, with the machine, the versions and the date in each figure. Needs matplotlib
(requirements.txt); ``python -m bench.plots SWEEP.json [OUTDIR]`` redraws a sweep's plots from its JSON.
"""
import os
import sys

COLORS = {"reference": "tab:red", "baseline": "tab:blue", "compiled": "tab:purple", "fast_unet": "tab:green",
          "eager": "tab:blue", "ext": "tab:orange", "triton": "tab:green"}
STYLES = {"forward": "-", "train": "--", "fwd": "-", "fwd+bwd": "--"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _stamp(fig, result, what):
    fig.suptitle(f"{what}\n{result['device']} · torch {result['torch']} · {result['dtype']} · {result['date']}",
                 fontsize=9)


def sweep_plots(result, outdir):
    """Write sweep_size.png (time and memory against tokens), sweep_batch.png (against the batch) and, when
    the result has roofline data, sweep_roofline.png; return their paths."""
    from . import sweep

    plt = _plt()
    os.makedirs(outdir, exist_ok=True)
    paths = []
    ex = {(e["axis"], e["model"], e["mode"], e["quantity"]): e["exponent"] for e in result["exponents"]}
    for axis, xlabel, fname in (("size", "tokens at full resolution (H x W)", "sweep_size.png"),
                                ("batch", "batch size", "sweep_batch.png")):
        pts = [p for p in result["points"] if axis in p["axes"]]
        if len({(p["tokens"] if axis == "size" else p["batch"]) for p in pts}) < 2:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for ax, q, key, ylabel in ((axes[0], "time", "median_ms", "median ms per step"),
                                   (axes[1], "memory", "peak_mib", "peak MiB per step")):
            for n in result["models"]:
                for m in result["modes"]:
                    s = sweep.axis_series(result, axis, n, m, key)
                    if not s:
                        continue
                    e = ex.get((axis, n, m, q))
                    label = f"{n} {m}" + ("" if e is None else f" (~x^{e:.2f})")
                    ax.plot([a for a, _ in s], [b for _, b in s], STYLES.get(m, "-"), marker="o",
                            color=COLORS.get(n), label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
            if axis == "size":
                ticks = sorted({(p["tokens"], f"{p['height']}x{p['width']}") for p in pts})
                ax.set_xticks([t for t, _ in ticks], [f"{lbl} ({t})" for t, lbl in ticks], fontsize=7, rotation=35,
                              ha="right")
                ax.minorticks_off()
            else:
                ax.set_xticks(sorted({p["batch"] for p in pts}), [str(b) for b in sorted({p["batch"] for p in pts})])
                ax.minorticks_off()
        where = (f"B={result['size_batch']}" if axis == "size" else f"{result['sweep_size']}")
        _stamp(fig, result, f"fast_unet sweep: time and peak memory against the {axis} ({where}); "
                            f"solid: forward, dashed: training step")
        note = [f"{n} {m} B={p['batch']} {p['height']}x{p['width']}: {c['error']}"
                for p in pts for n, cells in p["cells"].items() for m, c in cells.items() if "error" in c]
        if note:
            fig.text(0.01, 0.01, "not measured: " + "; ".join(note), fontsize=6, wrap=True)
        fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 0.92))
        path = os.path.join(outdir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    if result.get("copy_gbs") and result.get("matmul_gflops") and any(
            "flops_per_byte" in c for p in result["points"] for cells in p["cells"].values() for c in cells.values()):
        paths.append(_roofline(plt, result, os.path.join(outdir, "sweep_roofline.png")))
    return paths


def _roofline(plt, result, path):
    bw, peak = result["copy_gbs"] * 1e9, result["matmul_gflops"] * 1e9
    fig, ax = plt.subplots(figsize=(7, 5))
    xs = []
    for p in result["points"]:
        for n, cells in p["cells"].items():
            for m, c in cells.items():
                if "flops_per_byte" in c:
                    xs.append(c["flops_per_byte"])
                    ax.plot(c["flops_per_byte"], c["gflops"] * 1e9, "o" if m == "forward" else "s",
                            color=COLORS.get(n), alpha=0.8)
    lo, hi = min(xs) / 2, max(xs) * 2
    import numpy as np

    grid = np.logspace(np.log10(lo), np.log10(hi), 100)
    ax.plot(grid, np.minimum(grid * bw, peak), "k-", lw=1,
            label=f"roofline: {result['copy_gbs']:.0f} GB/s copy, {result['matmul_gflops']:.0f} GFLOP/s matmul (best measured)")
    for n in result["models"]:
        ax.plot([], [], "o", color=COLORS.get(n), label=n)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOPs per compulsory byte (model FLOPs / bytes of python -m bench.kernels)")
    ax.set_ylabel("achieved FLOP/s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    _stamp(fig, result, "roofline of the sweep's cells (circles: forward, squares: training step)")
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ops_plot(result, path):
    """One panel per op: achieved GB/s (or TFLOP/s for the matmul ops) against the size, one line per
    backend and direction; the device's measured peak as a horizontal line."""
    plt = _plt()
    ops = list(dict.fromkeys(r["op"] for r in result["rows"]))
    cols = 3
    rows = (len(ops) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        rs = [r for r in result["rows"] if r["op"] == op]
        metric = rs[0]["metric"]
        for b in result["backends"]:
            for d in result["directions"]:
                s = [(r["x"], r["results"][b][d][metric]) for r in rs
                     if b in r["results"] and d in r["results"][b] and r["results"][b][d].get(metric)]
                if s:
                    ax.plot([a for a, _ in s], [v for _, v in s], STYLES.get(d, "-"), marker="o",
                            color=COLORS.get(b), label=f"{b} {d}")
        peak = result["peak_tflops"] if metric == "tflops" else result["peak_gbs"]
        ax.axhline(peak, color="k", lw=0.8, ls=":", label="measured peak")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(op, fontsize=9)
        ax.set_xlabel(rs[0]["x_name"], fontsize=8)
        ax.set_ylabel("TFLOP/s" if metric == "tflops" else "GB/s", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    _stamp(fig, result, f"fast_unet ops per backend, {result['what']}")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    import json

    with open(sys.argv[1]) as f:
        data = json.load(f)
    for p in sweep_plots(data, sys.argv[2] if len(sys.argv) > 2 else os.path.dirname(sys.argv[1]) or "."):
        print(f"wrote {p}")
