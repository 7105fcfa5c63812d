"""``python -m bench``: fast_unet against the reference, the fair eager baseline and (``--compile``)
torch.compile of that baseline, side by side in one run.

For each model: the forward time (no grad; training mode, see run()) and the training-step time (forward, MSE loss,
backward; train mode), medians of interleaved runs after warm-up; the peak memory of each step; the
ratios against the reference and the baseline; achieved GFLOP/s against the device's best measured matmul
rate (the fastest of several 2048^3 torch.mm, one per timing round, interleaved with the models). Prints a table, and writes everything as JSON (``--json``, default bench_results/latest.json).
Then a short section of kernel-launch counts and forward memory traffic per model, from
``python -m bench.kernels`` (``--no-kernel-count`` leaves it out). ``--sample``: sampling and training
throughput instead (``python -m bench.sample``). ``--loop``: the training CLI's step against a bare forward +
backward + optimizer step instead (``python -m bench.loop``).

``--tune`` adds ``fast_unet_tuned`` beside ``fast_unet``: the same model with measured dispatch
(``fast_unet.tune(True)``), tuned from an empty cache in a temporary folder (``$FAST_UNET_CACHE_DIR`` when
set); the time its first forward and first training step took, and the part of it spent timing backends,
are reported. ``--dtype autocast-bfloat16`` (``autocast-float16``): float32 models under
``torch.autocast`` in that dtype (forward and loss); ``--dtype bfloat16``: the models cast to bfloat16.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from . import core


def _progress(quiet):
    def say(msg):
        if not quiet:
            print(f"[bench] {msg}", file=sys.stderr, flush=True)
    return say


def run(args):
    say = _progress(args.quiet)
    height, width = core.parse_size(args.size)
    dtype, autocast = core.parse_dtype(args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = [m for m in args.models.split(",") if m]
    if args.tune and "fast_unet_tuned" not in names:
        names.insert(names.index("fast_unet") + 1 if "fast_unet" in names else len(names), "fast_unet_tuned")
    if args.compile and "compiled" not in names:
        names.insert(names.index("fast_unet") if "fast_unet" in names else len(names), "compiled")
    if not args.compile and "compiled" in names:
        names.remove("compiled")
    modes = [m for m in args.modes.split(",") if m]
    for n in names:
        if n not in core.MODELS:
            raise SystemExit(f"--models: unknown model {n!r}; expected some of {','.join(core.MODELS)}")
    for m in modes:
        if m not in ("forward", "train"):
            raise SystemExit(f"--modes: unknown mode {m!r}; expected forward,train")

    torch.manual_seed(0)
    from fast_unet import UNet

    state = UNet().state_dict()
    if "fast_unet_tuned" in names and not os.environ.get("FAST_UNET_CACHE_DIR"):
        # an empty cache, so that the run measures the tuning; the memory children inherit it
        os.environ["FAST_UNET_CACHE_DIR"] = tempfile.mkdtemp(prefix="fast_unet_tune_")
    say(f"building {', '.join(names)} at B={args.batch}, {height}x{width}, {args.dtype}, {device}")
    models = {n: core.build_model(n, height, width, dtype, device, state) for n in names}
    x, t, noise = core.make_inputs(args.batch, height, width, dtype, device)

    say("counting FLOPs (meta device)")
    flops = dict(zip(("forward", "train"), core.count_flops(height, width, args.batch)))
    say("measuring the device's matmul rate")
    mm_rate = core.matmul_rate(autocast or dtype, device)
    mm = core.matmul_fn(autocast or dtype, device)

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": core.device_name(device),
        "torch": torch.__version__,
        "batch": args.batch, "height": height, "width": width, "dtype": args.dtype,
        "warmup": args.warmup, "repeats": args.repeats,
        "model_gflop": {m: f / 1e9 for m, f in flops.items()},
        "models": {n: {"description": core.DESCRIPTIONS[n]} for n in names},
    }

    for mode in modes:
        fns = {}
        for n, model in models.items():
            # Training mode for both modes (the model has no dropout or batch norm, so the math is the
            # same): in eval mode nn.MultiheadAttention takes its native fast path, which on CPU does not
            # use SDPA and would make the "SDPA baseline" slower than it is.
            model.train(True)
            fns[n] = (core.forward_fn(model, x, t, autocast) if mode == "forward"
                      else core.train_fn(model, x, t, noise, autocast))
        if "fast_unet_tuned" in fns:
            from fast_unet import tuning

            say(f"fast_unet_tuned: first {mode} call (tuning)")
            before, keys, t0 = tuning.seconds, tuning.tuned, time.perf_counter()
            fns["fast_unet_tuned"]()
            core._sync(device)
            result.setdefault("tuning", {"cache": tuning.cache_path()})[mode] = {
                "first_call_s": time.perf_counter() - t0, "timing_s": tuning.seconds - before,
                "keys": tuning.tuned - keys}
        say(f"timing {mode}")
        times, rate = core.time_interleaved(fns, device, args.warmup, args.repeats, progress=say, rate=mm)
        mm_rate = max(mm_rate, rate)
        for n, ts in times.items():
            med = statistics.median(ts)
            result["models"][n][mode] = {
                "median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "max_ms": max(ts) * 1e3,
                "gflops": flops[mode] / med / 1e9,
            }
        if args.memory:
            for n in names:
                if n == "compiled":
                    continue  # compiling again in a child would dominate the run; memory as baseline's graph
                if autocast is not None:
                    result["models"][n][mode]["peak_error"] = "not measured under autocast"
                    continue
                say(f"peak memory: {n} {mode} (fresh process)")
                peak, err = core.measure_memory(n, mode, args.batch, height, width, args.dtype, device)
                result["models"][n][mode]["peak_mib"] = None if peak is None else peak / 2**20
                if err:
                    result["models"][n][mode]["peak_error"] = err
    # The best matmul rate over every sample of the run (before it, and one per timing round).
    result["matmul_gflops"] = mm_rate / 1e9
    result["matmul_samples"] = 5 + len(modes) * args.repeats
    for mode in modes:
        for n in names:
            result["models"][n][mode]["of_matmul_rate"] = result["models"][n][mode]["gflops"] * 1e9 / mm_rate
    if "fast_unet" in names:
        from fast_unet import dispatch

        result["fast_unet_backends"] = dict(dispatch.last_choice)
    for mode in modes:
        for n in names:
            r = result["models"][n][mode]
            for other in ("reference", "baseline", "fast_unet"):
                if other == "fast_unet" and n != "fast_unet_tuned":
                    continue
                if other in names:
                    r[f"speedup_vs_{other}"] = result["models"][other][mode]["median_ms"] / r["median_ms"]
                    p, q = r.get("peak_mib"), result["models"][other][mode].get("peak_mib")
                    if p and q:
                        r[f"memory_vs_{other}"] = p / q
    return result


def kernel_counts(args, height, width, device):
    """(counts, None) from ``python -m bench.kernels`` at the benchmark's batch, size and dtype, or
    (None, why not). A fresh process: on the CPU the Triton kernels are counted under TRITON_INTERPRET=1,
    which has to be set before kernels/ is imported."""
    out_dir = os.path.dirname(os.path.abspath(args.json)) if args.json else tempfile.mkdtemp(prefix="bench_")
    path = os.path.join(out_dir, "kernels.json")
    cmd = [sys.executable, "-m", "bench.kernels", "--batch", str(args.batch), "--size", f"{height}x{width}",
           "--dtype", args.dtype, "--device", device, "--json", path, "--summary", "--quiet", "--no-launch-list"]
    env = dict(os.environ)
    if torch.device(device).type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    except OSError as e:
        return None, str(e)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return None, lines[-1] if lines else f"python -m bench.kernels exited with {proc.returncode}"
    with open(path) as f:
        data = json.load(f)
    counts = {}
    for name, r in data["models"].items():
        if "unavailable" in r:
            counts[name] = {"unavailable": r["unavailable"]}
            continue
        counts[name] = {step: {k: r[step][k] for k in ("launches", "triton", "torch", "read_bytes",
                                                       "written_bytes", "bytes_vs_baseline") if k in r[step]}
                        for step in ("forward", "train")}
        if "cuda_profiler" in r:
            counts[name]["cuda_profiler"] = {k: r["cuda_profiler"][k] for k in ("forward", "train")}
    return {"json": path, "caveat": data["caveat"], "models": counts}, None


def kernel_table(result):
    k = result.get("kernel_counts")
    if k is None:
        return f"Kernel launches: not counted ({result.get('kernel_counts_error', 'skipped')})"
    lines = ["Kernel launches (python -m bench.kernels; training step = forward + MSE loss + backward, no "
             "optimizer step; fast_unet = Triton launches + the aten ops outside them):", "",
             "| model | forward launches | training-step launches | forward MB moved | bytes vs baseline |",
             "|---|---:|---:|---:|---:|"]
    for name, r in k["models"].items():
        if "unavailable" in r:
            lines.append(f"| {name} | unavailable: {r['unavailable']} | | | |")
            continue
        f, t = r["forward"], r["train"]
        ratio = f.get("bytes_vs_baseline")
        moved = (f["read_bytes"] + f["written_bytes"]) / 1e6
        lines.append(f"| {name} | {f['launches']} | {t['launches']} | {moved:,.1f} | "
                     f"{'-' if ratio is None else format(ratio, '.3f')} |")
    lines += ["", f"Note: {k['caveat']}. Per kernel: {k['json']}."]
    return "\n".join(lines)


def _tuning_lines(result):
    """The tuned model against the untuned one, and what its tuning cost."""
    tune = result.get("tuning")
    if not tune:
        return []
    lines = []
    for mode in ("forward", "train"):
        if mode not in tune:
            continue
        r, s = tune[mode], result["models"]["fast_unet_tuned"][mode]
        vs = s.get("speedup_vs_fast_unet")
        lines.append(f"fast_unet_tuned {mode}: first call {r['first_call_s']:.2f} s, of which {r['timing_s']:.2f} s "
                     f"timing backends ({r['keys']} op keys measured); then "
                     + (f"{vs:.3f}x the untuned fast_unet" if vs else f"{s['median_ms']:.1f} ms"))
    lines.append(f"tuned choices: {tune['cache']} (python -m fast_unet.info lists them)")
    return lines


def table(result):
    lines = [
        f"fast_unet benchmark: {result['device']}, torch {result['torch']}",
        f"B={result['batch']}, {result['height']}x{result['width']}, {result['dtype']}; medians of {result['repeats']} "
        f"interleaved runs after {result['warmup']} warm-up; model {result['model_gflop']['forward']:.1f} GFLOP forward, "
        f"{result['model_gflop']['train']:.1f} GFLOP training step; best measured {result['dtype']} "
        f"matmul rate {result['matmul_gflops']:.0f} GFLOP/s (fastest of {result['matmul_samples']} 2048^3 torch.mm, "
        f"one per timing round, interleaved with the models)",
        f"fast_unet ran its ops on: {result.get('fast_unet_backends', '-')}",
        *_tuning_lines(result),
        "",
        "| model | mode | median ms | vs reference | vs baseline | GFLOP/s | of best matmul rate | peak MiB | memory vs reference |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in ("forward", "train"):
        for n, r in result["models"].items():
            if mode not in r:
                continue
            s = r[mode]
            fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
            lines.append(
                f"| {n} | {mode} | {s['median_ms']:.1f} | {fmt(s.get('speedup_vs_reference'), '.2f')}x | "
                f"{fmt(s.get('speedup_vs_baseline'), '.2f')}x | {s['gflops']:.1f} | {s['of_matmul_rate'] * 100:.1f}% | "
                f"{fmt(s.get('peak_mib'), '.0f')} | {fmt(s.get('memory_vs_reference'), '.3f')} |"
            )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", default="64", help="resolution: 64 or HxW (multiples of 8)")
    p.add_argument("--dtype", default="float32", choices=sorted(core.DTYPES) + sorted(core.AUTOCAST),
                   help="the models' dtype, or autocast-DTYPE: float32 models under torch.autocast")
    p.add_argument("--tune", action="store_true", help="add fast_unet_tuned: fast_unet with measured dispatch "
                   "(fast_unet.tune(True)), tuned in this run; report the time tuning took")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--models", default="reference,baseline,fast_unet",
                   help=f"comma-separated, from {','.join(core.MODELS)}")
    p.add_argument("--modes", default="forward,train", help="comma-separated: forward,train")
    p.add_argument("--compile", action="store_true", help="add torch.compile of the baseline (slow to compile)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    p.add_argument("--no-kernel-count", dest="kernel_count", action="store_false",
                   help="skip the kernel-launch counts (python -m bench.kernels)")
    p.add_argument("--json", default=os.path.join("bench_results", "latest.json"), help="where to write the JSON")
    p.add_argument("--quiet", action="store_true")
    g = p.add_argument_group("sweep (--sweep; python -m bench.sweep's docstring)")
    g.add_argument("--sweep", action="store_true", help="instead: time and peak memory over sizes and batches, "
                   "JSON and PNG plots")
    g.add_argument("--sizes", default=None, help="sweep sizes, e.g. 32,64,128,48x80 (default: 32,64,128,48x80 on "
                   "a CPU, 32,64,128,256,48x80 on a GPU), at the first of --batches")
    g.add_argument("--batches", default=None, help="sweep batches, e.g. 1,4,16 (default: 1,4,16 on a CPU, "
                   "1,4,16,64 on a GPU), at --sweep-size")
    g.add_argument("--sweep-size", default="64", help="the resolution of the batch sweep")
    g.add_argument("--cell-limit", type=float, default=None, help="seconds one step of one cell may take "
                   "(default 120 on a CPU, 60 on a GPU); past it the cell is reported as 'time limit'")
    g.add_argument("--mem-limit-gib", type=float, default=8.0, help="CPU: the address space one step may add "
                   "(default 8); past it the cell is reported as 'out of memory'")
    g.add_argument("--plots", default="bench_results", help="where the sweep's PNGs go ('' for none)")
    g.add_argument("--no-roofline", dest="roofline", action="store_false", help="GPU: no roofline plot")
    p.add_argument("--sample", action="store_true", help="instead: sampling (1000-step DDPM, 50-step DDIM) and "
                   "training throughput at B=16, 64x64 (python -m bench.sample, which takes more options)")
    p.add_argument("--loop", action="store_true", help="instead: the training CLI's step against a bare forward + "
                   "backward + optimizer step of the same model, interleaved, at the CLI's defaults (B=16, 32x32; "
                   "python -m bench.loop, which takes more options)")
    p.add_argument("--precisions", action="store_true", help="instead: baseline and fast_unet in float32, under bf16 "
                   "autocast and cast to bf16, side by side in one run (python -m bench.precision; --tune adds the "
                   "tuned fast_unet; --batch, --size, --modes (default forward), --threads apply)")
    p.add_argument("--threads", type=int, default=None, help="--loop, --precisions: CPU threads (default: torch's)")
    args = p.parse_args(argv)
    if args.precisions:
        from . import precision

        given = argv if argv is not None else sys.argv[1:]
        return precision.main(
            ["--batch", str(args.batch), "--size", args.size]
            + (["--modes", args.modes] if "--modes" in given else [])
            + (["--device", args.device] if args.device else []) + (["--tune"] if args.tune else [])
            + (["--threads", str(args.threads)] if args.threads else [])
            + ["--warmup", str(args.warmup), "--repeats", str(args.repeats)] + (["--quiet"] if args.quiet else []))
    if args.loop:
        from . import loop

        return loop.main((["--device", args.device] if args.device else [])
                         + (["--threads", str(args.threads)] if args.threads else []))
    if args.sample:
        from . import sample

        return sample.main((["--device", args.device] if args.device else []) + (["--compile"] if args.compile else []))
    if args.sweep:
        from . import sweep

        if args.dtype in core.AUTOCAST:
            p.error("--sweep takes the models' dtype (float32, bfloat16, float16), not autocast")
        if args.tune and "fast_unet_tuned" not in args.models.split(","):
            args.models += ",fast_unet_tuned"
        if "fast_unet_tuned" in args.models.split(",") and not os.environ.get("FAST_UNET_CACHE_DIR"):
            # an empty cache, so that the sweep measures the tuning (not the user's cache of earlier runs)
            os.environ["FAST_UNET_CACHE_DIR"] = tempfile.mkdtemp(prefix="fast_unet_tune_")

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.cell_limit is None:
            args.cell_limit = 60.0 if torch.device(device).type == "cuda" else 120.0
        if "--warmup" not in (argv or sys.argv):
            args.warmup = 2 if torch.device(device).type == "cpu" else 3
        if "--repeats" not in (argv or sys.argv):
            args.repeats = 3 if torch.device(device).type == "cpu" else 10
        return sweep.main(args, _progress(args.quiet))
    if args.batch < 1:
        p.error("--batch must be >= 1")
    result = run(args)
    if args.kernel_count and args.dtype in core.AUTOCAST:
        args.kernel_count = False  # python -m bench.kernels counts a model cast to a dtype
    if args.kernel_count:
        _progress(args.quiet)("counting kernel launches (python -m bench.kernels)")
        height, width = core.parse_size(args.size)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        counts, why = kernel_counts(args, height, width, device)
        result["kernel_counts"] = counts
        if why:
            result["kernel_counts_error"] = why
    text = table(result)
    if args.kernel_count:
        text += "\n\n" + kernel_table(result)
    print(text)
    if args.json:
        core.write_json(args.json, {**result, "table": text}, indent=2)
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
