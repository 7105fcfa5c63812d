"""``python -m bench.kernels``: how many kernels fast_unet and the eager models launch, and the bytes
each kernel reads and writes, without timing anything.

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

Bytes: the compulsory traffic of each launch: every distinct tensor it reads, once, at its view's size
(numel * element size; views of one storage together capped at the storage's size), and every tensor it
writes, once. Re-reads (from L2 or DRAM) are not counted: the conv's input re-read per output-channel
tile, attention's K/V re-read per query tile, a weight read by every program. For a Triton kernel the
read/written split comes from the ``WRITES`` / ``UPDATES`` that the module defining the kernel declares
(``declared_writes``); a written argument counts whole even when the kernel writes part of it
(attention's backward writes dqkv in two launches, a third and two thirds: its writes are over-counted
by one dqkv). For an aten op: its outputs and mutated arguments are written,
its other tensor arguments read; an in-place op's argument is read and written, except for pure
overwrites (copy_, fill_, zero_, ``out=``).

The eager counts are a lower bound on its CUDA launches: one aten op can be several kernels (a cuDNN
conv and its bias add, native_group_norm's two kernels, a split-K GEMM's reduction), so ratios against
the baseline are conservative. On a CUDA machine ``--device cuda`` (the default there) adds the real
launch counts, from torch.profiler's CUDA kernel events (``cuda_kernel_counts``).
"""
import argparse
import contextlib
import importlib
import json
import os
import sys
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

from .core import DTYPES

DEFAULT_VARIANTS = ("baseline", "reference", "fast_unet", "fast_unet+unfused")
# The fused ops on their eager twins (which run their pieces on Triton): fast_unet without its fusions.
UNFUSED = "triton,conv3x3=eager,gn_relu_maxpool=eager,upsample2x=eager,gn_ln_linear=eager"
DESCRIPTIONS = {
    "baseline": "fair eager baseline: the reference with need_weights=False (SDPA); aten ops on meta",
    "reference": "the seed's UNet (MultiheadAttention with need_weights=True); aten ops on meta",
    "fast_unet": "fast_unet.UNet, FAST_UNET_BACKEND=triton: Triton launches + the aten ops outside them",
}
CAVEAT = ("eager counts are aten ops that launch a kernel: a lower bound on CUDA launches (a cuDNN conv "
          "+ its bias add, native_group_norm's two kernels, split-K GEMM reductions are one op each), so "
          "ratios against the eager models are conservative")
BYTES_NOTE = ("bytes: compulsory traffic, each distinct tensor a launch touches once at its view's size "
              "(views of one storage capped at its size); re-reads from L2/DRAM (conv input per "
              "output-channel tile, attention K/V per query tile) are not counted; MB = 1e6 bytes")


# ---------------------------------------------------------------------------------------------------
# What one launch touched

@dataclass
class Touched:
    """One tensor a launch reads or writes (several argument names when one tensor was passed twice)."""
    names: list
    shape: list
    dtype: str
    bytes: int


@dataclass
class Launch:
    kind: str  # "triton" or "torch"
    name: str  # the kernel's function name, or the aten op ("aten.addmm.default")
    inside: str = None  # the fast_unet custom op whose implementation issued it, if any
    grid: list = None
    reads: list = field(default_factory=list)
    writes: list = field(default_factory=list)
    declared: bool = True  # Triton: the kernel's module declares its writes (WRITES / UPDATES)

    @property
    def read_bytes(self):
        return sum(t.bytes for t in self.reads)

    @property
    def write_bytes(self):
        return sum(t.bytes for t in self.writes)


def _storage_key(t):
    try:
        return t.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError):  # a tensor without storage (a subclass): its own identity
        return ("tensor", id(t))


def _storage_nbytes(t):
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def touched(named):
    """[(name, tensor)] -> [Touched]: identical views merged (their names joined), each storage's views
    together capped at the storage's size (an expanded or overlapping view costs at most the storage)."""
    views = OrderedDict()
    for name, t in named:
        key = (_storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in views:
            views[key][0].append(name)
        else:
            views[key] = ([name], t)
    left = {}  # storage -> bytes it can still account for
    out = []
    for (skey, *_), (names, t) in views.items():
        cap = left.setdefault(skey, _storage_nbytes(t))
        n = min(t.numel() * t.element_size(), cap)
        left[skey] = cap - n
        out.append(Touched(names, list(t.shape), str(t.dtype).replace("torch.", ""), n))
    return out


class Trace:
    """The launches of one run, in order, from both recorders; ``inside``: the custom-op stack."""

    def __init__(self):
        self.launches = []
        self.inside = []
        self.notes = set()

    def where(self):
        return self.inside[-1] if self.inside else None


# ---------------------------------------------------------------------------------------------------
# Triton launches

def _kernel_function(kernel):
    """The Python function under a JITFunction / InterpretedFunction / Autotuner / Heuristics."""
    f = kernel
    for _ in range(8):
        if callable(f) and hasattr(f, "__code__"):
            return f
        f = getattr(f, "fn", None)
    return None


def kernel_name(kernel):
    f = _kernel_function(kernel)
    return f.__name__ if f is not None else type(kernel).__name__


def declared_writes(kernel):
    """(writes, updates) of a Triton kernel, from the module its function is defined in: ``WRITES[name]``
    (the pointer arguments it only stores to; None when neither ``WRITES`` nor ``UPDATES`` of that
    module names the kernel) and ``UPDATES.get(name, set())`` (the arguments it loads and stores)."""
    f = _kernel_function(kernel)
    if f is None:
        return None, set()
    module = sys.modules.get(f.__module__)
    if module is None:
        try:
            module = importlib.import_module(f.__module__)
        except ImportError:
            return None, set()
    writes = getattr(module, "WRITES", {}).get(f.__name__)
    updates = getattr(module, "UPDATES", {}).get(f.__name__)
    if writes is None and updates is None:
        return None, set()
    return set(writes or ()), set(updates or ())


@contextlib.contextmanager
def TritonRecorder(trace, dry=False):
    """Record every ``kernel[grid](...)`` launch of any Triton kernel into ``trace``.

    Hooks ``triton.runtime.jit.KernelInterface.__getitem__``, the base of JITFunction (GPU),
    InterpretedFunction (TRITON_INTERPRET=1), Autotuner and Heuristics: one record per launch (an
    autotuner's benchmarking runs call ``run`` directly and are not launches of the model). ``dry``:
    skip the kernel (its outputs stay as allocated). A kernel that runs does so with the dispatch modes
    suspended, so the interpreter's own tensor work is not counted as torch ops.
    """
    from triton.runtime.jit import KernelInterface

    original = KernelInterface.__getitem__

    def getitem(kernel, grid):
        run = original(kernel, grid)

        def launch(*args, **kwargs):
            name = kernel_name(kernel)
            arg_names = list(getattr(kernel, "arg_names", []))
            named = [(arg_names[i] if i < len(arg_names) else f"arg{i}", a) for i, a in enumerate(args)]
            named += list(kwargs.items())
            tensors = []
            for n, a in named:
                base = getattr(a, "base", None)  # a TensorDescriptor: its base tensor
                if isinstance(a, torch.Tensor):
                    tensors.append((n, a))
                elif isinstance(base, torch.Tensor):
                    tensors.append((n, base))
            writes, updates = declared_writes(kernel)
            declared = writes is not None
            writes = set(writes or ()) | set(updates)
            reads, written = [], []
            for t in touched(tensors):
                is_w = any(n in writes for n in t.names)
                (written if is_w else reads).append(t)
                if any(n in updates for n in t.names):
                    reads.append(t)
            g = grid(dict(named)) if callable(grid) else grid
            trace.launches.append(Launch("triton", name, trace.where(), list(g) if g is not None else None,
                                         reads, written, declared))
            if dry:
                return None
            with _disable_current_modes():
                return run(*args, **kwargs)

        return launch

    KernelInterface.__getitem__ = getitem
    try:
        yield trace
    finally:
        KernelInterface.__getitem__ = original


# ---------------------------------------------------------------------------------------------------
# aten ops

_ALLOC = {"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided"}
# No kernel: aliasing and metadata ops (besides every op the schema marks as a view), device-to-host
# scalar reads (a memcpy, not a kernel).
_NO_KERNEL = {"detach", "detach_", "alias", "lift_fresh", "_unsafe_view", "_reshape_alias", "set_",
              "resize_", "_local_scalar_dense", "record_stream", "_version", "is_same_size"}
_OVERWRITE = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_",
              "index_put_", "masked_fill_", "_index_put_impl_"}


def _is_view(func):
    if getattr(func, "is_view", False):
        return True
    return any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)


def _op_base(func):
    return func._schema.name.split("::")[-1]


def _custom_impl(func):
    """The Python implementation of a ``torch.library.custom_op`` (None for any other op)."""
    try:
        from torch._library.custom_ops import _maybe_get_opdef
    except ImportError:  # pragma: no cover - older torch
        return None
    if func.namespace in ("aten", "prim", "prims"):
        return None
    opdef = _maybe_get_opdef(func)
    if opdef is None:
        return None
    fns = getattr(opdef, "_backend_fns", {}) or {}
    return fns.get(None) or getattr(opdef, "_init_fn", None)


class OpCounter(TorchDispatchMode):
    """Records every aten op that launches a kernel on ``device`` into ``trace``.

    Not counted: views and aliases, allocations (empty*, new_empty*), detach, scalar reads, ops whose
    outputs all land on another device (``.to("meta")`` in a reasons check, ``.cpu()``). Custom ops
    (``fast_unet::*``) are not counted themselves: their Python implementation runs with this mode
    pushed again, so the Triton launches inside reach the TritonRecorder and the torch ops inside (the
    launchers' contiguous copies, zeros, sums) are counted here, each once. (A plain ``func(*args)``
    would run the implementation with this mode popped: those torch ops would be missed.)

    ``dry``: compute ops are evaluated on fake tensors (shapes, strides, no data) and their outputs
    allocated (uninitialised) on ``device``; views and allocations run for real. Use with TritonRecorder(dry=True).
    """

    def __init__(self, trace, device, dry=False):
        super().__init__()
        self.trace = trace
        self.device = torch.device(device)
        self.dry = dry and self.device.type != "meta"
        self._fake = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = _custom_impl(func)
        if impl is not None:
            self.trace.inside.append(func._schema.name)
            try:
                with self:
                    return impl(*args, **kwargs)
            finally:
                self.trace.inside.pop()
        if func.namespace == "fast_unet":  # a compiled (C++) op: its insides are invisible here
            self.trace.notes.add(f"{func._schema.name}: a custom op without a Python implementation; its "
                                 f"kernels are not counted")
            return func(*args, **kwargs)
        base = _op_base(func)
        if base in _ALLOC or base in _NO_KERNEL or _is_view(func):
            return func(*args, **kwargs)
        out = self._dry_call(func, args, kwargs) if self.dry else func(*args, **kwargs)
        self._record(func, args, kwargs, out)
        return out

    def _dry_call(self, func, args, kwargs):
        """``func``'s outputs, uninitialised, with the shapes and strides the real op would give.

        Evaluated under a FakeTensorMode on the real device: plain meta tensors would lose the device,
        and meta's convolution, for one, returns NCHW for a channels_last input where the CPU and cuDNN
        kernels keep channels_last (the fake conv asks the backend's own memory-format rule)."""
        if self._fake is None:
            from torch._subclasses.fake_tensor import FakeTensorMode
            self._fake = FakeTensorMode()
        real = {}

        def to_fake(a):
            if isinstance(a, torch.Tensor):
                f = self._fake.from_tensor(a)
                real[id(f)] = a
                return f
            return a

        f_args, f_kwargs = tree_map(to_fake, (args, kwargs))
        try:
            with self._fake:
                f_out = func(*f_args, **f_kwargs)
        except Exception as e:  # no fake/meta kernel, or data-dependent output: run it for real
            self.trace.notes.add(f"{func}: ran for real in dry mode ({type(e).__name__})")
            return func(*args, **kwargs)

        def back(o):
            if isinstance(o, torch.Tensor):
                if id(o) in real:  # an in-place or out= op returns its (mutated) argument
                    return real[id(o)]
                return torch.empty_strided(o.shape, o.stride(), dtype=o.dtype, device=o.device)
            return o

        return tree_map(back, f_out)

    def _record(self, func, args, kwargs, out):
        schema = func._schema
        base = _op_base(func)
        reads, writes = [], []
        for i, arg in enumerate(schema.arguments):
            if i < len(args):
                value = args[i]
            elif arg.name in kwargs:
                value = kwargs[arg.name]
            else:
                continue
            ts = [v for v in tree_flatten(value)[0] if isinstance(v, torch.Tensor)]
            mutated = arg.alias_info is not None and arg.alias_info.is_write
            for t in ts:
                if mutated:
                    writes.append((arg.name, t))
                    if base not in _OVERWRITE and not arg.kwarg_only:
                        reads.append((arg.name, t))
                else:
                    reads.append((arg.name, t))
        written_ids = {id(t) for _, t in writes}
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        writes += [("out", t) for t in outs if id(t) not in written_ids]
        on_device = lambda ts: any(t.device.type == self.device.type for _, t in ts)  # noqa: E731
        if writes and not on_device(writes):
            return  # a copy to another device (a memcpy, or .to("meta") in a check): no kernel here
        if not writes and not on_device(reads):
            return
        self.trace.launches.append(Launch("torch", str(func), self.trace.where(), None,
                                          touched(reads), touched(writes)))


@contextlib.contextmanager
def fused_sdpa_on_meta(dtype):
    """On the meta device, F.scaled_dot_product_attention decomposes into its math (bmm, softmax, bmm,
    with float32 casts); on a GPU the eager baseline runs one fused kernel. Route meta calls to the op
    CUDA picks: flash attention for bf16/fp16, memory-efficient attention for float32 (one forward op,
    one backward op). Other devices keep PyTorch's own choice."""
    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if q.device.type != "meta" or attn_mask is not None or kw:
            return original(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **kw)
        if q.dtype in (torch.bfloat16, torch.float16):
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False,
                                                                      scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, dropout_p, is_causal,
                                                                      scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


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


# ---------------------------------------------------------------------------------------------------
# Summaries

def group(launches):
    """Rows per (kind, name): calls, bytes read and written (totals and per call)."""
    rows = OrderedDict()
    for ln in launches:
        r = rows.setdefault((ln.kind, ln.name), dict(kind=ln.kind, name=ln.name, calls=0, read=0, written=0,
                                                      declared=ln.declared))
        r["calls"] += 1
        r["read"] += ln.read_bytes
        r["written"] += ln.write_bytes
    out = sorted(rows.values(), key=lambda r: (r["kind"] != "triton", -(r["read"] + r["written"])))
    for r in out:
        r["read_per_call"] = r["read"] / r["calls"]
        r["written_per_call"] = r["written"] / r["calls"]
    return out


def summarise(trace):
    ls = trace.launches
    tri = [x for x in ls if x.kind == "triton"]
    return {
        "launches": len(ls), "triton": len(tri), "torch": len(ls) - len(tri),
        "read_bytes": sum(x.read_bytes for x in ls), "written_bytes": sum(x.write_bytes for x in ls),
        "undeclared_kernels": sorted({x.name for x in tri if not x.declared}),
        "notes": sorted(trace.notes),
    }


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
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({**result, "table": text}, f, indent=1)
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
