"""Measured dispatch: ``fast_unet.tune(True)`` or ``FAST_UNET_TUNE=1`` (off by default).

With tuning on, ``dispatch`` asks this module which backend runs an op instead of taking the first in
priority order. On the first call of an op with a new key (the op; device type and name; every tensor
argument's dtype, shape and layout: contiguous, channels_last or other strides; the other arguments'
values when they are booleans or integers, their presence when None; the autocast state and dtype; whether
a gradient will be needed) it times every backend that can take the input, the eager backend included
(for a fused op that is its eager twin's composition): one warm-up call each, then ``ROUNDS`` interleaved
rounds (``LONG_ROUNDS`` when a warm-up took over ``LONG_S``; a call faster than ``SAMPLE_S`` repeated
within a sample), of the forward alone, or of forward and backward (``torch.autograd.grad`` with a ones
upstream gradient) when grad is enabled and an input requires grad; synchronised on CUDA. The fastest
median wins; the rule's choice keeps its place unless another backend is at least ``MARGIN`` faster, in
that measurement and in a second one of the two, so that noise does not move a choice. The timed calls
run on detached aliases of the inputs (the ops mutate nothing), with the RNG state
restored after, and record nothing in the caller's autograd graph; then the chosen backend runs the call.

Choices persist in ``tune.json`` in ``$FAST_UNET_CACHE_DIR``, else ``$XDG_CACHE_HOME/fast_unet``, else
``~/.cache/fast_unet``, under a top-level key naming the device (CPU: its model name and torch's thread
count) and the torch, Triton and fast_unet versions: another device or version finds nothing. The file is
read on the first tuned call (a second process starts tuned) and rewritten atomically after each new choice,
merged with what other processes wrote; a file that does not parse is ignored with one warning.

Under CUDA-graph capture and ``torch.compile`` tracing nothing is timed: a choice already known applies
(from memory only while tracing: no file is read), else the rule's. ``FAST_UNET_BACKEND`` overrides
(a forced mode, ``op=backend``) win over the tuner: dispatch asks it only for the ops they leave on ``auto``.

The module is ``tuning`` (``fast_unet.tune`` is the switch, a function).
"""
import functools
import json
import os
import statistics
import threading
import time
import warnings

import torch

ENV_VAR = "FAST_UNET_TUNE"
CACHE_ENV = "FAST_UNET_CACHE_DIR"
FILE_NAME = "tune.json"
ROUNDS = 5
SAMPLE_S = 1e-3  # the shortest sample: faster calls are repeated within one
LONG_S, LONG_ROUNDS = 0.1, 3  # a candidate whose warm-up took longer than LONG_S: LONG_ROUNDS rounds
MARGIN = 0.02  # another backend replaces the rule's choice only when its median is this much lower

_switch = None  # None: FAST_UNET_TUNE decides; True/False: fast_unet.tune() decided
_choices = {}  # (top key, op key) -> backend, from the file and from this process's measurements
_times = {}  # (top key, op key) -> {backend: median ms}, this process's measurements
_loaded = set()  # cache paths read into _choices
_known = {}  # a call's raw key (see _raw_key) -> backend: the lookup every tuned call makes first
_warned = set()
_lock = threading.RLock()
_depth = 0  # > 0 while timing (a fused op's eager twin dispatches its smaller ops, tuned in turn)
seconds = 0.0  # wall time spent timing candidates in this process (outermost tunings only)
tuned = 0  # keys measured in this process


def tune(on=True):
    """Turn measured dispatch on (``True``) or off (``False``) for this process; ``None`` goes back to
    ``FAST_UNET_TUNE``. Returns the previous state. Usable as a context manager, which restores it:
    ``with fast_unet.tune(True): model(x, t)``."""
    global _switch
    previous = _switch
    _switch = None if on is None else bool(on)
    return _Restore(previous)


class _Restore:
    def __init__(self, previous):
        self.previous = previous

    def __bool__(self):
        return bool(self.previous) if self.previous is not None else _env_on()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        global _switch
        _switch = self.previous


def _env_on():
    return os.environ.get(ENV_VAR, "0").strip().lower() in ("1", "true", "on", "yes")


def enabled():
    """True when measured dispatch is on."""
    return _env_on() if _switch is None else _switch


def cache_dir():
    """The folder of the choices file: ``$FAST_UNET_CACHE_DIR``, else ``$XDG_CACHE_HOME/fast_unet``, else
    ``~/.cache/fast_unet``."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fast_unet")


def cache_path():
    return os.path.join(cache_dir(), FILE_NAME)


@functools.lru_cache(maxsize=None)
def _versions():
    from importlib import metadata

    from . import __version__

    try:
        triton = metadata.version("triton")
    except metadata.PackageNotFoundError:
        triton = "none"
    return f"torch {torch.__version__} | triton {triton} | fast_unet {__version__}"


@functools.lru_cache(maxsize=None)
def _device_model(device_type, index):
    if device_type == "cuda":
        return torch.cuda.get_device_name(index)
    from .info import device_name

    return device_name("cpu").rsplit(",", 1)[0]


def device_key(device):
    """The top-level key of the cache for ``device``: its name (CPU: model and torch's thread count) and
    the versions."""
    if device.type == "cuda":
        name = _device_model("cuda", device.index if device.index is not None else torch.cuda.current_device())
    elif device.type == "cpu":
        name = f"{_device_model('cpu', None)}, {torch.get_num_threads()} threads"
    else:
        name = device.type
    return f"{device.type}: {name} | {_versions()}"


def _layout(t):
    if t.is_contiguous():
        return "c"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "cl"
    return "s" + ",".join(map(str, t.stride()))


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        dt = str(a.dtype).removeprefix("torch.")
        return f"{dt}[{'x'.join(map(str, a.shape))}]{_layout(a)}{'g' if a.requires_grad else ''}"
    if a is None or isinstance(a, (bool, int)):
        return repr(a)
    if isinstance(a, float):
        return "f"
    return type(a).__name__


def device_of(args):
    return next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))


def needs_grad(args):
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def op_key(op, args, autocast):
    """The key of one call within a device's entry (a readable string; see the module docstring)."""
    ac = "off" if autocast is None else str(autocast).removeprefix("torch.")
    return f"{op}({', '.join(_arg_key(a) for a in args)}) autocast={ac} grad={int(needs_grad(args))}"


def _raw(a):
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.shape, a.stride(), a.requires_grad, a.device)
    return a if a is None or isinstance(a, (bool, int)) else type(a)


def _raw_key(op, args, autocast):
    """What ``device_key`` and ``op_key`` depend on, unformatted (cheap to build and hash)."""
    return (op, autocast, torch.is_grad_enabled(), torch.get_num_threads(), cache_dir(),
            tuple(_raw(a) for a in args))


def _tracing():
    return torch.compiler.is_compiling()


def _capturing():
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _warn_once(path, msg):
    if path not in _warned:
        _warned.add(path)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _read(path):
    """The file's {top key: {op key: entry}}, or {} (missing; or unreadable: one warning per path)."""
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            raise ValueError("not a JSON object of objects")
        return data
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        _warn_once(path, f"fast_unet: ignoring the tuning cache {path} ({type(e).__name__}: {e}); "
                         f"it is rewritten at the next choice")
        return {}


def _load(path):
    with _lock:
        if path in _loaded:
            return
        _loaded.add(path)
        for top, entries in _read(path).items():
            for key, entry in entries.items():
                if isinstance(entry, dict) and isinstance(entry.get("backend"), str):
                    _choices.setdefault((top, key), entry["backend"])


def _save(path, top, key, backend, rule, ms, confirm=None):
    from .files import FileError, atomic_write

    data = _read(path) if os.path.exists(path) else {}
    entry = {"backend": backend, "rule": rule, "ms": {b: round(v, 4) for b, v in ms.items()}}
    if confirm:  # the second measurement, of the rule's backend and the challenger
        entry["confirm_ms"] = {b: round(v, 4) for b, v in confirm.items()}
    data.setdefault(top, {})[key] = entry
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # unique: two processes tuning at once each install a whole file (the last one's choices win)
        atomic_write(path, lambda f: f.write(json.dumps(data, indent=1, sort_keys=True).encode()), sync=False,
                     unique=True)
    except (OSError, FileError) as e:
        _warn_once(path + ":write", f"fast_unet: cannot write the tuning cache {path}: {e}")


def reset():
    """Forget every choice and measurement of this process (the next tuned call reads the file again): what
    a new process starts from."""
    global seconds, tuned
    with _lock:
        _choices.clear()
        _known.clear()
        _times.clear()
        _loaded.clear()
        _warned.clear()
        seconds, tuned = 0.0, 0


def choices():
    """{device key: {op key: {"backend", "rule", "ms"}}} from the cache file and this process's measurements
    (``python -m fast_unet.info`` lists them)."""
    path = cache_path()
    data = _read(path)
    with _lock:
        for (top, key), b in _choices.items():
            entry = data.setdefault(top, {}).setdefault(key, {"backend": b})
            entry["backend"] = b
            if (top, key) in _times:
                entry["ms"] = {k: round(v, 4) for k, v in _times[(top, key)].items()}
    return data


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _detached(args):
    """The arguments for one timed call: tensors detached (aliases: the ops mutate nothing), with
    requires_grad as the caller's where a gradient is timed."""
    grad = needs_grad(args)
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            d = a.detach()
            if grad and a.requires_grad:
                d.requires_grad_(True)
            out.append(d)
        else:
            out.append(a)
    return tuple(out), grad


def _step(run, args, grad):
    """One call of ``run(args)``; with ``grad``, its backward too (a ones upstream gradient into every
    floating-point output that carries a graph, gradients for the inputs that require them)."""
    if not grad:
        with torch.no_grad():
            run(args)
        return
    with torch.enable_grad():
        out = run(args)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                if isinstance(o, torch.Tensor) and o.requires_grad]
        leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        if outs and leaves:
            torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs], allow_unused=True)


def measure(op, candidates, run, args, device, rounds=ROUNDS):
    """{backend: median seconds} of ``run(backend, args)`` for each candidate of ``op``: one warm-up call each, then
    ``rounds`` interleaved rounds (see the module docstring). A sample of a call that took less than
    ``SAMPLE_S`` in its warm-up is the mean of as many calls as fit in it (at most 32)."""
    targs, grad = _detached(args)
    times = {b: [] for b in candidates}
    calls = {}
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        for b in list(candidates):
            _sync(device)
            t0 = time.perf_counter()
            try:
                _step(functools.partial(run, b), targs, grad)
            except Exception as e:  # noqa: BLE001 (a backend that fails here is not a candidate; the call goes on)
                warnings.warn(f"fast_unet: tuning {op}: {b} failed ({type(e).__name__}: {e}); not a candidate",
                              RuntimeWarning, stacklevel=5)
                candidates = [c for c in candidates if c != b]
                times.pop(b)
                continue
            _sync(device)
            warm = time.perf_counter() - t0
            calls[b] = max(1, min(32, int(SAMPLE_S / max(warm, 1e-9))))
            if warm > LONG_S:
                rounds = min(rounds, LONG_ROUNDS)
        for _ in range(rounds):
            for b in candidates:
                fn = functools.partial(run, b)
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(calls[b]):
                    _step(fn, targs, grad)
                _sync(device)
                times[b].append((time.perf_counter() - t0) / calls[b])
    return {b: statistics.median(ts) for b, ts in times.items()}


def _fastest(med, rule):
    """The backend of the lowest median, ``rule`` unless another is at least ``MARGIN`` faster."""
    best = min(med, key=med.get)
    return rule if rule in med and med[best] > (1 - MARGIN) * med[rule] else best


@torch._dynamo.assume_constant_result
def _traced_choice(device, key):
    """The choice this process knows for ``op_key`` ``key`` on ``device`` (a string) from memory (no file
    read), or None: what applies while torch.compile traces (run as Python, its result a constant)."""
    return _choices.get((device_key(torch.device(device)), key))


def choose(op, args, autocast, rule, candidates, run, is_valid):
    """The backend for this call with tuning on: the known choice for its key when ``is_valid`` of it (it
    can take the arguments), else, outside capture and tracing, a new measurement of ``candidates()``
    (backends that can take them; ``rule`` is dispatch's own pick) with ``run(backend, args)``, else
    ``rule``."""
    global seconds, tuned, _depth
    if _tracing():
        b = _traced_choice(str(device_of(args)), op_key(op, args, autocast))
        return b if b is not None and (b == rule or is_valid(b)) else rule
    raw = _raw_key(op, args, autocast)
    b = _known.get(raw)
    if b is not None and (b == rule or is_valid(b)):
        return b
    tracing = False
    device = device_of(args)
    top, key = device_key(device), op_key(op, args, autocast)
    if not tracing:
        _load(cache_path())
    b = _choices.get((top, key))
    if b is not None and (b == rule or is_valid(b)):
        if raw is not None:
            _known[raw] = b
        return b
    if tracing or _capturing():
        return rule
    names = candidates()
    if len(names) < 2:
        _known[raw] = rule
        return rule
    with _lock:
        outermost = _depth == 0
        _depth += 1
        t0 = time.perf_counter()
        again = None
        try:
            med = measure(op, names, run, args, device)
            best = _fastest(med, rule) if med else rule
            if best != rule and rule in med:  # confirmed by a second measurement of the two
                again = measure(op, [rule, best], run, args, device)
                if _fastest(again, rule) != best:
                    best = rule
        finally:
            _depth -= 1
        if outermost:
            seconds += time.perf_counter() - t0
        tuned += 1
        ms = {n: v * 1e3 for n, v in med.items()}
        confirm = {n: v * 1e3 for n, v in again.items()} if again else None
        _choices[(top, key)] = best
        _known[raw] = best
        _times[(top, key)] = ms
        _save(cache_path(), top, key, best, rule, ms, confirm)
    return best
