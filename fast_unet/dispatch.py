"""The one place that decides which implementation of each op runs, op by op, input by input.

Backends, in priority order for ``auto``: ``triton`` (the kernels in ``fast_unet.kernels``), ``ext`` (the
compiled ``fast_unet._C``), ``eager`` (``fast_unet.eager``, always available). Each op module under
``fast_unet/ops/`` registers, per backend, an implementation and a ``reasons(*args) -> list[str]`` check
(empty: it can take these arguments). dispatch calls the check on every input: a backend that cannot take
an input steps aside for the next one.

``FAST_UNET_BACKEND`` chooses: a mode (``auto``, ``triton``, ``ext`` or ``eager``; default ``auto``), then
optionally per-op overrides ``op=backend``, comma-separated, e.g. ``auto,conv3x3=eager`` (every op as
usual, but the conv on its eager twin: an A/B switch for one fused op) or ``conv3x3=eager`` alone.

- A forced backend (a mode other than ``auto``, or an override) that cannot take an input raises a
  RuntimeError with its reasons instead of falling back.
- A mode that names a backend without an implementation of some op runs that op on ``eager``
  (``FAST_UNET_BACKEND=ext`` runs the extension's ops on the extension and the others on eager); an
  override that names such a backend is an error.

Autocast: in a ``torch.autocast`` region the compiled backends take the op's floating-point tensors of two
or more dimensions (activations, weight matrices) cast to the autocast dtype (float32 weights get their
gradients through the cast); 1-D tensors (the (C,) parameters: norm weights and biases, biases) stay as
they are, float32 on a float32 model, and every op takes them so (its kernels read them in float32 and
give their gradients in their dtype); so do the arguments an op declares with ``autocast_keep`` (float32
statistics, timesteps). Their reasons are asked of those cast arguments. ``eager`` takes the arguments as
they are and runs under autocast's own per-op rules, as the reference does. ``_cast`` is the one statement
of the cast (``autocast_args`` and ``register_autocast`` use it).

Measured dispatch (``fast_unet.tune(True)`` or ``FAST_UNET_TUNE=1``, off by default): in ``auto`` mode, for
an op that more than one backend can take, ``fast_unet.tuning`` times those backends once per key (op,
device, dtypes, shapes, layouts, autocast, grad) and the fastest runs; its choices persist in a small JSON
cache (see ``fast_unet/tuning.py``). A forced mode or an override is never measured: it wins.

``explain(op, *args)`` says why each backend would not take an input; ``python -m fast_unet.info`` says
which backends load, and which implementation each op has.
"""
import os

import torch

from . import backends, tuning

ENV_VAR = "FAST_UNET_BACKEND"
MODES = ("auto", "triton", "ext", "eager")
PRIORITY = ("triton", "ext", "eager")

OPS = []  # op names, in registration order (fast_unet.ops imports every op module)
_IMPLS = {}  # op -> backend -> (fn, reasons_fn)
last_choice = {}  # op -> the backend that ran it last (what the benchmark and info report)
_KEEP = {}  # op -> positions of the arguments autocast leaves as they are


def _no_reasons(*args, **kwargs):
    return []


def _all_devices():
    return None


def register(op, backend, fn, reasons=_no_reasons, devices=_all_devices):
    """Register ``fn`` as ``backend``'s implementation of ``op``; ``reasons(*args)`` lists why it cannot
    take those arguments (empty list: it can); ``devices()`` the device types it serves (None: any), for
    ``python -m fast_unet.info``. The first registration of a name creates the op."""
    if backend not in PRIORITY:
        raise ValueError(f"unknown backend {backend!r}; expected one of {PRIORITY}")
    if not isinstance(op, str) or not op.isidentifier():
        raise ValueError(f"op must be an identifier, got {op!r}")
    if op not in _IMPLS:
        _IMPLS[op] = {}
        OPS.append(op)
    _IMPLS[op][backend] = (fn, reasons)
    _DEVICES[(op, backend)] = devices


_DEVICES = {}


def autocast_keep(op, *positions):
    """Declare the positional arguments of ``op`` that autocast leaves in their dtype (float32 statistics,
    timesteps); every other floating-point tensor of two or more dimensions is cast (see ``_cast``)."""
    _KEEP[op] = frozenset(positions)


def autocast_dtype(args):
    """The autocast dtype that applies to these arguments (autocast is enabled for the device of the first
    floating-point tensor among them), or None."""
    for a in (x for a in args for x in (a if isinstance(a, (list, tuple)) else (a,))):  # lists of tensors too
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            dev = a.device.type
            if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
                return torch.get_autocast_dtype(dev)
            return None
    return None


def autocast_args(op, args, dtype):
    """``args`` as the compiled backends take them in an autocast region of ``dtype`` (``_cast``, with the
    positions ``autocast_keep`` declared for ``op`` kept)."""
    return _cast(args, _KEEP.get(op, ()), dtype)


def _casts(a):
    """True for the tensors autocast casts: floating point (float64 excepted, as autocast does) with two or
    more dimensions (activations, weight matrices). A 1-D tensor, a (C,) parameter (norm weight or bias, a
    bias), stays in its dtype: the kernels compute normalisations and epilogues in float32 anyway (as eager
    autocast runs group_norm and layer_norm in float32), and a float32 parameter gets a float32 gradient
    with no cast launch."""
    return isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != torch.float64 and a.dim() >= 2


def _cast(args, keep, dtype):
    """``args`` with every tensor ``_casts`` selects cast to ``dtype``, except the positions in ``keep``. A
    tensor already in ``dtype`` is passed through (no copy)."""
    def cast(a):
        if isinstance(a, (list, tuple)):  # a list of tensors (one per block): each cast alike
            return type(a)(cast(x) for x in a)
        return a.to(dtype) if _casts(a) else a

    return tuple(a if i in keep else cast(a) for i, a in enumerate(args))


_AUTOCAST_LIB = None


def register_autocast(custom_op, keep=(), devices=("cpu", "cuda")):
    """The same rule on a ``torch.library`` custom op, for a direct call of ``torch.ops.fast_unet.<op>`` and
    for ``torch.compile``: an Autocast{CPU,CUDA} kernel that casts the op's tensor arguments to the autocast
    dtype in effect as ``_cast`` does (not the 1-D ones nor those named in ``keep``), then runs the op with
    autocast off for it;
    ``devices``: the device types whose autocast it follows (those where the op runs in low precision).
    (``torch.library.register_autocast`` casts every floating-point argument, float32 statistics too, to a
    dtype fixed at registration.)"""
    global _AUTOCAST_LIB
    if _AUTOCAST_LIB is None:
        _AUTOCAST_LIB = torch.library.Library("fast_unet", "IMPL")
    overload = custom_op._opoverload
    names = [a.name for a in overload._schema.arguments]
    unknown = set(keep) - set(names)
    if unknown:
        raise ValueError(f"{overload}: no argument named {', '.join(sorted(unknown))}")
    positions = frozenset(names.index(k) for k in keep)
    for device_type in devices:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _device_type=device_type, _keyset_off=keyset):
            with torch._C._ExcludeDispatchKeyGuard(_keyset_off):
                return overload(*_cast(args, positions, torch.get_autocast_dtype(_device_type)))

        _AUTOCAST_LIB.impl(overload._schema.name.split("::")[1], kernel, key, with_keyset=True)


def unavailable(op, backend):
    """Why ``backend`` cannot run ``op`` whatever the input (it has no implementation of it, or does not
    load), or None."""
    if backend not in _IMPLS[op]:
        return f"{backend} has no implementation of {op}"
    return backends.load_error(backend)


def serves(op, backend, device_type):
    """True when ``backend`` loads, implements ``op`` and serves ``device_type`` (whatever the input)."""
    if unavailable(op, backend):
        return False
    types = _DEVICES[(op, backend)]()
    return types is None or device_type in types


def implementations(op):
    """{backend: fn} registered for ``op``."""
    _check_op(op)
    return {b: impl[0] for b, impl in _IMPLS[op].items()}


def _check_op(op):
    if op not in _IMPLS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")


_setting_cache = {}


def setting():
    """(mode, {op: backend}) from ``FAST_UNET_BACKEND``; ValueError naming what is wrong."""
    value = os.environ.get(ENV_VAR, "auto")
    if value in _setting_cache:
        return _setting_cache[value]
    mode, overrides = "auto", {}
    parts = [p.strip().lower() for p in value.split(",") if p.strip()]
    for i, part in enumerate(parts):
        if "=" in part:
            op, _, backend = (s.strip() for s in part.partition("="))
            if op not in _IMPLS:
                raise ValueError(f"{ENV_VAR}={value!r}: unknown op {op!r}; expected one of {', '.join(OPS)}")
            if backend not in PRIORITY:
                raise ValueError(f"{ENV_VAR}={value!r}: {op}={backend!r} is not a backend; expected one of "
                                 f"{', '.join(PRIORITY)}")
            overrides[op] = backend
        elif i == 0 and part in MODES:
            mode = part
        else:
            raise ValueError(f"{ENV_VAR}={value!r} is not valid; expected a mode ({', '.join(MODES)}) "
                             f"optionally followed by op=backend overrides, e.g. auto,conv3x3=eager")
    _setting_cache[value] = (mode, overrides)
    return mode, overrides


def mode():
    """The mode part of ``FAST_UNET_BACKEND`` (default ``auto``); an invalid value is a ValueError."""
    return setting()[0]


def reasons(op, backend, *args):
    """Why ``backend`` cannot run ``op`` on these arguments (empty list: it can); in an autocast region, on
    the arguments as that backend would take them."""
    _check_op(op)
    dtype = autocast_dtype(args)
    if dtype is not None and backend != "eager":
        args = autocast_args(op, args, dtype)
    return _reasons(op, backend, args)


def _reasons(op, backend, args):
    why = unavailable(op, backend)
    return [why] if why else list(_IMPLS[op][backend][1](*args))


def explain(op, *args):
    """{backend: reasons it cannot run ``op`` on these arguments}, for every backend in priority order."""
    return {b: reasons(op, b, *args) for b in PRIORITY}


def forced(op):
    """The backend ``FAST_UNET_BACKEND`` forces for ``op``, or None (``auto``)."""
    m, overrides = setting()
    if op in overrides:
        return overrides[op]
    if m == "auto":
        return None
    return m if m in _IMPLS[op] else "eager"


def select(op, *args):
    """(backend name, implementation) for ``op`` on these arguments, honouring ``FAST_UNET_BACKEND``."""
    b, fn, _ = choose(op, args)
    return b, fn


def choose(op, args):
    """(backend, implementation, the arguments to call it with: ``args``, or in an autocast region for a
    compiled backend ``autocast_args``' cast of them): what ``call`` runs."""
    _check_op(op)
    dtype = autocast_dtype(args)
    cast = None

    def args_for(b):
        nonlocal cast
        if dtype is None or b == "eager":
            return args
        if cast is None:
            cast = autocast_args(op, args, dtype)
        return cast

    b = forced(op)
    if b is not None:
        why = _reasons(op, b, args_for(b))
        if why:
            raise RuntimeError(f"{ENV_VAR}={os.environ.get(ENV_VAR)} cannot run {op} on {b}: " + "; ".join(why))
        last_choice[op] = b
        return b, _IMPLS[op][b][0], args_for(b)
    def can(b):
        return b in _IMPLS[op] and not _reasons(op, b, args_for(b))

    b = next((b for b in PRIORITY if can(b)), None)
    if b is None:
        raise RuntimeError(f"no backend can run {op}: {explain(op, *args)}")
    if tuning.enabled():
        def run(backend, targs):
            if dtype is not None and backend != "eager":
                targs = autocast_args(op, targs, dtype)
            return _IMPLS[op][backend][0](*targs)

        b = tuning.choose(op, args, dtype, b, lambda: [c for c in PRIORITY if can(c)], run, can)
    last_choice[op] = b
    return b, _IMPLS[op][b][0], args_for(b)


def call(op, *args):
    """Run ``op`` on the backend ``select`` picks, with the arguments it takes (autocast: see above)."""
    _b, fn, args = choose(op, args)
    return fn(*args)


def backend_status():
    """{backend: None if it loads, else the reason it does not}."""
    return {b: backends.load_error(b) for b in PRIORITY}
