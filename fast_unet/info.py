"""``python -m fast_unet.info [--json]``: versions, the build, each backend and why one is not available, and
per op every backend's state and the backend that runs it for a CPU and for a CUDA input; then the measured
dispatch's switch, its cache file and the choices on file (``fast_unet/tuning.py``).
``--compile ARCHS``: the ahead-of-time compile report of the Triton kernels (fast_unet/aot.py)."""
import argparse
import json
import os
import platform
import sys


def device_name(device):
    """The GPU's name, or the CPU's model name and torch's thread count."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


def _runs_on(op, device_type):
    """The backend ``auto`` gives ``op`` for an input on ``device_type`` that every backend serving that
    device can take: the first in priority order that loads, implements the op and serves the device."""
    from . import dispatch

    return next(b for b in dispatch.PRIORITY if b == "eager" or dispatch.serves(op, b, device_type))


def collect():
    import torch

    from . import __version__, backends, dispatch, tuning

    info = {
        "fast_unet": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": device_name("cuda" if torch.cuda.is_available() else "cpu"),
        "triton": None,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        dispatch.ENV_VAR: os.environ.get(dispatch.ENV_VAR, "auto"),
        "backends": {},
        "ops": {},
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    for backend, err in dispatch.backend_status().items():
        info["backends"][backend] = {"loaded": err is None, "reason": err}
    build = backends.build_info()
    info["build"] = {"ext": backends.ext() is not None, "reason": backends.load_error("ext"),
                     "archs": build.get("cuda_archs") or None, "cpu_isa": build.get("cpu_isa"),
                     "cpu_march": build.get("cpu_march"), "torch": build.get("torch"),
                     "cpu_bf16_attention": build.get("cpu_bf16_attention")}
    for op in dispatch.OPS:
        info["ops"][op] = {
            "backends": {b: dispatch.unavailable(op, b) or "available" for b in dispatch.PRIORITY},
            "runs_on": {"cpu": _runs_on(op, "cpu"), "cuda": _runs_on(op, "cuda")},
        }
    info["tuning"] = {"enabled": tuning.enabled(), "cache": tuning.cache_path(), "choices": tuning.choices()}
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fast_unet.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--compile", metavar="ARCHS", help="compile every Triton kernel config ahead of time for "
                        "these archs (e.g. sm_80,sm_90) and report registers, spills, shared memory, tensor cores "
                        "and the SASS of each inner loop (instructions, exponentials, tensor-core instructions per "
                        "iteration and per 1,024 scores or tile elements)")
    parser.add_argument("--kernel", action="append", help="with --compile: only this kernel (repeatable)")
    parser.add_argument("--kernels", metavar="SUBSTRINGS", help="with --compile: only kernels whose label "
                        "contains one of these comma-separated substrings (e.g. attn or attn_fwd,conv)")
    parser.add_argument("--config", metavar="SUBSTRINGS", help="with --compile: only configs whose label contains "
                        "one of these comma-separated substrings (e.g. 'bfloat16 d=16')")
    parser.add_argument("--ci", action="store_true", help="with --compile: only CI's set, one build per kernel, "
                        "dtype kind, tile and body (fast_unet/aot.py, ci_builds)")
    parser.add_argument("--no-loops", action="store_true", help="with --compile: registers, spills, shared memory "
                        "and tensor cores only, without the SASS of the inner loops")
    parser.add_argument("--jobs", type=int, help="with --compile: worker processes (default: one per CPU)")
    parser.add_argument("--record", metavar="PATH", help="with --compile of every build: write the report's "
                        "record (summary, per kernel most registers and shared memory, the kernel sources' key) "
                        "to PATH; CI checks that docs/compile_report.json is current")
    args = parser.parse_args(argv)
    if args.record and (args.kernel or args.kernels or args.config or args.ci):
        parser.error("--record takes the full report: no --kernel, --kernels, --config or --ci")
    if args.compile:
        from . import aot

        split = (lambda text: [t for t in text.split(",") if t] if text else None)
        rows = aot.report(aot.parse_archs(args.compile), args.kernel, match=split(args.kernels),
                          configs=split(args.config), jobs=args.jobs, ci=args.ci, loops=not args.no_loops)
        print(json.dumps(rows, indent=1) if args.json else aot.format_table(rows))
        bad = [r for r in rows if r.get("error") or r.get("spill_bytes")]
        for r in bad:  # CI runs this: a compile error or a spill fails it
            print(f"FAIL {r['kernel']} {r['config']} {r['arch']}: "
                  f"{r.get('error') or str(r['spill_bytes']) + ' bytes spilled'}", file=sys.stderr)
        if not args.json:  # the JSON stays one document; the table ends with the summary line
            print(aot.summary_line(rows))
        if args.record and not bad:
            aot.write_record(rows, aot.parse_archs(args.compile), args.record)
        return 1 if bad else 0
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key not in ("backends", "build", "ops", "tuning"):
            print(f"{key:>18}: {value}")
    build = info["build"]
    if build["ext"]:
        print(f"{'ext (_C)':>18}: built; CUDA archs: {build['archs'] or 'none (CPU-only build)'}; "
              f"CPU ISA: {build['cpu_isa']} (-march={build['cpu_march']}); torch {build['torch']}; "
              f"CPU bf16 attention: {build['cpu_bf16_attention'] or '-'}")
    else:
        print(f"{'ext (_C)':>18}: not built: {build['reason']}")
    print("\nbackends (auto tries them in this order):")
    for backend, b in info["backends"].items():
        print(f"  {backend}: {'loaded' if b['loaded'] else 'not available: ' + str(b['reason'])}")
    print("\nops: the backend auto picks for a CPU and for a CUDA input it can take (a backend that cannot take "
          "an input steps aside: fast_unet.dispatch.explain(op, *args) says why), then each backend's state")
    width = max(len(op) for op in info["ops"])
    for op, o in info["ops"].items():
        print(f"  {op:<{width}}  cpu: {o['runs_on']['cpu']:<6}  cuda: {o['runs_on']['cuda']:<6}")
        for backend, state in o["backends"].items():
            print(f"  {'':<{width}}    {backend}: {state}")
    tune = info["tuning"]
    print(f"\nmeasured dispatch (fast_unet.tune / FAST_UNET_TUNE): {'on' if tune['enabled'] else 'off'}; "
          f"choices on file: {tune['cache']}")
    if not tune["choices"]:
        print("  none")
    for device, entries in tune["choices"].items():
        print(f"  {device}")
        for key, entry in sorted(entries.items()):
            ms = ", ".join(f"{b} {v:.3g} ms" for b, v in sorted(entry.get("ms", {}).items(), key=lambda kv: kv[1]))
            rule = entry.get("rule")
            again = ", ".join(f"{b} {v:.3g} ms" for b, v in sorted(entry.get("confirm_ms", {}).items(),
                                                                  key=lambda kv: kv[1]))
            print(f"    {key}: {entry.get('backend')}" + (f" (rule: {rule})" if rule else "") + (f"; {ms}" if ms else "")
                  + (f"; again: {again}" if again else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
