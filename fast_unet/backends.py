"""Whether each compiled backend loads, and the checks every op of a backend shares.

- ``triton``: the kernels of ``fast_unet.kernels`` (the repository's ``kernels/`` folder), loaded when
  ``fast_unet.ops`` is imported; they run on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before they
  were imported (Triton's interpreter, for tests). ``kernel_module(name)`` imports one of them.
- ``ext``: the compiled extension ``fast_unet._C`` (``csrc/``). A missing or broken build is one
  RuntimeWarning and a reason, never an ImportError.
- ``eager``: always there.
"""
import contextlib
import functools
import importlib
import os
import warnings

import torch

_errors = {}
_loaded = set()

# --- triton -------------------------------------------------------------------------------------------


_KERNEL_MODULES = {}


def _load_triton():
    import pkgutil

    try:
        package = importlib.import_module("fast_unet.kernels")
        for info in pkgutil.iter_modules(package.__path__):  # _common first: it imports triton
            name = info.name
            _KERNEL_MODULES[name] = importlib.import_module(f"fast_unet.kernels.{name}")
        if _KERNEL_MODULES["_common"].INTERPRET:
            _skip_nested_language_patches()
    except ImportError as e:
        return f"Triton is not available (cannot import {e.name or 'triton'!r}: {e})"
    except Exception as e:  # a broken install must not break fast_unet: warn once, fall back
        warnings.warn(f"fast_unet: triton backend disabled: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=4)
        return f"Triton failed to load: {type(e).__name__}: {e}"
    return None


def _skip_nested_language_patches():
    """Under Triton's interpreter, a launch patches ``triton.language`` for the host (``_patch_lang``: an
    ``inspect.getmembers`` scan of tl, tl.tensor and tl.math, about 2 ms) and undoes it when the grid is
    done; Triton 3.8 runs the same scan again on every call of a ``@triton.jit`` helper inside the kernel,
    where it changes nothing (the builtins it patches are already patched, the rest is set to equal
    functions): about a fifth of a whole-model run under the interpreter. While a launch's patches are in place,
    a helper that sees only language modules already patched in that launch (``triton.language``, and
    ``triton.language.core`` once a helper of Triton's own such as ``tl.sum`` patched it) skips the scan;
    everything else goes to Triton's own ``_patch_lang``. Returns False (and changes nothing) on a Triton
    without it."""
    import sys

    import triton.language as tl
    try:
        from triton.runtime import interpreter
        real = interpreter._patch_lang
        launch = interpreter.GridExecutor.__call__.__code__
    except (ImportError, AttributeError):
        return False
    if getattr(real, "fast_unet_skips_nested", False):
        return True
    patched = []  # per launch in progress: ids of the language modules it patched

    def langs(fn):
        return frozenset(id(v) for v in fn.__globals__.values() if v is tl or v is tl.core)

    class _Nothing:
        def restore(self):
            pass

    def patch_lang(fn):
        if sys._getframe(1).f_code is launch:
            scope = real(fn)
            patched.append(langs(fn))
            undo = scope.restore

            def restore():
                patched.pop()
                undo()
            scope.restore = restore
            return scope
        if not patched:  # a helper called outside any launch
            return real(fn)
        mine = langs(fn)
        if mine <= patched[-1]:
            return _Nothing()
        scope = real(fn)  # Triton never undoes a helper's patches: they hold for the rest of the launch
        patched[-1] = patched[-1] | mine
        return scope

    patch_lang.fast_unet_skips_nested = True
    interpreter._patch_lang = patch_lang
    return True


def kernel_module(name):
    """``fast_unet.kernels.<name>``: every kernel module is imported when the triton backend first loads."""
    load_error("triton")
    return _KERNEL_MODULES[name]


def kernel_modules():
    """Every kernel module of ``fast_unet.kernels`` (not the helpers whose names start with ``_``), in name
    order; each declares its kernels' ``WRITES`` and ``aot_builds()``. Empty when Triton does not load."""
    load_error("triton")
    return [m for name, m in sorted(_KERNEL_MODULES.items()) if not name.startswith("_")]


def interpreter_tiles():
    """[(module, attribute, value)]: the tile tables that the kernel modules offer (``interpreter_tiles()``)
    for runs under Triton's interpreter that check the wiring (tests/interpret, ``scripts/gpu_check.py
    --dry``): one large tile per small sample, since the interpreter's cost is per program and loop
    iteration. Setting each attribute to its value swaps them in; every real config is tested in tests/ops.

    Under the interpreter, one more: its check of every int32 add, sub and mul for overflow (redone in int64,
    about a quarter of a whole-model run) is turned off. The GPU builds have no such check; tests/ops runs
    every kernel with it, at shapes larger than the wiring runs' 16x16."""
    out = [(m, name, value) for m in kernel_modules() if hasattr(m, "interpreter_tiles")
           for name, value in m.interpreter_tiles().items()]
    if triton_interpreting():
        import dataclasses

        from triton.runtime import interpreter
        builder = interpreter.interpreter_builder
        out.append((builder, "options", dataclasses.replace(builder.options, sanitize_overflow=False)))
    return out


def triton_interpreting():
    """True when the Triton kernels run on CPU tensors (TRITON_INTERPRET=1 when they were imported)."""
    return load_error("triton") is None and kernel_module("_common").INTERPRET


def triton_devices():
    """The device types the Triton kernels run on here."""
    return ("cuda", "cpu") if triton_interpreting() else ("cuda",)


def triton_device_reasons(**tensors):
    """Why the Triton kernels cannot run on these tensors' devices (empty list: they can). One reason per
    cause, naming every tensor it concerns."""
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    by_type = {}
    for name, dev in devices.items():
        by_type.setdefault(dev.type, []).append(name)
    out = []
    for dev_type, names in by_type.items():
        who = ", ".join(names) + (" is" if len(names) == 1 else " are")
        if dev_type == "cuda":
            continue
        if dev_type == "cpu":
            if os.environ.get("TRITON_INTERPRET", "0") != "1":
                out.append(f"{who} on the CPU and TRITON_INTERPRET is not 1 (the Triton kernels need a CUDA "
                           f"device, or the Triton interpreter for CPU tensors)")
            elif not triton_interpreting():
                out.append(f"{who} on the CPU but the Triton kernels were imported before TRITON_INTERPRET=1 was set")
            continue
        out.append(f"{who} on {dev_type}; the Triton kernels run on CUDA (or on the CPU under TRITON_INTERPRET=1)")
    if len(set(devices.values())) > 1:
        out.append("tensors are on different devices: " + ", ".join(f"{n} on {d}" for n, d in devices.items()))
    return out


def device_guard(device):
    """The context every Triton launch runs in: ``device`` made the current CUDA device (Triton launches on
    the current device), nothing for a CPU tensor under the interpreter."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def on_tensor_device(fn):
    """Runs ``fn``, a Triton custom op's implementation, under ``device_guard`` of its first tensor
    argument's device: a model on ``cuda:1`` launches on cuda:1 whatever the current device is. Every
    Triton custom op of ``fast_unet.ops`` is wrapped by it."""
    @functools.wraps(fn)
    def guarded(*args):
        for a in args:
            if isinstance(a, torch.Tensor):
                with device_guard(a.device):
                    return fn(*args)
        return fn(*args)

    return guarded


def triton_reasons(check, tensors, *args):
    """``triton_device_reasons(**tensors)``, or, when the devices suit, the message of ``check(*args)`` (a
    kernel module's ``check_*`` function) if it raises ValueError or TypeError."""
    out = triton_device_reasons(**tensors)
    if out:
        return out
    try:
        check(*args)
    except (ValueError, TypeError) as e:
        out.append(str(e))
    return out


# --- ext ----------------------------------------------------------------------------------------------

_C = None
BUILD_INFO = {}


def _load_ext():
    global _C, BUILD_INFO
    try:
        from . import _C as c  # noqa: N812

        BUILD_INFO = dict(c.build_info())  # a stale _C without it counts as broken
        _C = c
    except Exception as e:  # ImportError, OSError (undefined symbol), ...: fall back, warn once
        reason = (f"fast_unet._C is not available ({type(e).__name__}: {e}); build it with "
                  f"`pip install --no-build-isolation -e .`")
        warnings.warn(f"fast_unet: ext backend disabled, eager fallback: {reason}", RuntimeWarning, stacklevel=4)
        return reason
    return None


def ext():
    """The compiled extension module ``fast_unet._C``, or None when it does not load."""
    load_error("ext")
    return _C


def ext_cuda_built():
    return ext() is not None and bool(BUILD_INFO.get("cuda"))


def build_info():
    """How ``_C`` was built ({} when it is not): CUDA archs, CPU ISA, torch version."""
    load_error("ext")
    return dict(BUILD_INFO)


# ------------------------------------------------------------------------------------------------------

_LOADERS = {"triton": _load_triton, "ext": _load_ext}


def load_error(backend):
    """None when ``backend`` loads (trying once), else the reason it does not."""
    if backend not in _loaded and backend in _LOADERS:
        _loaded.add(backend)
        _errors[backend] = _LOADERS[backend]()
    return _errors.get(backend)
