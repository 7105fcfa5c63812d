"""``python -m bench.estimate``: a GPU time estimate on paper, kernel by kernel, for fast_unet and the
eager baseline, checked against measured times when a GPU is at hand.

Run: ``python -m bench.estimate`` (B=64, 64x64, bfloat16, forward and training step, then the sweep's
sizes and batches); ``--per-kernel`` adds each kernel's row, ``--per-build`` fast_unet's Triton launches by
the build they compile to (tile, input mode: issue against math); ``--json`` where to write it all. No GPU
needed: the launches are those ``python -m bench.kernels`` records (fast_unet's Triton launches under the
interpreter, dry, plus the aten ops outside them; the baseline's aten ops on the meta device), each with
its compulsory bytes (bench/traffic.py), FLOPs and exponentials (bench/work.py).

Each launch's time at an H200's ceilings is the largest of bytes / HBM bandwidth, bytes re-read inside its
loop / L2 bandwidth, FLOPs / the rate of the unit its dtype gets (bf16/fp16 tensor cores, tf32 for
float32 convolutions, fp32 CUDA cores), exponentials / the SFU rate and warp instructions / the issue
rate, plus a fixed per-launch overhead; a step's estimate is the sum over its launches (no overlap between
kernels). It is a floor for each kernel (perfect overlap of memory, math and issue inside it, compulsory
traffic only) plus an assumed launch cost: a model, not a measurement. Each step is given twice: its
kernels launched one by one from the host (``launch_s`` each: eager) and replayed from a CUDA graph
(``graph_launch_s`` each: graphed); the ratio to the baseline compares like with like. On a CUDA
machine the same table shows the measured medians (CUDA events, interleaved) beside it, so the model is checked rather than
trusted. Eager ops are aten ops (a lower bound on the baseline's kernels: see ``python -m bench.kernels``),
so its launch overhead is if anything under-counted.

Instruction issue: each SM sub-partition issues one warp instruction per clock (132 SMs x 4 x clock).
A Triton launch with a compiled loop issues its loop's instructions per iteration (the SASS of the
build the launch compiles to, sm_90: fast_unet/sass.py, through bench/issue.py: cached, compiled on
demand, or a stated fallback table) x num_warps x the iterations of all its programs (bench/work.py
``triton_loop``); code outside the loop is not counted. The baseline's SDPA cannot be compiled here: it
is given, per score, the fewest instructions of any fast_unet attention kernel at the same head dim and
dtype, so that no ratio gains from what cannot be seen. ``--issue table`` uses the fallback table only,
``--issue off`` leaves the term out.

L2: the tiles a loop loads again in every program (attention's K/V per query tile, Q/dO per key tile)
and the one-pass backward's float32 atomic adds into dQ (bench/work.py), at the L2 bandwidth below.
"""
import argparse
import datetime
import os
import statistics
import sys
from collections import OrderedDict

import torch

# The ceilings of one NVIDIA H200 (SXM, 141 GB), each with its source. One clock for every per-clock rate:
# the one the dense BF16 tensor-core figure implies.
_SMS = 132  # NVIDIA H100 architecture whitepaper: 132 SMs on the SXM5 part; the H200 is the same GH100 chip
_CLOCK_HZ = 989.4e12 / (_SMS * 4096)  # 1.83 GHz: 989.4 TFLOPS over 132 SMs x 4,096 dense bf16 FLOP per clock
H200 = OrderedDict(
    # NVIDIA H200 datasheet: 4.8 TB/s HBM3e. Taken as 4.3 TB/s, about 90% of it: the sustained streaming
    # rate a copy kernel reaches on HBM3/HBM3e parts (an assumption, the same figure docs/triton.md uses).
    hbm_bytes_per_s=4.3e12,
    # NVIDIA H200 datasheet: BF16/FP16 tensor core 1,979 TFLOPS "with sparsity": 989.4 dense.
    mma16_flops_per_s=989.4e12,
    # NVIDIA H200 datasheet: TF32 tensor core 989 TFLOPS with sparsity: 494.7 dense.
    tf32_flops_per_s=494.7e12,
    # 132 SMs x 128 FP32 lanes x 2 (FMA) at the clock below; the datasheet's 67 TFLOPS is the same at 1.98 GHz.
    fp32_flops_per_s=_SMS * 128 * 2 * _CLOCK_HZ,
    sms=_SMS,
    # The clock the tensor-core figure implies: 989.4e12 / (132 SMs x 4 tensor cores x 512 dense bf16 FMA
    # per clock x 2); H100 whitepaper: 4 tensor cores per SM, each twice A100's 256 FP16 FMA per clock.
    clock_hz=_CLOCK_HZ,
    # NVIDIA H100 whitepaper: 16 SFUs per SM (4 per sub-partition), one ex2 each per clock.
    sfu_exps_per_s=_SMS * 16 * _CLOCK_HZ,
    # NVIDIA H100 whitepaper: 4 sub-partitions per SM, each with one warp scheduler issuing one warp
    # instruction per clock.
    issue_per_s=_SMS * 4 * _CLOCK_HZ,
    # NVIDIA A100 whitepaper: L2 read bandwidth 5,120 bytes per clock (2.3x V100's); NVIDIA gives no figure
    # for H100's L2, taken here as the same per clock, at the clock above (9.4 TB/s). A ceiling, not a
    # measurement: the GPU check can replace it.
    l2_bytes_per_s=5120 * _CLOCK_HZ,
    # Per-launch overhead, back to back without CUDA graphs: an assumption (a few microseconds of launch
    # latency and tail per kernel), not a datasheet figure; the measured column is what checks it.
    launch_s=3e-6,
    # Per-kernel cost of a CUDA-graph replay: an assumption. A graph is submitted in one call and its kernel
    # nodes start back to back from the device's work queue, so what is left per kernel is the gap between
    # one kernel's tail and the next one's start, not the host's launch path (NVIDIA, "Getting Started with
    # CUDA Graphs", developer.nvidia.com/blog/cuda-graphs/; PyTorch, "Accelerating PyTorch with CUDA
    # Graphs", pytorch.org/blog/accelerating-pytorch-with-cuda-graphs/). 1 us per kernel node is the
    # figure taken here; the GPU check's graphed step is what checks it.
    graph_launch_s=1e-6,
)
SOURCES = {
    "hbm_bytes_per_s": "NVIDIA H200 datasheet 4.8 TB/s; 4.3 TB/s (~90%) taken as sustained",
    "mma16_flops_per_s": "NVIDIA H200 datasheet, BF16/FP16 tensor core, dense (1,979 TFLOPS sparse / 2)",
    "tf32_flops_per_s": "NVIDIA H200 datasheet, TF32 tensor core, dense (989 TFLOPS sparse / 2)",
    "fp32_flops_per_s": "132 SMs x 128 FP32 lanes x 2 x clock_hz (the datasheet's 67 TFLOPS is at 1.98 GHz)",
    "sms": "NVIDIA H100 whitepaper: 132 SMs (SXM5); the H200 is the same GH100 chip",
    "clock_hz": "the clock the dense BF16 figure implies: 989.4e12 / (132 SMs x 4 tensor cores x 512 FMA x 2)",
    "sfu_exps_per_s": "NVIDIA H100 whitepaper: 16 SFUs per SM (one ex2 per clock each) x 132 SMs x clock_hz",
    "issue_per_s": "NVIDIA H100 whitepaper: 4 warp schedulers per SM, one warp instruction per clock each, "
                   "x 132 SMs x clock_hz",
    "l2_bytes_per_s": "NVIDIA A100 whitepaper: L2 read 5,120 B/clk (no H100 figure published; taken as the "
                      "same) x clock_hz",
    "launch_s": "assumed per-launch overhead without CUDA graphs (checked by the measured column)",
    "graph_launch_s": "assumed per-kernel cost of a CUDA-graph replay (one submission; the gap between kernel "
                      "nodes: NVIDIA's CUDA graphs blog, PyTorch's CUDA graphs blog)",
}
_RATE = {"mma16": "mma16_flops_per_s", "tf32": "tf32_flops_per_s", "fp32": "fp32_flops_per_s"}
MODELS = ("fast_unet", "baseline")
SWEEP_SIZES = ("32", "64", "128", "256", "48x80")
SWEEP_BATCHES = (1, 4, 16, 64)


BOUNDS = ("memory", "l2", "mma16", "tf32", "fp32", "exp", "issue")


def launch_time(ln, c=H200, overhead="launch_s"):
    """(seconds, what bounds it) of one recorded launch at the ceilings ``c``; ``overhead``: the per-launch
    cost added, ``"launch_s"`` (launched one by one) or ``"graph_launch_s"`` (replayed from a CUDA graph)."""
    parts = launch_parts(ln, c)
    bound = max(parts, key=parts.get)
    return parts[bound] + c[overhead], bound


def launch_parts(ln, c=H200):
    """{ceiling: seconds} of one recorded launch: its bytes, L2 re-reads, FLOPs, exponentials and warp
    instructions each at its ceiling (``launch_time`` takes the largest)."""
    parts = {"memory": (ln["read_bytes"] + ln["write_bytes"]) / c["hbm_bytes_per_s"]}
    if ln.get("l2_bytes"):
        parts["l2"] = ln["l2_bytes"] / c["l2_bytes_per_s"]
    if ln["flops"] and ln["unit"] in _RATE:
        parts[ln["unit"]] = ln["flops"] / c[_RATE[ln["unit"]]]
    if ln["exps"]:
        parts["exp"] = ln["exps"] / c["sfu_exps_per_s"]
    if ln.get("insts"):
        parts["issue"] = ln["insts"] / c["issue_per_s"]
    return parts


def _launch_dicts(trace):
    out = []
    for x in trace.launches:
        dtypes = {n: t.dtype for t in x.reads + x.writes for n in t.names}
        first = next((t.dtype for t in x.reads + x.writes), None)
        out.append(dict(kind=x.kind, name=x.name, read_bytes=x.read_bytes, write_bytes=x.write_bytes,
                        flops=x.flops, unit=x.unit, exps=x.exps, known=x.known, l2_bytes=x.l2_bytes,
                        loop=x.loop, args=x.args or {}, dtypes=dtypes, dtype=first, insts=0, insts_from=None))
    return out


def is_attention(ln):
    """A launch of an attention kernel: fast_unet's (``_attn_*``) or SDPA's."""
    return ln["name"].startswith("_attn") or bool((ln.get("loop") or {}).get("sdpa"))


class Issue:
    """The instruction-issue term of the launches: ``wanted`` collects the builds to count (bench/issue.py
    ``match``), ``attach`` sets each launch's ``insts`` (warp instructions) and ``insts_from``."""

    def __init__(self, mode="auto", say=lambda m: None):
        from . import issue

        self.counts = issue.LoopCounts(mode, say=say)
        self._match = {}
        self.off = mode == "off"

    def build(self, ln):
        k = (ln["name"], tuple(sorted(ln["args"].items())), tuple(sorted(ln["dtypes"].items())))
        if k not in self._match:
            from . import issue

            self._match[k] = issue.match(ln["name"], ln["args"], ln["dtypes"], self.counts.builds())
        return self._match[k]

    def wanted(self, launches):
        out = set()
        if self.off:
            return out
        for ln in launches:
            loop = ln.get("loop") or {}
            if ln["kind"] == "triton" and loop.get("iterations"):
                b = self.build(ln)
                if b is not None:
                    out.add((b[0], b[2]))
            elif loop.get("sdpa"):
                out |= {(b[0], b[2]) for b in self.counts.attention_builds(ln["dtype"], loop["head_dim"])}
        return out

    def prepare(self, launches):
        self.counts.prepare(self.wanted(launches))

    def best_attention(self, dtype, head_dim):
        """(warp instructions per 1,024 scores, kernel label) of fast_unet's best attention build at this
        dtype and head dim, or (None, None)."""
        best = (None, None)
        for b in self.counts.attention_builds(dtype, head_dim):
            cols, _ = self.counts.columns(b)
            if cols and cols.get("insts_per_1k") and (best[0] is None or cols["insts_per_1k"] < best[0]):
                best = (cols["insts_per_1k"], b[0])
        return best

    def attach(self, launches):
        for ln in launches:
            loop = ln.get("loop") or {}
            if self.off or not loop:
                continue
            if ln["kind"] == "triton" and loop.get("iterations"):
                b = self.build(ln)
                cols, src = self.counts.columns(b)
                if cols:
                    warps = int(b[5].get("num_warps", 4))
                    ln["insts"] = cols["loop_insts"] * warps * loop["iterations"]
                    ln["insts_from"] = src
                    ln["build"] = b[2]
            elif loop.get("sdpa"):
                per_1k, label = self.best_attention(ln["dtype"], loop["head_dim"])
                if per_1k:
                    ln["insts"] = per_1k * loop["scores"] / 1024
                    ln["insts_from"] = f"floor: {label}"
        return launches

    def notes(self):
        return sorted(self.counts.notes)


def estimate_step(launches, c=H200):
    """Totals of one step's launches: counts, bytes, FLOPs, exponentials, warp instructions, the estimate
    launched one by one (``est_s``, ``launch_s``) and replayed from a CUDA graph (``graph_est_s``,
    ``graph_launch_s``: the same kernels at ``graph_launch_s`` each), its parts (``bound_s``: the time of
    the launches each ceiling bounds), the attention kernels'
    share (``attention_s``), and per kernel name: calls, time, and what bounds most of its time."""
    per, builds = OrderedDict(), OrderedDict()
    tot = dict(launches=0, bytes=0, l2_bytes=0, flops=0, exps=0, insts=0, est_s=0.0, launch_s=0.0,
               graph_est_s=0.0, graph_launch_s=0.0, attention_s=0.0, bound_s=dict.fromkeys(BOUNDS, 0.0),
               unknown=set(), no_issue=set(), insts_from={})
    for ln in launches:
        t, bound = launch_time(ln, c)
        tot["launches"] += 1
        tot["bytes"] += ln["read_bytes"] + ln["write_bytes"]
        tot["l2_bytes"] += ln.get("l2_bytes", 0)
        tot["flops"] += ln["flops"]
        tot["exps"] += ln["exps"]
        tot["insts"] += ln.get("insts", 0)
        tot["est_s"] += t
        tot["launch_s"] += c["launch_s"]
        tot["graph_est_s"] += t - c["launch_s"] + c["graph_launch_s"]
        tot["graph_launch_s"] += c["graph_launch_s"]
        tot["bound_s"][bound] += t - c["launch_s"]
        if is_attention(ln):
            tot["attention_s"] += t
        if ln.get("insts_from"):
            src = ln["insts_from"].split(":")[0]
            tot["insts_from"][src] = tot["insts_from"].get(src, 0) + 1
        if not ln["known"]:
            tot["unknown"].add(ln["name"])
        if ln["kind"] == "triton" and (ln.get("loop") or {}).get("iterations") and not ln.get("insts"):
            tot["no_issue"].add(ln["name"])
        k = per.setdefault(ln["name"], dict(kind=ln["kind"], calls=0, bytes=0, l2_bytes=0, flops=0, exps=0,
                                           insts=0, est_s=0.0, bound_s={}, insts_from=None))
        k["calls"] += 1
        k["bytes"] += ln["read_bytes"] + ln["write_bytes"]
        k["l2_bytes"] += ln.get("l2_bytes", 0)
        k["flops"] += ln["flops"]
        k["exps"] += ln["exps"]
        k["insts"] += ln.get("insts", 0)
        k["est_s"] += t
        k["bound_s"][bound] = k["bound_s"].get(bound, 0.0) + t
        k["insts_from"] = k["insts_from"] or ln.get("insts_from")
        if ln.get("build"):  # a Triton launch whose loop's instructions are counted: by its build
            parts = launch_parts(ln, c)
            b = builds.setdefault((ln["name"], ln["build"]), dict(calls=0, est_s=0.0, issue_s=0.0, math_s=0.0,
                                                                  memory_s=0.0, exp_s=0.0))
            b["calls"] += 1
            b["est_s"] += t
            b["issue_s"] += parts.get("issue", 0.0)
            b["math_s"] += sum(v for k2, v in parts.items() if k2 in _RATE)
            b["memory_s"] += parts["memory"]
            b["exp_s"] += parts.get("exp", 0.0)
    for k in per.values():
        k["bound"] = max(k["bound_s"], key=k["bound_s"].get)
        del k["bound_s"]
    tot["unknown"] = sorted(tot["unknown"])
    tot["no_issue"] = sorted(tot["no_issue"])
    tot["kernels"] = sorted(per.items(), key=lambda kv: -kv[1]["est_s"])
    tot["builds"] = [dict(kernel=n, build=b, **v) for (n, b), v in sorted(builds.items(), key=lambda kv: -kv[1]["est_s"])]
    return tot


def step_fns(model_name, batch, height, width, dtype):
    """{step: fn}: the forward and the training step of one model on CUDA, for the interleaved timer."""
    from . import core

    model = core.build_model(model_name, height, width, dtype, "cuda")
    model.train(True)
    x, t, noise = core.make_inputs(batch, height, width, dtype, "cuda")
    return {"forward": core.forward_fn(model, x, t), "train": core.train_fn(model, x, t, noise)}


def run(points, dtype_name, models=MODELS, measure_gpu=False, say=lambda m: None, issue_mode="auto"):
    from . import core, kernels

    dtype = core.DTYPES[dtype_name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    why = kernels.fast_unet_unavailable(device)
    rows, traced = [], []
    for batch, (h, w) in points:
        row = {"batch": batch, "height": h, "width": w, "models": OrderedDict()}
        for m in models:
            if m == "fast_unet" and why:
                row["models"][m] = {"unavailable": why}
                continue
            say(f"tracing {m} at B={batch}, {h}x{w}")
            dev = device if m == "fast_unet" else "meta"
            for step in kernels.STEPS:
                traced.append((row, m, step, _launch_dicts(kernels.trace_step(m, step, batch, h, w, dtype, dev))))
        rows.append(row)
    issue = Issue(issue_mode, say)
    issue.prepare([ln for *_, lns in traced for ln in lns])
    for row, m, step, lns in traced:
        row["models"].setdefault(m, {})[step] = estimate_step(issue.attach(lns))
    notes = issue.notes()
    for row in rows:
        row["issue_notes"] = notes
        batch, h, w = row["batch"], row["height"], row["width"]
        if measure_gpu and device == "cuda":
            say(f"measuring at B={batch}, {h}x{w}")
            fns = {}
            for m in models:
                try:
                    for step, fn in step_fns(m, batch, h, w, dtype).items():
                        fns[(m, step)] = fn
                except torch.cuda.OutOfMemoryError:
                    row["models"][m]["measured_error"] = "out of memory"
            try:
                times = core.time_interleaved(fns, "cuda", 3, 10)
                for (m, step), ts in times.items():
                    row["models"][m][step]["measured_s"] = statistics.median(ts)
            except torch.cuda.OutOfMemoryError:
                row["measured_error"] = "out of memory"
            fns.clear()
            torch.cuda.empty_cache()
    return rows


def _ms(s):
    return f"{s * 1e3:,.3f}"


def summary_table(rows, dtype_name):
    lines = [f"Estimated time at H200 ceilings ({dtype_name}; training step = forward + MSE loss + backward, no "
             f"optimizer step; per launch max(bytes/HBM, L2 re-reads/L2, FLOPs/unit rate, exps/SFU, warp "
             f"instructions/issue rate) + {H200['launch_s'] * 1e6:.0f} µs launched one by one (eager), "
             f"+ {H200['graph_launch_s'] * 1e6:.0f} µs replayed from a CUDA graph (graphed))",
             "", "| B | size | model | step | launches | GB | GFLOP | G exp | G warp insts | memory-bound ms | "
             "L2-bound ms | math-bound ms | exp-bound ms | issue-bound ms | launch ms | estimate ms | attention ms | "
             "vs baseline | graphed launch ms | graphed estimate ms | graphed vs baseline | measured ms | "
             "measured / estimate |",
             "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
             "---:|---:|"]
    for row in rows:
        base = row["models"].get("baseline", {})
        for m, r in row["models"].items():
            if "unavailable" in r:
                lines.append(f"| {row['batch']} | {row['height']}x{row['width']} | {m} | - | unavailable: "
                             f"{r['unavailable']} |" + " |" * 18)
                continue
            for step in ("forward", "train"):
                s = r[step]
                b = base.get(step)
                ratio = "-" if not b or m == "baseline" else f"{b['est_s'] / s['est_s']:.2f}x"
                g_ratio = "-" if not b or m == "baseline" else f"{b['graph_est_s'] / s['graph_est_s']:.2f}x"
                meas = s.get("measured_s")
                bs = s["bound_s"]
                math = sum(v for k, v in bs.items() if k in _RATE)
                lines.append(
                    f"| {row['batch']} | {row['height']}x{row['width']} | {m} | {step} | {s['launches']} | "
                    f"{s['bytes'] / 1e9:,.2f} | {s['flops'] / 1e9:,.1f} | {s['exps'] / 1e9:.3f} | "
                    f"{s['insts'] / 1e9:,.3f} | {_ms(bs['memory'])} | {_ms(bs['l2'])} | {_ms(math)} | "
                    f"{_ms(bs['exp'])} | {_ms(bs['issue'])} | {_ms(s['launch_s'])} | {_ms(s['est_s'])} | "
                    f"{_ms(s['attention_s'])} | {ratio} | {_ms(s['graph_launch_s'])} | {_ms(s['graph_est_s'])} | "
                    f"{g_ratio} | "
                    f"{'-' if meas is None else _ms(meas)} | {'-' if meas is None else format(meas / s['est_s'], '.2f')} |")
    lines.append("")
    lines.append("vs baseline: the baseline's estimate over this model's (above 1: this model is estimated "
                 "faster), eager against eager; graphed: the same launches replayed from a CUDA graph, at "
                 f"{H200['graph_launch_s'] * 1e6:.0f} µs per kernel instead of {H200['launch_s'] * 1e6:.0f} µs, "
                 "graphed against graphed. X-bound ms: the time of the launches X bounds. attention ms: the attention kernels' "
                 "launches (fast_unet's _attn_*, the baseline's SDPA), launch overhead included. measured: "
                 "CUDA-event medians of interleaved runs (only on a GPU).")
    lines.append("Warp instructions: the inner loops of the Triton kernels (their sm_90 SASS x num_warps x "
                 "iterations); the baseline's SDPA at fast_unet's best attention kernel per score at its head dim; "
                 "no other kernel has an issue term.")
    sources = {}
    for row in rows:
        for r in row["models"].values():
            for step in ("forward", "train"):
                for src, n in (r.get(step) or {}).get("insts_from", {}).items():
                    sources[src] = sources.get(src, 0) + n
    if sources:
        lines.append("Loop counts from: " + ", ".join(f"{k} ({v} launches)" for k, v in sorted(sources.items())))
    for note in sorted({n for row in rows for n in row.get("issue_notes", ())}):
        lines.append(f"Note: {note}")
    unknown = sorted({k for row in rows for r in row["models"].values() if "unavailable" not in r
                      for s in ("forward", "train") for k in r[s]["unknown"]})
    if unknown:
        lines.append(f"Triton kernels without a FLOP formula in bench/work.py (counted as memory only): "
                     f"{', '.join(unknown)}")
    no_issue = sorted({k for row in rows for r in row["models"].values() if "unavailable" not in r
                       for s in ("forward", "train") for k in r[s].get("no_issue", ())})
    if no_issue:
        lines.append(f"Triton launches with a loop that no build of the compile report matches (no issue term: "
                     f"their instructions are not counted): {', '.join(no_issue)}")
    return "\n".join(lines)


def kernel_table(row, model, step):
    s = row["models"][model][step]
    lines = [f"{model}, {step}, B={row['batch']}, {row['height']}x{row['width']}: estimate {_ms(s['est_s'])} ms",
             "", "| kernel / op | kind | calls | MB | L2 MB | GFLOP | M exp | M warp insts | estimate µs | bound by |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, k in s["kernels"]:
        lines.append(f"| {name} | {k['kind']} | {k['calls']} | {k['bytes'] / 1e6:,.1f} | {k['l2_bytes'] / 1e6:,.1f} | "
                     f"{k['flops'] / 1e9:,.2f} | {k['exps'] / 1e6:,.2f} | {k['insts'] / 1e6:,.2f} | "
                     f"{k['est_s'] * 1e6:,.1f} | {k['bound']} |")
    return "\n".join(lines)


def build_table(row, model, step):
    """The launches of ``model``'s ``step`` whose loop instructions are counted, by kernel and build (tile,
    input mode, dtype): the estimate beside the time of their warp instructions at the issue rate, of their
    FLOPs at their unit's rate, of their exponentials at the SFUs' and of their bytes at HBM's; issue / math
    above 1: instruction issue, not the tensor cores, bounds that build."""
    s = row["models"][model][step]
    lines = [f"{model}, {step}, B={row['batch']}, {row['height']}x{row['width']}: Triton launches by build",
             "", "| kernel | build | calls | estimate µs | issue µs | math µs | exp µs | memory µs | issue / math |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for b in s["builds"]:
        ratio = f"{b['issue_s'] / b['math_s']:.2f}" if b["math_s"] else "-"
        lines.append(f"| {b['kernel']} | {b['build']} | {b['calls']} | {b['est_s'] * 1e6:,.1f} | "
                     f"{b['issue_s'] * 1e6:,.1f} | {b['math_s'] * 1e6:,.1f} | {b['exp_s'] * 1e6:,.1f} | "
                     f"{b['memory_s'] * 1e6:,.1f} | {ratio} |")
    return "\n".join(lines)


def constants_text():
    return "\n".join(["H200 ceilings used (bench/estimate.py H200):"] +
                     [f"- {k} = {v:.4g}: {SOURCES[k]}" for k, v in H200.items()])


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.estimate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", default="64", help="the main point's resolution: 64 or HxW")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--sizes", default=",".join(SWEEP_SIZES),
                   help="the sweep's sizes, at --batch ('' for none)")
    p.add_argument("--batches", default=",".join(str(b) for b in SWEEP_BATCHES),
                   help="the sweep's batches, at --size ('' for none)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: fast_unet, baseline, reference")
    p.add_argument("--per-kernel", action="store_true", help="each kernel's row at the main point")
    p.add_argument("--per-build", action="store_true",
                   help="fast_unet's Triton launches at the main point by build (tile, input mode): issue against math")
    p.add_argument("--no-measure", dest="measure", action="store_false",
                   help="on a GPU: leave out the measured times")
    p.add_argument("--issue", default="auto", choices=("auto", "table", "off"),
                   help="the loops' instruction counts: auto (cached, else compiled for sm_90 in a subprocess, "
                   "else the fallback table), table (bench/issue.py FALLBACK only), off (no issue term)")
    p.add_argument("--json", default=os.path.join("bench_results", "estimate.json"), help="'' for none")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and "fast_unet.kernels._common" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # fast_unet's launches are recorded under the interpreter
    from . import core

    main_pt = (args.batch, core.parse_size(args.size))
    points = [main_pt]
    for s in [s for s in args.sizes.split(",") if s]:
        pt = (args.batch, core.parse_size(s))
        if pt not in points:
            points.append(pt)
    for b in [int(b) for b in args.batches.split(",") if b]:
        pt = (b, main_pt[1])
        if pt not in points:
            points.append(pt)
    points = [points[0]] + sorted(points[1:], key=lambda q: (q[0], q[1][0] * q[1][1]))
    models = [m for m in args.models.split(",") if m]
    say = (lambda m: None) if args.quiet else (lambda m: print(f"[bench.estimate] {m}", file=sys.stderr, flush=True))
    rows = run(points, args.dtype, models, args.measure, say, args.issue)
    device = core.device_name("cuda" if torch.cuda.is_available() else "cpu")
    head = (f"GPU estimate on paper: {', '.join(models)}; traced on {device}, torch {torch.__version__}, "
            f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}")
    parts = [head, constants_text(), "Main point:", summary_table(rows[:1], args.dtype)]
    if len(rows) > 1:
        parts += ["Over the sweep's sizes and batches:", summary_table(rows[1:], args.dtype)]
    if args.per_kernel:
        for m in models:
            if "unavailable" not in rows[0]["models"][m]:
                for step in ("forward", "train"):
                    parts.append(kernel_table(rows[0], m, step))
    if args.per_build and "unavailable" not in rows[0]["models"].get("fast_unet", {"unavailable": 1}):
        for step in ("forward", "train"):
            parts.append(build_table(rows[0], "fast_unet", step))
    text = "\n\n".join(parts)
    print(text)
    if args.json:
        from .core import write_json

        write_json(args.json, {"constants": H200, "sources": SOURCES, "dtype": args.dtype, "device": device,
                               "rows": rows, "table": text}, default=list)
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
