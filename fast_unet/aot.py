"""Ahead-of-time compile report: every Triton kernel, in every config its launcher can pick, for GPUs
that are not here (``python -m fast_unet.info --compile sm_80,sm_90 [--json]``).

Each build is ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` with the
signature the launcher's call produces at the model's shapes (pointers 16-byte aligned, the attention's
``stride_d == 1`` specialised as the JIT does). Registers and spills (STACK > 0) come from
``cuobjdump --dump-resource-usage`` on the cubin, shared memory from the kernel's metadata, tensor
cores from the PTX (``wgmma`` / ``mma.sync``). TRITON_INTERPRET must be unset: the interpreter's
kernels cannot be compiled.

The inner loop of each build that has one (fast_unet/sass.py: the SASS of the cubin, ``cuobjdump -sass``;
the hot loop is the innermost loop with the most tensor-core instructions, see its docstring): the
instructions of one iteration (per warp), its ``MUFU.EX2`` and tensor-core instructions, and the same
as warp instructions per 1,024 units of the work one iteration covers (x num_warps x 1024 / units):
scores for attention (BLOCK_M x BLOCK_N), otherwise the tile elements of the loop, the product of the
build's ``BLOCK_*`` constexprs unless the module's ``AOT_LOOP_TILES`` names the loop's own
(``loop_tile``). Builds without a loop (no backward branch in their PTX) are not disassembled.

The builds come from the kernel modules: each module of ``fast_unet.kernels`` declares ``aot_builds()``
and the signature hints of its kernels (``AOT_FP32_POINTERS``, ``AOT_FLOAT_ARGS``, ``AOT_ALIGNED_INTS``;
see kernels/__init__.py; a bf16/fp16 build with its (C,) parameters in float32, as under autocast, sets
their types in the option ``arg_types``: ``_common.with_fp32_params``; a build whose launches pass some of
the ``AOT_ALIGNED_INTS`` unaligned names them in the option ``unaligned_ints``); ``builds()`` concatenates them.

The ``triton.compile`` call form used here is the one that works on Triton 3.6, 3.8 and 3.9; keep
every use of it in ``compile_one``.
"""
import concurrent.futures
import hashlib
import importlib
import json
import os
import re
import subprocess
import tempfile

TRITON_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def kernel_modules():
    """The kernel modules of ``fast_unet.kernels`` (``backends.kernel_modules``), in name order. Each declares
    ``aot_builds()`` and its signature hints (kernels/__init__.py)."""
    from fast_unet import backends

    if backends.load_error("triton"):
        raise RuntimeError(f"the compile report needs the Triton kernels: {backends.load_error('triton')}")
    return backends.kernel_modules()


def builds():
    """[(kernel label, jit fn, config label, dtype name, constexprs, options)] for every launchable config:
    the ``aot_builds()`` of every kernel module, concatenated."""
    out = []
    for module in kernel_modules():
        if not callable(getattr(module, "aot_builds", None)):
            raise AttributeError(f"{module.__name__} declares no aot_builds() (see kernels/__init__.py)")
        out += module.aot_builds()
    return out


def _hints(fn):
    """(float32 pointers, float args, aligned ints): the signature hints of the module ``fn`` is defined in."""
    module = importlib.import_module(getattr(fn, "fn", fn).__module__)
    return tuple(frozenset(getattr(module, name, ())) for name in
                 ("AOT_FP32_POINTERS", "AOT_FLOAT_ARGS", "AOT_ALIGNED_INTS"))


def _signature(fn, dtype, constexprs, arg_types):
    """Triton's signature for a build: constexprs; pointers ``*fp32`` if the module lists them in
    ``AOT_FP32_POINTERS``, else the build's dtype; scalars ``fp32`` if in ``AOT_FLOAT_ARGS``, else ``i32``;
    ``arg_types`` (from the build's options) overrides any of them."""
    fp32_pointers, float_args, _ = _hints(fn)
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in arg_types:
            sig[name] = arg_types[name]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in fp32_pointers else "*" + TRITON_DTYPE[dtype]
        elif name in float_args:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _cuobjdump():
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def compile_one(fn, dtype, constexprs, options, arch):
    """Compile one build for ``sm_<arch>``; returns (compiled kernel, signature)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = dict(options)
    sig = _signature(fn, dtype, constexprs, options.pop("arg_types", {}))
    aligned_ints = _hints(fn)[2] - frozenset(options.pop("unaligned_ints", ()))
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
               if sig[n] != "constexpr" and (sig[n].startswith("*") or n in aligned_ints)}
    target = GPUTarget("cuda", arch, 32)
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned)
        return triton.compile(src, target=target, options=options)
    except Exception:  # an attrs form this Triton does not take: compile without the alignment hints
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        return triton.compile(src, target=target, options=options)


def resources(kernel):
    """{regs, spill_bytes, shared_bytes, tensor_cores} of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{text}")
    ptx = kernel.asm["ptx"]
    tc = [name for name, pat in (("wgmma", r"\bwgmma\."), ("mma", r"\bmma\.sync\.")) if re.search(pat, ptx)]
    return {"regs": int(m.group(1)), "spill_bytes": int(m.group(2)), "shared_bytes": int(kernel.metadata.shared),
            "tensor_cores": "+".join(tc) if tc else "no"}


def loop_tile(fn, constexprs):
    """(units of work one iteration of ``fn``'s inner loop covers, their name) for a build's constexprs.
    A module may declare ``AOT_LOOP_TILES = {kernel function name: ((constexpr names), unit)}``: the
    product of those constexprs, in that unit (a GEMM's K loop: BLOCK_M x BLOCK_N x BLOCK_K "MACs").
    Otherwise the product of every ``BLOCK_*`` constexpr, in "scores" for the attention module's kernels
    (BLOCK_M x BLOCK_N: the query x key tile) and "elements" for the others."""
    f = getattr(fn, "fn", fn)
    module = importlib.import_module(f.__module__)
    declared = getattr(module, "AOT_LOOP_TILES", {}).get(f.__name__)
    if declared:
        names, unit = declared
    else:
        names = sorted(k for k in constexprs if k.startswith("BLOCK_"))
        unit = "scores" if module.__name__.rsplit(".", 1)[-1] == "attention" else "elements"
    units = 1
    for n in names:
        units *= int(constexprs[n])
    return units, unit


LOOP_KEYS = ("loop_insts", "loop_ex2", "loop_tc", "loop_units", "loop_unit", "insts_per_1k", "ex2_per_1k",
             "tc_per_1k", "loop_ops")


def loop_columns(kernel, fn, constexprs, options):
    """The inner-loop columns of one compiled build (see the module docstring): ``loop_insts``, ``loop_ex2``,
    ``loop_tc`` per iteration per warp; ``loop_units`` and ``loop_unit`` (the work of one iteration);
    ``insts_per_1k``, ``ex2_per_1k``, ``tc_per_1k`` (warp instructions per 1,024 units); ``loop_ops``
    (opcode family -> count in the loop). All None for a build without a loop."""
    from . import sass

    out = dict.fromkeys(LOOP_KEYS)
    if not sass.ptx_has_loop(kernel.asm["ptx"]):
        return out
    lp = sass.kernel_loop(kernel.asm["cubin"])
    if lp is None:
        return out
    units, unit = loop_tile(fn, constexprs)
    warps = int(options.get("num_warps", 4))
    per = sass.per_units(lp, warps, units)
    out.update(loop_insts=lp["insts"], loop_ex2=lp["ex2"], loop_tc=lp["tensor_core"], loop_units=units,
               loop_unit=unit, insts_per_1k=round(per["insts"], 1), ex2_per_1k=round(per["ex2"], 1),
               tc_per_1k=round(per["tensor_core"], 2), loop_ops=lp["ops"])
    return out


def analyse(fn, dtype, constexprs, options, arch, loops=True):
    """Compile one build and return its report columns: ``resources`` and ``loop_columns`` (all None without
    ``loops``). It raises nothing: a build that does not compile gives None resources and ``error``; a loop
    analysis that fails keeps the resources and gives ``error`` (one failing build must not hide the others)."""
    try:
        kernel = compile_one(fn, dtype, constexprs, options, arch)
        row = resources(kernel)
    except Exception as e:
        return dict(regs=None, spill_bytes=None, shared_bytes=None, tensor_cores=None, **_error(e),
                    **dict.fromkeys(LOOP_KEYS))
    try:
        row.update(loop_columns(kernel, fn, constexprs, options) if loops else dict.fromkeys(LOOP_KEYS))
    except Exception as e:
        row.update(_error(e), **dict.fromkeys(LOOP_KEYS))
    return row


def select(all_builds, kernels=None, match=None, configs=None):
    """The builds whose kernel label is in ``kernels`` (exact labels), contains one of the substrings
    ``match``, and whose config label contains one of the substrings ``configs`` (each filter None: any)."""
    out = []
    for b in all_builds:
        if kernels and b[0] not in kernels:
            continue
        if match and not any(m in b[0] for m in match):
            continue
        if configs and not any(c in b[2] for c in configs):
            continue
        out.append(b)
    return out


def parse_archs(text):
    """"sm_80,sm_90" -> [80, 90]."""
    archs = []
    for part in text.split(","):
        part = part.strip().lower()
        m = re.fullmatch(r"(?:sm_?)?(\d+)a?", part)
        if not m:
            raise ValueError(f"--compile takes archs like sm_80,sm_90; got {part!r}")
        archs.append(int(m.group(1)))
    return archs


# The CI set (``ci_builds``): per kernel, dtype kind (float32; bfloat16 and float16 together: the same tiles
# and code with another element type), tile (the BLOCK_* and D constexprs, num_warps, num_stages) and the
# constexprs a module names in ``AOT_CI_FLAGS`` (those that select another body: the conv's input modes),
# one build: of the group's variants (split, tf32, unaligned or channels_last strides, ints at 1, ...) the one
# with the most of them (the longest config label), the one with the most to keep in registers.
TILE_CONSTEXPRS = ("D",)


def _ci_key(build):
    name, fn, label, dtype, ce, opts = build
    module = importlib.import_module(getattr(fn, "fn", fn).__module__)
    keep = set(getattr(module, "AOT_CI_FLAGS", ())) | set(TILE_CONSTEXPRS)
    tile = tuple(sorted((k, v) for k, v in ce.items() if k.startswith("BLOCK_") or k in keep))
    kind = "float32" if dtype == "float32" else "half"
    return name, kind, tile, opts.get("num_warps", 4), opts.get("num_stages", 3)


def ci_builds(all_builds):
    """The CI set of ``all_builds`` (see ``TILE_CONSTEXPRS``): one build per group, in build order; every kernel,
    dtype kind, tile and body of the full set is in it."""
    best = {}
    for i, b in enumerate(all_builds):
        key = _ci_key(b)
        if key not in best or len(b[2].split()) > len(all_builds[best[key]][2].split()):
            best[key] = i
    return [all_builds[i] for i in sorted(best.values())]


_WORKER_BUILDS = None


def _init_worker():
    global _WORKER_BUILDS
    _WORKER_BUILDS = {(b[0], b[2]): b for b in builds()}


def _build_row(task, index=None):
    """The report row of one (kernel label, config label, arch, loops) task (``analyse``)."""
    name, label, arch, loops = task
    _, fn, _, dtype, ce, opts = (index or _WORKER_BUILDS)[(name, label)]
    return {"kernel": name, "config": label, "arch": f"sm_{arch}", **analyse(fn, dtype, ce, opts, arch, loops)}


def report(archs, kernels=None, progress=None, match=None, configs=None, jobs=None, ci=False, loops=True):
    """One dict per (build, arch): kernel, config, arch, regs, spill_bytes, shared_bytes, tensor_cores and
    the inner-loop columns (``loop_columns``; None without ``loops``). ``kernels``: exact kernel labels;
    ``match``: substrings of kernel labels; ``configs``: substrings of config labels (``select``); ``ci``: only
    the CI set of those (``ci_builds``).

    The builds compile on ``jobs`` worker processes (default: one per CPU; ``triton.compile`` holds the
    GIL, so threads would not overlap them), each with its disassembly and loop analysis (``loop_columns``: a
    ``cuobjdump`` process per build); Triton's cache makes a repeat cheap. The rows come back in build
    order, each handed to ``progress`` as it does."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the compile report needs TRITON_INTERPRET unset (interpreted kernels cannot be compiled)")
    all_builds = builds()
    unknown = set(kernels or ()) - {b[0] for b in all_builds}
    if unknown:
        raise ValueError(f"unknown kernel(s) {sorted(unknown)}; known: {sorted({b[0] for b in all_builds})}")
    chosen = select(all_builds, kernels, match, configs)
    if ci:
        chosen = ci_builds(chosen)
    if not chosen:
        raise ValueError(f"no build matches kernels={kernels} match={match} configs={configs}; kernels: "
                         f"{sorted({b[0] for b in all_builds})}")
    tasks = [(b[0], b[2], arch, loops) for b in chosen for arch in archs]
    jobs = max(1, min(len(tasks), int(jobs or os.cpu_count() or 1)))
    rows = []
    if jobs == 1:
        index = {(b[0], b[2]): b for b in all_builds}
        results = (_build_row(t, index) for t in tasks)
        pool = None
    else:
        import multiprocessing

        pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=_init_worker)
        results = pool.map(_build_row, tasks)
    try:
        for row in results:
            rows.append(row)
            if progress:
                progress(row)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return rows


def _error(e):
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


TABLE_HEAD = ("kernel", "config", "arch", "regs", "spill_bytes", "shared_bytes", "tensor_cores", "loop_insts",
              "loop_ex2", "loop_tc", "insts_per_1k", "ex2_per_1k", "tc_per_1k", "loop_unit")


def _cell(r, k):
    if k == "regs" and r.get("error"):
        return "ERROR: " + r["error"]
    v = r.get(k)
    if v is None and k in LOOP_KEYS:
        return "-"
    return "" if v is None else str(v)


def format_table(rows):
    """The report as a Markdown table. The loop columns: instructions, ``MUFU.EX2`` and tensor-core
    instructions of one inner-loop iteration (per warp), then the same as warp instructions per 1,024
    units (``loop_unit``: scores or tile elements); "-" for a build without a loop."""
    head = TABLE_HEAD
    cells = [head] + [tuple(_cell(r, k) for k in head) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["| " + " | ".join(c[i].ljust(widths[i]) for i in range(len(head))) + " |" for c in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def counts(rows):
    """What a report's rows add up to: builds, kernel-configs, archs, builds that spill, builds with an error,
    the most registers of any build, builds that use tensor cores."""
    regs = [r["regs"] for r in rows if r.get("regs") is not None]
    return {"builds": len(rows), "configs": len({(r["kernel"], r["config"]) for r in rows}),
            "archs": len({r["arch"] for r in rows}), "spills": sum(1 for r in rows if r.get("spill_bytes")),
            "errors": sum(1 for r in rows if r.get("error")), "max_regs": max(regs) if regs else None,
            "tensor_cores": sum(1 for r in rows if r.get("tensor_cores") not in (None, "no"))}


def summary_line(rows):
    """One line for the end of a report (``counts``)."""
    c = counts(rows)
    return (f"compile report: {c['builds']} builds ({c['configs']} kernels-configs x {c['archs']} archs), "
            f"{c['spills']} spills, {c['errors']} errors, max regs {'-' if c['max_regs'] is None else c['max_regs']}, "
            f"tensor cores in {c['tensor_cores']}")


# The record of a full report (every build, both archs) that CI checks is current: CI compiles only its set
# (``ci_builds``); ``make compile-report-full`` compiles every build and writes this file.
RECORD = os.path.join("docs", "compile_report.json")


def sources_key():
    """SHA-256 of what a full report's outcome depends on: Triton's version and every file of the kernel
    package (``fast_unet.kernels``, the top-level kernels/)."""
    import triton

    package = importlib.import_module("fast_unet.kernels")
    h = hashlib.sha256(f"triton {triton.__version__}\n".encode())
    for folder in package.__path__:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(name.encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest()


def record(rows, archs):
    """The record of a full report: its summary line, counts, and per kernel its builds, most registers and
    shared memory, keyed by ``sources_key``."""
    import triton

    kernels = {}
    for r in rows:
        k = kernels.setdefault(r["kernel"], {"builds": 0, "max_regs": 0, "max_shared_bytes": 0})
        k["builds"] += 1
        k["max_regs"] = max(k["max_regs"], r.get("regs") or 0)
        k["max_shared_bytes"] = max(k["max_shared_bytes"], r.get("shared_bytes") or 0)
    c = counts(rows)
    return {"sources_key": sources_key(), "triton": triton.__version__, "archs": [f"sm_{a}" for a in archs],
            "builds": c["builds"], "spills": c["spills"], "errors": c["errors"], "summary": summary_line(rows),
            "kernels": kernels}


def write_record(rows, archs, path):
    """``record`` as JSON at ``path``, through ``fast_unet.files.atomic_write`` (a killed run keeps the old one)."""
    from .files import atomic_write

    text = json.dumps(record(rows, archs), indent=1) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
