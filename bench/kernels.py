"""``python -m bench.kernels``: how many kernels fast_unet and the eager models launch, and the bytes
each kernel reads and writes, without timing anything.

Run: ``python -m bench.kernels`` (B=64, 64x64, bfloat16; per-kernel tables), ``--summary`` for the
summary alone, ``--batch/--size/--dtype/--variants`` to choose; no GPU needed.

What is counted, per model:
- one forward (``torch.no_grad``, as the benchmark times it) and one training step: forward, MSE loss,
  backward; the optimizer step is NOT included;
- fast_unet (``FAST_UNET_BACKEND=triton``; plus
  each variant's switches, such as ``fast_unet+unfused``: the fused ops on their eager twins): every Triton launch (``TritonRecorder``, which hooks ``kernel[grid](...)``
  for any Triton kernel, so new kernels are counted with no change here) plus every kernel-launching
  aten op that still runs outside the Triton kernels (``OpCounter``, a TorchDispatchMode: eager convs,
  cats, copies, the matmuls, the torch ops inside the launchers and the autograd glue);
- the eager baseline (the reference with ``need_weights=False``, SDPA) and the reference: the
  kernel-launching aten ops, on the meta device.

Without a GPU (this file's main path) fast_unet runs on CPU tensors under ``TRITON_INTERPRET=1`` in
*dry* mode: Triton launches are recorded and skipped, and every other compute op is evaluated on the meta
device for its output's shape and strides, its output allocated (uninitialised) with ``torch.empty``.
Nothing is computed, so B=64 costs what B=1 does. Values are garbage; nothing in the model depends on
them.

Bytes per launch: bench/traffic.py (compulsory traffic; for a Triton kernel the read/written split comes
from the ``WRITES`` / ``UPDATES`` its module declares; a written argument counts whole even when the
kernel writes part of it). The recorders: bench/recorder.py. FLOPs and exponentials per launch:
bench/work.py; their time at an H200's ceilings: ``python -m bench.estimate``.

The eager counts are a lower bound on its CUDA launches: one aten op can be several kernels (a cuDNN
conv and its bias add, native_group_norm's two kernels, a split-K GEMM's reduction), so ratios against
the baseline are conservative. On a CUDA machine ``--device cuda`` (the default there) adds the real
launch counts, from torch.profiler's CUDA kernel events (``cuda_kernel_counts``).
"""
import argparse
import contextlib
import os
import sys
from collections import OrderedDict
from dataclasses import asdict

import torch
import torch.nn.functional as F

from .core import DTYPES, write_json
# The pieces live by concern; their names stay importable from here (tests and older scripts use them).
from .recorder import (OpCounter, TritonRecorder, _kernel_function, declared_writes,  # noqa: F401
                       fused_sdpa_on_meta, kernel_name)
from .traffic import BYTES_NOTE, CAVEAT, Launch, Touched, Trace, group, summarise, touched  # noqa: F401

DEFAULT_VARIANTS = ("baseline", "reference", "fast_unet", "fast_unet+unfused")
# The fused ops on their eager twins (which run their pieces on Triton): fast_unet without its fusions.
UNFUSED = "triton,conv3x3=eager,gn_relu_maxpool=eager,upsample2x=eager,gn_ln_linear=eager,mlp_residual=eager"
DESCRIPTIONS = {
    "baseline": "fair eager baseline: the reference with need_weights=False (SDPA); aten ops on meta",
    "reference": "the seed's UNet (MultiheadAttention with need_weights=True); aten ops on meta",
    "fast_unet": "fast_unet.UNet, FAST_UNET_BACKEND=triton: Triton launches + the aten ops outside them",
}

# ---------------------------------------------------------------------------------------------------
# Models and variants

def parse_variant(spec):
    """'fast_unet+ENV=VALUE' -> ('fast_unet', {'ENV': 'VALUE'}); 'fast_unet+unfused' sets
    FAST_UNET_BACKEND to ``UNFUSED``."""
    name, *settings = spec.split("+")
    if name not in ("baseline", "reference", "fast_unet"):
        raise ValueError(f"unknown model {name!r} in variant {spec!r}; expected baseline, reference or "
                         f"fast_unet[+ENV=VALUE...]")
    if settings and name != "fast_unet":
        raise ValueError(f"{spec!r}: only fast_unet variants take ENV=VALUE settings")
    env = {}
    for s in settings:
        if s == "unfused":
            env["FAST_UNET_BACKEND"] = UNFUSED
            continue
        if "=" not in s:
            raise ValueError(f"{spec!r}: expected ENV=VALUE after '+', got {s!r}")
        k, v = s.split("=", 1)
        env[k] = v
    return name, env


@contextlib.contextmanager
def fast_unet_env(settings):
    """FAST_UNET_BACKEND=triton, then ``settings``; restored after. (dispatch reads it at each call.)"""
    saved = {k: v for k, v in os.environ.items() if k.startswith("FAST_UNET_")}
    os.environ["FAST_UNET_BACKEND"] = "triton"
    os.environ.update(settings)
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.startswith("FAST_UNET_")]:
            del os.environ[k]
        os.environ.update(saved)


def _inputs(batch, height, width, dtype, device):
    x = torch.empty(batch, 3, height, width, dtype=dtype, device=device)
    noise = torch.empty_like(x)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    if device.type != "meta":
        g = torch.Generator().manual_seed(0)
        x.copy_(torch.randn(x.shape, generator=g))
        noise.copy_(torch.randn(x.shape, generator=g))
        t.copy_(torch.randint(0, 1000, (batch,), generator=g))
    return x, t, noise


def build(name, height, width, dtype, device):
    """The model on ``device`` in ``dtype``, training mode (as the benchmark runs it)."""
    from fast_unet import UNet
    from fast_unet.reference import cast_reference, make_reference

    torch.manual_seed(0)
    with torch.device(device):
        if name == "fast_unet":
            model = UNet().to(dtype)
        else:
            model = cast_reference(make_reference(height, width, need_weights=(name == "reference")), dtype)
    return model.train(True)


def forward_step(model, x, t, noise):
    with torch.no_grad():
        model(x, t)


def train_step(model, x, t, noise):
    """Forward, MSE loss, backward; no optimizer step."""
    model.zero_grad(set_to_none=True)
    F.mse_loss(model(x, t), noise).backward()


STEPS = {"forward": forward_step, "train": train_step}


_WARM = set()


def warm_up(model, height, width, dtype, device):
    """One forward and one training step at B=1 before counting, Triton launches skipped, aten ops run
    for real: one-time work (the time embedding's frequency table, cached per device) stays out of the
    count, as after the benchmark's warm-up, and what it caches holds real values, not dry-mode ones.
    Once per process for each size, dtype, device and FAST_UNET_* setting."""
    key = (height, width, dtype, str(device), tuple(sorted((k, v) for k, v in os.environ.items()
                                                           if k.startswith("FAST_UNET_"))))
    if key in _WARM:
        return
    _WARM.add(key)
    x, t, noise = _inputs(1, height, width, dtype, device)
    with TritonRecorder(Trace(), dry=True):
        for fn in STEPS.values():
            fn(model, x, t, noise)
    model.zero_grad(set_to_none=True)


def trace_step(name, step, batch, height, width, dtype, device, env=None, dry=True):
    """The Trace of one ``step`` ("forward" or "train") of model ``name``.

    Eager models run on ``device`` (meta: nothing computed); fast_unet on ``device`` (cpu needs
    TRITON_INTERPRET=1 before kernels/ is imported) with ``dry`` Triton launches and aten ops."""
    device = torch.device(device)
    x, t, noise = _inputs(batch, height, width, dtype, device)
    trace = Trace()
    if name == "fast_unet":
        with fast_unet_env(env or {}):
            model = build(name, height, width, dtype, device)
            warm_up(model, height, width, dtype, device)
            with TritonRecorder(trace, dry=dry), OpCounter(trace, device, dry=dry):
                STEPS[step](model, x, t, noise)
    else:
        model = build(name, height, width, dtype, device)
        with fused_sdpa_on_meta(dtype), OpCounter(trace, device, dry=dry):
            STEPS[step](model, x, t, noise)
    return trace


def analyse(variant, batch, height, width, dtype, device):
    """{"forward": {...}, "train": {...}} for one variant: summary, grouped rows and every launch."""
    name, env = parse_variant(variant)
    dev = "meta" if name != "fast_unet" else device
    out = {"model": name, "env": env, "device": str(dev)}
    for step in STEPS:
        trace = trace_step(name, step, batch, height, width, dtype, dev, env)
        out[step] = {**summarise(trace), "kernels": group(trace.launches),
                     "launch_list": [asdict(x) for x in trace.launches]}
    return out


def fast_unet_unavailable(device):
    """Why fast_unet cannot be counted here (None: it can)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"Triton is not installed ({e})"
    if torch.device(device).type == "cpu":
        from fast_unet.kernels import _common
        if not _common.INTERPRET:
            return "kernels/ was imported before TRITON_INTERPRET=1 was set (needed to run on CPU tensors)"
    return None


# ---------------------------------------------------------------------------------------------------
# On a CUDA machine: the real launches (torch.profiler), kept apart from the analysis above

def cuda_kernel_counts(variant, batch, height, width, dtype):
    """{"forward": n, "train": n, "names": {...}}: CUDA kernel events of one step each, after a warm-up
    step (autotuning, cuDNN algorithm search and lazy initialisation stay out). Memcpy/Memset excluded."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    name, env = parse_variant(variant)
    device = torch.device("cuda")
    ctx = fast_unet_env(env) if name == "fast_unet" else contextlib.nullcontext()
    result = {}
    with ctx:
        model = build(name, height, width, dtype, device)
        x, t, noise = _inputs(batch, height, width, dtype, device)
        for step, fn in STEPS.items():
            fn(model, x, t, noise)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn(model, x, t, noise)
                torch.cuda.synchronize()
            names = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA
                     and not e.name.startswith(("Memcpy", "Memset"))]
            result[step] = len(names)
            result[f"{step}_names"] = dict(sorted(((n, names.count(n)) for n in set(names)),
                                                  key=lambda kv: -kv[1]))
    return result


# ---------------------------------------------------------------------------------------------------
# Report

def run(variants, batch, height, width, dtype_name, device, say=lambda m: None):
    dtype = DTYPES[dtype_name]
    result = {"batch": batch, "height": height, "width": width, "dtype": dtype_name, "device": str(device),
              "training_step": "forward + MSE loss + backward; optimizer step not included",
              "caveat": CAVEAT, "bytes": BYTES_NOTE, "models": OrderedDict()}
    why = fast_unet_unavailable(device)
    for v in variants:
        name, _ = parse_variant(v)
        if name == "fast_unet" and why:
            result["models"][v] = {"model": name, "unavailable": why}
            continue
        say(f"tracing {v}")
        try:
            result["models"][v] = analyse(v, batch, height, width, dtype, device)
        except Exception as e:  # report it, keep the other models
            result["models"][v] = {"model": name, "unavailable": f"{type(e).__name__}: {e}"}
        if torch.device(device).type == "cuda" and "unavailable" not in result["models"][v]:
            say(f"profiling {v} on CUDA")
            result["models"][v]["cuda_profiler"] = cuda_kernel_counts(v, batch, height, width, dtype)
    base = result["models"].get("baseline")
    if base and "forward" in base:
        for r in result["models"].values():
            for step in STEPS:
                if step in r:
                    s, b = r[step], base[step]
                    s["launches_vs_baseline"] = s["launches"] / b["launches"]
                    s["bytes_vs_baseline"] = ((s["read_bytes"] + s["written_bytes"])
                                              / (b["read_bytes"] + b["written_bytes"]))
    return result


def _mb(n):
    return f"{n / 1e6:,.1f}"


def summary_table(result):
    lines = [
        f"Kernel launches and forward memory traffic: B={result['batch']}, {result['height']}x{result['width']}, "
        f"{result['dtype']}; training step = {result['training_step']}",
        "",
        "| model | forward launches (Triton + torch) | training-step launches (Triton + torch) | "
        "forward MB read | MB written | MB total | bytes vs baseline |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v, r in result["models"].items():
        if "unavailable" in r:
            lines.append(f"| {v} | unavailable: {r['unavailable']} | | | | | |")
            continue
        f, t = r["forward"], r["train"]
        def split(s):
            return f"{s['launches']} ({s['triton']} + {s['torch']})" if s["triton"] else str(s["launches"])
        ratio = f.get("bytes_vs_baseline")
        lines.append(f"| {v} | {split(f)} | {split(t)} | {_mb(f['read_bytes'])} | {_mb(f['written_bytes'])} | "
                     f"{_mb(f['read_bytes'] + f['written_bytes'])} | "
                     f"{'-' if ratio is None else format(ratio, '.3f')} |")
    cuda = [(v, r["cuda_profiler"]) for v, r in result["models"].items() if "cuda_profiler" in r]
    if cuda:
        lines += ["", "CUDA kernel launches measured with torch.profiler (after one warm-up step):", ""]
        lines += [f"- {v}: forward {c['forward']}, training step {c['train']}" for v, c in cuda]
    lines += ["", f"Note: {result['caveat']}.", f"Note: {result['bytes']}."]
    return "\n".join(lines)


def kernel_table(v, r, step="forward"):
    s = r[step]
    lines = [f"{v}, {step}: {s['launches']} launches, {_mb(s['read_bytes'])} MB read, "
             f"{_mb(s['written_bytes'])} MB written",
             "", "| kernel / op | kind | calls | MB read / call | MB written / call | MB read | MB written |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for k in s["kernels"]:
        mark = "" if k["declared"] else " (writes undeclared: all counted as reads)"
        lines.append(f"| {k['name']}{mark} | {k['kind']} | {k['calls']} | {_mb(k['read_per_call'])} | "
                     f"{_mb(k['written_per_call'])} | {_mb(k['read'])} | {_mb(k['written'])} |")
    for n in s["notes"]:
        lines.append(f"note: {n}")
    return "\n".join(lines)


def full_report(result):
    parts = [summary_table(result)]
    for v, r in result["models"].items():
        if "forward" in r:
            parts.append(kernel_table(v, r))
    return "\n\n".join(parts)


def parse_size(text):
    parts = str(text).lower().split("x")
    parts = parts * 2 if len(parts) == 1 else parts
    return tuple(int(p) for p in parts)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", default="64", help="resolution: 64 or HxW (multiples of 8)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated: baseline, reference, fast_unet, fast_unet+ENV=VALUE[+ENV=VALUE...]")
    p.add_argument("--device", default=None, help="where fast_unet runs: cuda (real launches counted too) "
                   "or cpu (Triton interpreter, dry); default cuda when available")
    p.add_argument("--json", default=os.path.join("bench_results", "kernels.json"), help="'' for none")
    p.add_argument("--summary", action="store_true", help="print only the summary table")
    p.add_argument("--no-launch-list", dest="launch_list", action="store_false",
                   help="leave the per-launch list out of the JSON")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and "fast_unet.kernels._common" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels/ is imported, so triton.jit sees it
    h, w = parse_size(args.size)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        try:
            parse_variant(v)
        except ValueError as e:
            p.error(str(e))
    say = (lambda m: None) if args.quiet else (lambda m: print(f"[bench.kernels] {m}", file=sys.stderr, flush=True))
    result = run(variants, args.batch, h, w, args.dtype, device, say)
    text = summary_table(result) if args.summary else full_report(result)
    print(text)
    if args.json:
        if not args.launch_list:
            for r in result["models"].values():
                for step in STEPS:
                    r.get(step, {}).pop("launch_list", None)
        write_json(args.json, {**result, "table": text})
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
