"""The one place that decides which implementation of an op runs.

Backends, in priority order for ``auto``: ``triton`` (kernels/, through fast_unet.triton_ops),
``ext`` (csrc/, the compiled ``fast_unet._C``), ``eager`` (fast_unet.eager, always available).

Each backend provides, per op, an implementation and a ``reasons(*args) -> list[str]`` check (empty:
it can take these inputs). ``FAST_UNET_BACKEND=auto|triton|ext|eager`` overrides the choice; a forced
backend that cannot take an input raises with its reasons rather than falling back quietly.
``explain(op, *args)`` and ``python -m fast_unet.info`` say why a backend was not picked.

Fused paths (``FUSED_PATHS``, switched by ``FAST_UNET_FUSED``, all on by default): where the Triton
backend would run, the model runs whole blocks as fused kernels (fast_unet/fused.py): ``conv`` (convs that
normalise their input on load and write GroupNorm statistics in their epilogues) and ``attention`` (the
attention block around its GEMMs). ``fused_paths(x)`` says which run for an input, and why not.
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


FUSED_ENV = "FAST_UNET_FUSED"
FUSED_PATHS = ("conv", "attention")
# The default is a guess until a GPU has measured the fused paths against the unfused ops (README).
FUSED_DEFAULT = "all"
_FUSED_CHECKS = {}  # fused path -> reasons(x) -> list[str], registered by the Triton glue


def register_fused(path, reasons=_NO_REASONS):
    """Register the Triton glue's check for a fused path: ``reasons(x)`` lists why it cannot take the
    model input ``x`` (empty: it can)."""
    if path not in FUSED_PATHS:
        raise ValueError(f"unknown fused path {path!r}; expected one of {FUSED_PATHS}")
    _FUSED_CHECKS[path] = reasons


def fused_setting():
    """The fused paths ``FAST_UNET_FUSED`` switches on: ``all`` (default) or ``1``; ``none`` or ``0``; or a
    comma list of ``conv`` (the DoubleConvs as Triton convs that normalise on load, with the GroupNorm
    statistics in their epilogues; the pool and upsample passes) and ``attention`` (the attention block
    as five launches around its GEMMs)."""
    value = os.environ.get(FUSED_ENV, FUSED_DEFAULT).strip().lower()
    if value in ("all", "1"):
        return set(FUSED_PATHS)
    if value in ("", "none", "0"):
        return set()
    parts = {p.strip() for p in value.split(",") if p.strip()}
    if parts - set(FUSED_PATHS):
        raise ValueError(f"{FUSED_ENV}={value!r} is not valid; expected all, none, or a comma list of "
                         f"{', '.join(FUSED_PATHS)}")
    return parts


def _path_reasons(path, x):
    """Why the fused ``path`` does not run for the model input ``x`` (empty: it runs)."""
    if path not in fused_setting():
        return [f"{FUSED_ENV} does not include {path!r}"]
    m = mode()
    if m not in ("auto", "triton"):
        return [f"{ENV_VAR}={m}: the fused paths are Triton kernels"]
    if _load("triton"):
        return [_load("triton")]
    if path not in _FUSED_CHECKS:
        return [f"no Triton implementation of the fused {path} path in this build"]
    return list(_FUSED_CHECKS[path](x))


def fused_paths(x):
    """{path: reasons it does not run for the model input ``x``}; an empty list means the path runs.

    A path runs when ``FAST_UNET_FUSED`` includes it, the mode is ``auto`` or ``triton``, the Triton
    backend loads and its check takes ``x`` (device, dtype): then the model uses it for the whole
    forward (and its backward)."""
    return {path: _path_reasons(path, x) for path in FUSED_PATHS}


def fused_on(path, x):
    """True when the fused ``path`` runs for the model input ``x`` (see ``fused_paths``); checks only it."""
    if path not in FUSED_PATHS:
        raise ValueError(f"unknown fused path {path!r}; expected one of {FUSED_PATHS}")
    on = not _path_reasons(path, x)
    if on:
        last_choice["fused " + path] = "triton"
    return on


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
