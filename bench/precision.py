"""``python -m bench.precision`` (also ``python -m bench --precisions``): the fair eager baseline and fast_unet in
float32, under ``torch.autocast`` (bf16 on float32 weights, as mixed-precision training runs) and cast to bf16,
all timed side by side in one run, interleaved (each round runs every cell once, in turn).

The table gives each cell's median ms, its ratio to the baseline in the same precision, and fast_unet's ratio
to fast_unet in float32 (does turning on mixed precision make it faster?). ``--tune`` adds fast_unet with
measured dispatch (``fast_unet.tune(True)``) in each precision, tuned from an empty cache at its first call
(the time that took is reported), so tuned and untuned are compared in the same rounds.
"""
import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from . import core

PRECISIONS = ("float32", "autocast-bfloat16", "bfloat16")


def run(args, say):
    height, width = core.parse_size(args.size)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    precisions = [p for p in args.precisions.split(",") if p]
    for p in precisions:
        if p not in core.DTYPES and p not in core.AUTOCAST:
            raise SystemExit(f"--precisions: unknown {p!r}; expected some of {','.join(sorted(core.DTYPES) + sorted(core.AUTOCAST))}")
    names = ["baseline", "fast_unet"] + (["fast_unet_tuned"] if args.tune else [])
    modes = [m for m in args.modes.split(",") if m]
    if args.tune and not os.environ.get("FAST_UNET_CACHE_DIR"):
        os.environ["FAST_UNET_CACHE_DIR"] = tempfile.mkdtemp(prefix="fast_unet_tune_")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from fast_unet import UNet

    state = UNet().state_dict()
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": core.device_name(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "batch": args.batch, "height": height, "width": width, "warmup": args.warmup,
              "repeats": args.repeats, "cells": {}, "tuning": {}}
    for mode in modes:
        fns = {}
        for prec in precisions:
            dtype, autocast = core.parse_dtype(prec)
            x, t, noise = core.make_inputs(args.batch, height, width, dtype, device)
            for n in names:
                model = core.build_model(n, height, width, dtype, device, state).train(True)
                fn = (core.forward_fn(model, x, t, autocast) if mode == "forward"
                      else core.train_fn(model, x, t, noise, autocast))
                if n == "fast_unet_tuned":
                    from fast_unet import tuning

                    say(f"{n} {prec}: first {mode} call (tuning)")
                    before, t0 = tuning.seconds, time.perf_counter()
                    fn()
                    result["tuning"][f"{prec} {mode}"] = {"first_call_s": round(time.perf_counter() - t0, 3),
                                                         "timing_s": round(tuning.seconds - before, 3)}
                fns[f"{n} | {prec}"] = fn
        say(f"timing {mode}: {len(fns)} cells, {args.repeats} rounds")
        times = core.time_interleaved(fns, device, args.warmup, args.repeats, progress=say)
        for key, ts in times.items():
            n, prec = key.split(" | ")
            result["cells"].setdefault(mode, {}).setdefault(prec, {})[n] = {
                "median_ms": round(1e3 * statistics.median(ts), 3), "min_ms": round(1e3 * min(ts), 3)}
    for mode, precs in result["cells"].items():
        f32 = precs.get("float32", {}).get("fast_unet", {}).get("median_ms")
        for prec, row in precs.items():
            base = row["baseline"]["median_ms"]
            for n, c in row.items():
                c["vs_baseline"] = round(base / c["median_ms"], 3)
                if f32 and n != "baseline":
                    c["vs_fast_unet_float32"] = round(f32 / c["median_ms"], 3)
                if n == "fast_unet_tuned":
                    c["vs_untuned"] = round(row["fast_unet"]["median_ms"] / c["median_ms"], 3)
    return result


def table(result):
    lines = [f"fast_unet by precision: {result['device']}, torch {result['torch']}",
             f"B={result['batch']}, {result['height']}x{result['width']}; medians of {result['repeats']} interleaved "
             f"rounds after {result['warmup']} warm-up; every cell in the same rounds", "",
             "| mode | precision | model | median ms | vs baseline (same precision) | vs fast_unet float32 | vs untuned |",
             "|---|---|---|---:|---:|---:|---:|"]
    for mode, precs in result["cells"].items():
        for prec, row in precs.items():
            for n, c in row.items():
                lines.append(f"| {mode} | {prec} | {n} | {c['median_ms']:.1f} | {c['vs_baseline']:.2f}x | "
                             f"{format(c['vs_fast_unet_float32'], '.2f') + 'x' if 'vs_fast_unet_float32' in c else '-'} | "
                             f"{format(c['vs_untuned'], '.3f') + 'x' if 'vs_untuned' in c else '-'} |")
    for key, r in result["tuning"].items():
        lines.append(f"tuning, {key}: first call {r['first_call_s']:.2f} s, of which {r['timing_s']:.2f} s timing backends")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.precision", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", default="64", help="resolution: 64 or HxW (multiples of 8)")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated dtypes or autocast-DTYPE")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--modes", default="forward", help="comma-separated: forward,train")
    p.add_argument("--tune", action="store_true", help="add fast_unet with measured dispatch, tuned in this run")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default=os.path.join("bench_results", "precision.json"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    def say(msg):
        if not args.quiet:
            print(f"[bench.precision] {msg}", file=sys.stderr, flush=True)

    result = run(args, say)
    text = table(result)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({**result, "table": text}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
