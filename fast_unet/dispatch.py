"""The one place that decides which implementation of an op runs.

Backends, in priority order for ``auto``: ``triton`` (kernels/, through fast_unet.triton_ops),
``ext`` (csrc/, the compiled ``fast_unet._C``), ``eager`` (fast_unet.eager, always available).

Each backend provides, per op, an implementation and a ``reasons(*args) -> list[str]`` check (empty:
it can take these inputs). ``FAST_UNET_BACKEND=auto|triton|ext|eager`` overrides the choice; a forced
backend that cannot take an input raises with its reasons rather than falling back quietly.
``explain(op, *args)`` and ``python -m fast_unet.info`` say why a backend was not picked.

Optional fused paths (``FUSED``), off by default: ``FAST_UNET_FUSED_CONV=1`` lets the model run each
DoubleConv's conv3x3 + GroupNorm + ReLU (+ emb) as the Triton conv with the statistics in its epilogue
(``fused("conv3x3_gn_relu", ...)``), when the Triton backend would be selected for the input.
"""
import importlib
import os
import warnings

from . import eager

ENV_VAR = "FAST_UNET_BACKEND"
MODES = ("auto", "triton", "ext", "eager")
PRIORITY = ("triton", "ext", "eager")
OPS = ("group_norm_relu", "attention", "time_embedding")

# op -> backend -> (fn, reasons_fn). Backends other than eager fill theirs in when their glue module
# is imported (see _GLUE); eager's is here.
_IMPLS = {op: {} for op in OPS}
_NO_REASONS = lambda *args, **kwargs: []  # noqa: E731
for _op in OPS:
    _IMPLS[_op]["eager"] = (getattr(eager, _op), _NO_REASONS)

# The glue module of each compiled backend: importing it registers its implementations.
_GLUE = {"triton": "fast_unet.triton_ops", "ext": "fast_unet.ext_ops"}
_load_errors = {}
_loaded = set()
last_choice = {}  # op -> the backend that ran it last (what the benchmark and info report)


def register(op, backend, fn, reasons=_NO_REASONS):
    """Register ``fn`` as ``backend``'s implementation of ``op``; ``reasons(*args)`` lists why it cannot
    take those arguments (empty list: it can)."""
    if op not in _IMPLS:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    if backend not in PRIORITY:
        raise ValueError(f"unknown backend {backend!r}; expected one of {PRIORITY}")
    _IMPLS[op][backend] = (fn, reasons)


FUSED_CONV_ENV = "FAST_UNET_FUSED_CONV"
FUSED = ("conv3x3_gn_relu",)
_FUSED_IMPLS = {}  # fused op -> (fn, reasons_fn); Triton only


def register_fused(op, fn, reasons=_NO_REASONS):
    """Register the Triton implementation of an optional fused path (see ``fused``)."""
    if op not in FUSED:
        raise ValueError(f"unknown fused op {op!r}; expected one of {FUSED}")
    _FUSED_IMPLS[op] = (fn, reasons)


def fused_conv_enabled():
    """``FAST_UNET_FUSED_CONV``: "1" turns the fused conv path on; unset, "" or "0" leave it off (default)."""
    value = os.environ.get(FUSED_CONV_ENV, "0").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{FUSED_CONV_ENV}={value!r} is not valid; expected 0 or 1")
    return value == "1"


def fused(op, *args):
    """The fused implementation of ``op`` for these arguments, or None (run the unfused ops instead).

    Not None only when the path is switched on, the mode is ``auto`` or ``triton``, the Triton backend
    loads and its reasons function takes the arguments (so Triton is what would be selected)."""
    if op not in FUSED:
        raise ValueError(f"unknown fused op {op!r}; expected one of {FUSED}")
    if not fused_conv_enabled() or mode() not in ("auto", "triton") or _load("triton"):
        return None
    impl = _FUSED_IMPLS.get(op)
    if impl is None or impl[1](*args):
        return None
    last_choice[op] = "triton"
    return impl[0]


def _load(backend):
    """Import the backend's glue once; remember why it failed. Returns the failure reason or None."""
    if backend == "eager" or backend in _loaded:
        return _load_errors.get(backend)
    _loaded.add(backend)
    try:
        importlib.import_module(_GLUE[backend])
    except ModuleNotFoundError as e:
        if e.name == _GLUE[backend]:
            _load_errors[backend] = f"{_GLUE[backend]} does not exist yet (no {backend} kernels in this build)"
        else:
            _load_errors[backend] = f"cannot import {e.name!r}: {e}"
    except Exception as e:  # a broken build must not break fast_unet: warn once, fall back
        _load_errors[backend] = f"{_GLUE[backend]} failed to load: {type(e).__name__}: {e}"
        warnings.warn(f"fast_unet: {backend} backend disabled: {_load_errors[backend]}", RuntimeWarning,
                      stacklevel=3)
    return _load_errors.get(backend)


def mode():
    """The backend mode from ``FAST_UNET_BACKEND`` (default ``auto``); an unknown value is an error."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV_VAR}={value!r} is not a valid backend; expected one of {', '.join(MODES)}")
    return value


def reasons(op, backend, *args):
    """Why ``backend`` cannot run ``op`` on these arguments (empty list: it can)."""
    err = _load(backend)
    if err:
        return [err]
    impl = _IMPLS[op].get(backend)
    if impl is None:
        return [f"no {backend} implementation of {op!r} yet"]
    return list(impl[1](*args))


def explain(op, *args):
    """{backend: reasons it cannot run ``op`` on these arguments}, for every backend in priority order."""
    return {b: reasons(op, b, *args) for b in PRIORITY}


def select(op, *args):
    """(backend name, implementation) for ``op`` on these arguments, honouring ``FAST_UNET_BACKEND``."""
    m = mode()
    if m != "auto":
        why = reasons(op, m, *args)
        if why:
            raise RuntimeError(f"{ENV_VAR}={m} cannot run {op}: " + "; ".join(why))
        last_choice[op] = m
        return m, _IMPLS[op][m][0]
    for b in PRIORITY:
        if not reasons(op, b, *args):
            last_choice[op] = b
            return b, _IMPLS[op][b][0]
    raise RuntimeError(f"no backend can run {op}: {explain(op, *args)}")  # unreachable: eager takes all


def call(op, *args):
    """Run ``op`` on the backend ``select`` picks."""
    return select(op, *args)[1](*args)


def backend_status():
    """{backend: None if it loads, else the reason it does not}."""
    return {b: _load(b) for b in PRIORITY}
