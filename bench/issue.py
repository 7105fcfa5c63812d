"""Instructions per inner-loop iteration of each Triton launch, for ``python -m bench.estimate``'s issue term.

A launch (bench/traffic.py ``Launch``: kernel name, constexprs and other arguments, tensor dtypes) is
matched to the build of the ahead-of-time compile report that the JIT would compile for it (``match``:
the same kernel, constexprs, num_warps / num_stages and pointer types; fast_unet/aot.py). That build's
loop columns for sm_90 (fast_unet/sass.py: the hot loop's instructions per iteration, per warp) come,
in this order, from:

1. ``cache``: a JSON file (``$FAST_UNET_CACHE_DIR`` or ``~/.cache/fast_unet``, ``loop_counts.json``),
   keyed by arch, kernel and config label and a fingerprint of the kernel sources (every file of
   ``fast_unet.kernels``), fast_unet/sass.py and Triton's version: a changed kernel is recompiled;
2. ``compiled``: the builds not in the cache, compiled in one subprocess with TRITON_INTERPRET removed
   (``python -m bench.issue``, which reads the build keys as JSON on stdin), then cached;
3. ``table``: ``FALLBACK`` below, where Triton cannot compile (not installed, or the compile failed):
   the attention kernels only, as read from this project's kernels before issue 18's trimmed loops.
   Stated in the estimate's output; other kernels then get no issue term.
"""
import hashlib
import importlib
import json
import os
import subprocess
import sys

ARCH = 90

# Warp instructions per 1,024 scores of the inner loop, sm_90, read with ``python -m fast_unet.info --compile
# sm_90 --kernels attn`` (Triton 3.8) from the EVEN_N builds: {(kernel function name, dtype name, head dim): per
# 1,024 scores}. ``_attn_bwd`` is the one-pass backward's figure (its deterministic dK/dV build, without
# the dQ GEMM and atomics, issues 275 / 273 / 295 on 64-key tiles). Used only when nothing can be compiled here; stale for
# kernels that changed since.
FALLBACK = {
    ("_attn_fwd", "bfloat16", 16): 223.0, ("_attn_bwd", "bfloat16", 16): 241.5,
    ("_attn_bwd_dq", "bfloat16", 16): 202.0,
    ("_attn_fwd", "bfloat16", 32): 236.0, ("_attn_bwd", "bfloat16", 32): 253.0,
    ("_attn_bwd_dq", "bfloat16", 32): 217.0,
    ("_attn_fwd", "bfloat16", 64): 224.5, ("_attn_bwd", "bfloat16", 64): 367.0,
    ("_attn_bwd_dq", "bfloat16", 64): 292.0,
}
FALLBACK_NOTE = ("instructions per iteration from bench/issue.py FALLBACK (sm_90 SASS of the attention kernels, "
                 "Triton 3.8): Triton could not compile here; kernels other than attention have no issue term")

_TORCH_TO_TRITON = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int64": "i64", "int32": "i32",
                    "int8": "i8", "uint8": "u8", "bool": "i1"}


def key(label, config, arch=ARCH):
    return f"sm_{arch}|{label}|{config}"


def _fn_name(fn):
    return getattr(getattr(fn, "fn", fn), "__name__", None)


def _builds():
    from fast_unet import aot

    return aot.builds()


def _module(fn):
    return importlib.import_module(getattr(fn, "fn", fn).__module__)


def match(name, args, dtypes, builds=None):
    """The build (kernel label, fn, config label, dtype, constexprs, options) of the compile report that a
    launch of kernel ``name`` compiles to, or None. ``args``: the launch's non-tensor arguments by name
    (constexprs, ints, num_warps, num_stages); ``dtypes``: {pointer argument: torch dtype name}.

    A build matches when its constexprs and warps/stages equal the launch's and each pointer's type (its
    signature, ``aot._signature``) is the tensor's; where only (C,) parameter pointers differ
    (``AOT_PARAM_POINTERS``: float32 or not), such a build is taken when no exact one exists. A build that
    marks an int argument a multiple of 16 (the module's ``AOT_ALIGNED_INTS`` less the build's option
    ``unaligned_ints``) is compiled as the JIT compiles launches that pass one there. The most specific
    build wins (an int specialised to 1 where the launch passes 1), then the one whose marks the launch
    breaks least often (``_misaligned``), then the one that marks the most ints aligned."""
    from fast_unet import aot

    builds = _builds() if builds is None else builds
    exact, near = [], []
    for b in builds:
        label, fn, config, dtype, ce, opts = b
        if _fn_name(fn) != name:
            continue
        if any(args.get(k) != v for k, v in ce.items()):
            continue
        if any(k in args and args[k] != opts[k] for k in ("num_warps", "num_stages") if k in opts):
            continue
        sig = aot._signature(fn, dtype, ce, opts.get("arg_types", {}))
        differ = {n for n, t in sig.items() if t.startswith("*") and n in dtypes
                  and t != "*" + _TORCH_TO_TRITON.get(dtypes[n], "?")}
        if differ - set(getattr(_module(fn), "AOT_PARAM_POINTERS", ())):
            continue  # another dtype's build
        (near if differ else exact).append(b)
    pick = exact or near
    return max(pick, key=lambda b: (len(b[4]), -_misaligned(b, args), -len(b[5].get("unaligned_ints", ())))) \
        if pick else None


def _misaligned(build, args):
    """How many of the ints ``build`` marks as multiples of 16 the launch passes as something else."""
    marked = set(getattr(_module(build[1]), "AOT_ALIGNED_INTS", ())) - set(build[5].get("unaligned_ints", ()))
    return sum(1 for n in marked if isinstance(args.get(n), int) and args[n] % 16)


def fingerprint():
    """A hash of what the loop counts depend on: the kernel sources, fast_unet/sass.py, Triton's version."""
    import fast_unet.kernels as k
    from fast_unet import sass

    h = hashlib.sha1()
    folder = os.path.dirname(k.__file__)
    for f in sorted(os.listdir(folder)):
        if f.endswith(".py"):
            with open(os.path.join(folder, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    with open(sass.__file__, "rb") as fh:
        h.update(fh.read())
    try:
        import triton

        h.update(triton.__version__.encode())
    except ImportError:
        h.update(b"no triton")
    return h.hexdigest()[:16]


def cache_path():
    folder = os.environ.get("FAST_UNET_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fast_unet")
    return os.path.join(folder, "loop_counts.json")


def _load_cache(fp):
    try:
        with open(cache_path()) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data.get(fp, {}) if isinstance(data, dict) else {}


def _save_cache(fp, entries):
    path = cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        data = {fp: {**data.get(fp, {}), **entries}}  # entries of older fingerprints are dropped
        tmp = path + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache: the counts are recomputed next time


_KEEP = ("loop_insts", "loop_ex2", "loop_tc", "loop_units", "loop_unit", "insts_per_1k", "ex2_per_1k",
         "regs", "spill_bytes")


def compile_counts(wanted, arch=ARCH, timeout=900):
    """{key: loop columns (None: no loop) or {"error": ...}} of the builds ``wanted`` ([(label, config)]),
    compiled in a subprocess without TRITON_INTERPRET. Raises RuntimeError when the subprocess fails."""
    import fast_unet

    root = os.path.dirname(os.path.dirname(os.path.abspath(fast_unet.__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "bench.issue", "--arch", str(arch)], input=json.dumps(wanted),
                          capture_output=True, text=True, env=env, cwd=root, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"python -m bench.issue failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compile_here(wanted, arch):
    """The body of ``python -m bench.issue``: compile each (label, config) and keep its loop columns."""
    from fast_unet import aot

    index = {(b[0], b[2]): b for b in aot.builds()}
    out = {}
    for label, config in wanted:
        b = index.get((label, config))
        if b is None:
            out[key(label, config, arch)] = {"error": "no such build"}
            continue
        row = aot.analyse(b[1], b[3], b[4], b[5], arch)  # a failing build gives its error, not an exception
        if row.get("error"):
            out[key(label, config, arch)] = {"error": row["error"]}
        else:
            out[key(label, config, arch)] = ({k: row[k] for k in _KEEP} if row["loop_insts"] is not None
                                             else {"loop_insts": None, "regs": row["regs"],
                                                   "spill_bytes": row["spill_bytes"]})
    return out


class LoopCounts:
    """Loop columns of builds, from the cache, a compile, or the fallback table (module docstring).
    ``mode``: "auto" (cache, then compile, then table), "table" (the table only), "off" (nothing).
    ``sources`` counts where the looked-up builds' numbers came from; ``notes`` says what went wrong."""

    def __init__(self, mode="auto", arch=ARCH, say=lambda m: None):
        self.mode, self.arch, self.say = mode, arch, say
        self.counts = {}  # key -> columns (loop_insts None: no loop) / {"error"}
        self.sources = {}  # key -> "cache" / "compiled" / "table"
        self.notes = set()
        self._fp = None
        self._builds = None

    def builds(self):
        """The compile report's builds; none where the Triton kernels cannot be loaded (said in ``notes``)."""
        if self._builds is None:
            try:
                self._builds = _builds()
            except (RuntimeError, ImportError) as e:
                self._builds = []
                self.notes.add(f"no loop counts: {str(e).splitlines()[0][:200]}")
        return self._builds

    def prepare(self, wanted):
        """Make the counts of ``wanted`` ([(label, config)]) available: cached ones read, the rest compiled
        in one subprocess (mode "auto")."""
        wanted = sorted(set(wanted))
        if self.mode != "auto" or not wanted:
            return
        if self._fp is None:
            self._fp = fingerprint()
            cached = _load_cache(self._fp)
            for k, v in cached.items():
                self.counts.setdefault(k, v)
                self.sources.setdefault(k, "cache")
        todo = [w for w in wanted if key(*w, self.arch) not in self.counts]
        if not todo:
            return
        self.say(f"compiling {len(todo)} Triton builds for sm_{self.arch} to count their loops' instructions")
        try:
            got = compile_counts(todo, self.arch)
        except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
            self.notes.add(f"the loop counts could not be compiled ({str(e).splitlines()[0][:200]}); "
                           + FALLBACK_NOTE)
            return
        good = {k: v for k, v in got.items() if "error" not in v}
        for k, v in got.items():
            if "error" in v:
                self.notes.add(f"{k}: {v['error'][:200]}")
        self.counts.update(good)
        self.sources.update({k: "compiled" for k in good})
        _save_cache(self._fp, good)

    def columns(self, build):
        """The loop columns of ``build`` (None: no loop or unknown), and where they came from."""
        if self.mode == "off" or build is None:
            return None, None
        k = key(build[0], build[2], self.arch)
        c = self.counts.get(k)
        if c is not None and "error" not in c:
            return (c if c.get("loop_insts") is not None else None), self.sources.get(k)
        fn_name, dtype, d = _fn_name(build[1]), build[3], build[4].get("D")
        per_1k = FALLBACK.get((fn_name, dtype, d))
        if per_1k is None:
            return None, None
        if self.mode == "table":
            self.notes.add(FALLBACK_NOTE.split(":")[0] + " (--issue table)")
        elif not any(n.endswith(FALLBACK_NOTE) for n in self.notes):
            self.notes.add(f"{k}: not compiled; " + FALLBACK_NOTE)
        warps = int(build[5].get("num_warps", 4))
        units = build[4]["BLOCK_M"] * build[4]["BLOCK_N"]
        return {"loop_insts": per_1k * units / 1024 / warps, "insts_per_1k": per_1k, "loop_units": units,
                "loop_unit": "scores"}, "table"

    def attention_builds(self, dtype, head_dim):
        """The attention module's builds at ``dtype`` and ``head_dim``, no int specialised to 1: the
        candidates for the best fast_unet attention kernel at that head dim (SDPA's floor)."""
        out = []
        for b in self.builds():
            module = _module(b[1])
            if not module.__name__.endswith(".attention") or b[3] != dtype or b[4].get("D") != head_dim:
                continue
            if any(b[4].get(k) == 1 for k in getattr(module, "AOT_ONE_INTS", ())):
                continue
            out.append(b)
        return out


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m bench.issue", description="compile the builds named on stdin "
                                "([[kernel label, config label], ...] as JSON) and print their loop columns")
    p.add_argument("--arch", type=int, default=ARCH)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("TRITON_INTERPRET=1: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    wanted = [tuple(w) for w in json.loads(sys.stdin.read() or "[]")]
    print(json.dumps(_compile_here(wanted, args.arch)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
