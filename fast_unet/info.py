"""``python -m fast_unet.info``: versions, each backend, and why one is not available."""
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


def collect():
    import torch

    from . import __version__, dispatch

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
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    ext = {"built": False}
    try:
        from . import ext_ops

        ext = {"built": ext_ops._C is not None, **ext_ops.build_info()}
        if ext_ops.LOAD_ERROR:
            ext["reason"] = ext_ops.LOAD_ERROR
    except Exception as e:  # noqa: BLE001 - info must always print
        ext["reason"] = f"{type(e).__name__}: {e}"
    info["ext"] = ext
    for backend, err in dispatch.backend_status().items():
        info["backends"][backend] = {"loaded": err is None, "reason": err, "ops": {}}
        for op in dispatch.OPS:
            impl = dispatch._IMPLS[op].get(backend)
            info["backends"][backend]["ops"][op] = "available" if impl and not err else (err or f"no {backend} implementation yet")
    # the fused model paths, for a float32 input on this machine's default device
    probe = torch.empty(1, 3, 8, 8, device="cuda" if torch.cuda.is_available() else "cpu")
    try:
        info["fused"] = {path: ("runs" if not why else "off: " + "; ".join(why))
                         for path, why in dispatch.fused_paths(probe).items()}
    except ValueError as e:  # an invalid FAST_UNET_FUSED
        info["fused"] = {"error": str(e)}
    info[dispatch.FUSED_ENV] = os.environ.get(dispatch.FUSED_ENV, dispatch.FUSED_DEFAULT)
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fast_unet.info", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--compile", metavar="ARCHS", help="compile every Triton kernel config ahead of time for "
                        "these archs (e.g. sm_80,sm_90) and report registers, spills, shared memory, tensor cores")
    parser.add_argument("--kernel", action="append", help="with --compile: only this kernel (repeatable)")
    args = parser.parse_args(argv)
    if args.compile:
        from . import aot

        rows = aot.report(aot.parse_archs(args.compile), args.kernel)
        print(json.dumps(rows, indent=1) if args.json else aot.format_table(rows))
        bad = [r for r in rows if r.get("error") or r.get("spill_bytes")]
        for r in bad:  # CI runs this: a compile error or a spill fails it
            print(f"FAIL {r['kernel']} {r['config']} {r['arch']}: "
                  f"{r.get('error') or str(r['spill_bytes']) + ' bytes spilled'}", file=sys.stderr)
        if not args.json:  # the JSON stays one document; the table ends with the summary line
            print(aot.summary_line(rows))
        return 1 if bad else 0
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key not in ("backends", "ext", "fused"):
            print(f"{key:>18}: {value}")
    ext = info["ext"]
    if ext.get("built"):
        print(f"{'ext (_C)':>18}: built; CUDA archs: {ext.get('cuda_archs') or 'none (CPU-only build)'}; "
              f"CPU ISA: {ext.get('cpu_isa')} (-march={ext.get('cpu_march')}); torch {ext.get('torch')}")
    else:
        print(f"{'ext (_C)':>18}: not built: {ext.get('reason')}")
    print(f"\nfused model paths (FAST_UNET_FUSED={info['FAST_UNET_FUSED']}; for a {info['device']} input):")
    for path, state in info["fused"].items():
        print(f"  {path:<10} {state}")
    print("\nbackends (auto tries them in this order):")
    for backend, b in info["backends"].items():
        print(f"  {backend}: {'loaded' if b['loaded'] else 'not available: ' + str(b['reason'])}")
        for op, state in b["ops"].items():
            print(f"      {op:<16} {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
