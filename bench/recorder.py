"""Recording what a step launches, without timing it: ``TritonRecorder`` (every ``kernel[grid](...)``
launch of any Triton kernel) and ``OpCounter`` (every kernel-launching aten op, a TorchDispatchMode),
both writing ``Launch`` records (bench/traffic.py) into one ``Trace``, each with its bytes, FLOPs and
exponentials (bench/work.py). ``dry`` mode records without computing (Triton launches skipped, aten ops
evaluated on fake tensors), so B=64 costs what B=1 does. Used by ``python -m bench.kernels`` and
``python -m bench.estimate``; tests: tests/interpret/test_kernel_count.py, tests/test_eager_kernel_count.py.
"""
import contextlib
import importlib
import sys

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

from . import work
from .traffic import Launch, touched

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
            g = list(g) if g is not None else None
            scalars = {n: a for n, a in named if isinstance(a, (bool, int, float)) and not isinstance(a, torch.Tensor)}
            flops, exps, unit, known = work.triton_work(name, dict(tensors), scalars)
            loop, l2 = work.triton_loop(name, dict(tensors), scalars, g)
            trace.launches.append(Launch("triton", name, trace.where(), g, reads, written, declared, flops, unit,
                                         exps, known, scalars, loop, l2))
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
        flops, exps, unit = work.aten_work(func, args, kwargs, out)
        self.trace.launches.append(Launch("torch", str(func), self.trace.where(), None,
                                          touched(reads), touched(writes), True, flops, unit, exps,
                                          loop=work.aten_loop(func, args)))


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
