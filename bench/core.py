"""The pieces of the benchmark (no command of its own; ``python -m bench``, ``--sweep`` and
``python -m bench.estimate`` use them): the models compared, the timed steps, FLOP counts, peak memory,
and the device's reference rates (best measured matmul rate and copy bandwidth).

Every speed figure is a median of interleaved runs (one round times every model once, in turn), so
that the noise of a shared machine falls on all of them alike; ratios are taken within one run.
"""
import contextlib
import functools
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

MODELS = ("reference", "baseline", "compiled", "fast_unet", "fast_unet_tuned")
DESCRIPTIONS = {
    "reference": "the seed's UNet (MultiheadAttention with need_weights=True)",
    "baseline": "fair eager baseline: the reference with need_weights=False (SDPA)",
    "compiled": "torch.compile of the fair baseline",
    "fast_unet": "fast_unet.UNet (dispatch: auto)",
    "fast_unet_tuned": "fast_unet.UNet with measured dispatch (fast_unet.tune(True)): each op's backend timed "
                       "at its first call",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# --dtype autocast-*: float32 models and inputs, forward (and the loss) under torch.autocast in that dtype
AUTOCAST = {"autocast-bfloat16": torch.bfloat16, "autocast-float16": torch.float16}


def parse_dtype(name):
    """(the models' dtype, the autocast dtype or None) of a ``--dtype`` name (DTYPES or AUTOCAST)."""
    if name in AUTOCAST:
        return torch.float32, AUTOCAST[name]
    return DTYPES[name], None


def parse_size(text):
    """'64' -> (64, 64); '48x80' -> (48, 80)."""
    parts = str(text).lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    h, w = (int(p) for p in parts)
    return h, w


def build_model(name, height, width, dtype, device, state_dict=None):
    """One of MODELS at this resolution, dtype and device, loaded with ``state_dict`` when given."""
    from fast_unet import UNet
    from fast_unet.reference import cast_reference, make_reference

    if name == "fast_unet":
        model = UNet()
    elif name == "fast_unet_tuned":
        model = tuned_unet_class()()
    elif name in ("reference", "baseline", "compiled"):
        model = make_reference(height, width, need_weights=(name == "reference"))
    else:
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    model = model.to(device)
    model = model.to(dtype) if name in ("fast_unet", "fast_unet_tuned") else cast_reference(model, dtype)
    if name == "compiled":
        model = torch.compile(model)
    return model


@functools.lru_cache(maxsize=None)
def tuned_unet_class():
    """The model of ``fast_unet_tuned`` (a class made on first use: fast_unet is imported lazily here)."""
    from fast_unet import UNet, tune

    class TunedUNet(UNet):
        """fast_unet.UNet whose forward runs with measured dispatch on (``fast_unet.tune(True)``); the same
        parameters and state dict."""

        def forward(self, *args, **kwargs):
            with tune(True):
                return super().forward(*args, **kwargs)

    return TunedUNet


def make_inputs(batch, height, width, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, height, width, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    noise = torch.randn(batch, 3, height, width, generator=g).to(device, dtype)
    return x, t, noise


def _autocast(x, dtype):
    return torch.autocast(x.device.type, dtype) if dtype is not None else contextlib.nullcontext()


def forward_fn(model, x, t, autocast=None):
    """One forward without grad; ``autocast``: under torch.autocast in that dtype."""
    def run():
        with torch.no_grad(), _autocast(x, autocast):
            return model(x, t)
    return run


def train_fn(model, x, t, noise, autocast=None):
    """One training step without the optimiser: forward, MSE loss, backward; ``autocast``: the forward and the
    loss under torch.autocast in that dtype."""
    def run():
        model.zero_grad(set_to_none=True)
        with _autocast(x, autocast):
            loss = F.mse_loss(model(x, t), noise)
        loss.backward()
        return loss
    return run


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_once(fn, device):
    """Seconds for one call: CUDA events on a GPU, perf_counter elsewhere."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


RATE_KEY = "__reference_rate__"


def time_interleaved(fns, device, warmup, repeats, progress=None, rate=None):
    """{name: [seconds]} for each fn in ``fns`` ({name: fn}), round-robin after ``warmup`` calls each.

    ``rate=(fn, flops)``: also time ``fn`` once per round, interleaved with the others, and return
    ``(times, best FLOP/s of fn)``: the reference rate measured under the same load as the models."""
    if rate is not None:
        fns = {**fns, RATE_KEY: rate[0]}
    for name, fn in fns.items():
        for i in range(warmup):
            if progress:
                progress(f"warm-up {name} {i + 1}/{warmup}")
            fn()
        _sync(device)
    times = {name: [] for name in fns}
    for r in range(repeats):
        if progress:
            progress(f"round {r + 1}/{repeats}")
        for name, fn in fns.items():
            times[name].append(time_once(fn, device))
    if rate is not None:
        return times, rate[1] / min(times.pop(RATE_KEY))
    return times


def count_flops(height, width, batch):
    """FLOPs of one forward and one training step, counted on the reference on the meta device.

    The reference spells attention as bmm + softmax, which the counter sees (the CPU SDPA kernel is
    invisible to it); the math is the same in every model compared, so one count serves all.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from fast_unet.reference import make_reference

    with torch.device("meta"):
        model = make_reference(height, width)
        x = torch.randn(batch, 3, height, width)
        t = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            model(x, t)
    forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        F.mse_loss(model(x, t), x).backward()
    return forward, counter.get_total_flops()


MATMUL_N = 2048


def matmul_fn(dtype, device, n=MATMUL_N):
    """(fn, flops): one n x n x n ``torch.mm`` in ``dtype``, the device's reference rate. On a CPU in bf16 or
    fp16, n is at most 512: a CPU without native bf16/fp16 instructions (AVX2 only, as an AMD EPYC here)
    takes tens of seconds per 2048^3 product, and the benchmark asks for seven."""
    if torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        n = min(n, 512)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    return (lambda: torch.mm(a, b)), 2 * n**3


def matmul_rate(dtype, device, n=MATMUL_N, repeats=5):
    """The best measured dense matmul rate in FLOP/s for ``dtype``: the fastest of ``repeats`` runs.

    The best, not the median: on a shared machine a slow run measures the neighbours, and an
    underestimated rate would flatter every "fraction of peak" computed from it. Where models are timed,
    ``time_interleaved(..., rate=(fn, flops))`` takes one more sample per round, interleaved with them."""
    run, flops = matmul_fn(dtype, device, n)
    for _ in range(2):
        run()
    _sync(device)
    return flops / min(time_once(run, device) for _ in range(repeats))


def copy_bandwidth(device, nbytes=None, repeats=5):
    """The best measured copy bandwidth in bytes/s (read + write) of one large ``copy_``: the memory
    ceiling of the roofline and the per-op benchmarks. 64 MiB on a CPU, 1 GiB on a GPU."""
    n = (nbytes or (2**30 if torch.device(device).type == "cuda" else 2**26)) // 4
    a = torch.empty(n, device=device).fill_(1.0)
    b = torch.empty_like(a)
    run = lambda: b.copy_(a)  # noqa: E731
    for _ in range(2):
        run()
    _sync(device)
    return 2 * 4 * n / min(time_once(run, device) for _ in range(repeats))


@contextlib.contextmanager
def backend_env(value):
    """FAST_UNET_BACKEND=``value`` while the block runs (dispatch reads it at each call); restored after."""
    saved = os.environ.get("FAST_UNET_BACKEND")
    os.environ["FAST_UNET_BACKEND"] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("FAST_UNET_BACKEND", None)
        else:
            os.environ["FAST_UNET_BACKEND"] = saved


def write_json(path, obj, **kwargs):
    """``obj`` as JSON at ``path`` (its folder made first; ``json.dump`` keyword arguments, indent 1 unless
    given); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    kwargs.setdefault("indent", 1)
    with open(path, "w") as f:
        json.dump(obj, f, **kwargs)
    return path


def device_name(device):
    from fast_unet.info import device_name as name

    return name(device)


# ---- peak memory -------------------------------------------------------------------------------

def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _is_oom(e):
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def measure_memory_here(name, mode, batch, height, width, dtype, device, limit_bytes=None):
    """Peak bytes one ``mode`` step adds over the model, weights and inputs, in this (fresh) process.

    CUDA: ``max_memory_allocated`` above what was allocated before the step. CPU: the process's
    resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) above its resident set
    before the step, after a warm-up at B=1, 8x8 (one-time set-up out of the figure); so run it in a fresh
    process (``measure_memory``) for an allocator with no cached memory of an earlier large step. ``limit_bytes`` (CPU): the step may grow the process's address
    space by at most this much (RLIMIT_AS), so that a step that would not fit fails with an
    allocation error instead of pushing the machine into swap or the OOM killer.
    """
    torch.manual_seed(0)
    model = build_model(name, height, width, dtype, device)
    model.train(True)
    x, t, noise = make_inputs(batch, height, width, dtype, device)
    fn = train_fn(model, x, t, noise) if mode == "train" else forward_fn(model, x, t)
    if torch.device(device).type == "cuda":
        fn()  # let the allocator and cuDNN settle; its cache is not counted below
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    # One-time work out of the figure: the thread pool, lazy imports and first-call set-up of every op, by
    # one forward and one training step of the same kind of model at B=1, 8x8 (tensors of a few KiB, so
    # the allocator has nothing large cached for the measured step).
    torch.mm(torch.ones(64, 64), torch.ones(64, 64))
    tiny = build_model(name, 8, 8, dtype, device)
    tx, tt, tn = make_inputs(1, 8, 8, dtype, device)
    forward_fn(tiny, tx, tt)()
    train_fn(tiny, tx, tt, tn)()
    del tiny, tx, tt, tn
    if limit_bytes:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        resource.setrlimit(resource.RLIMIT_AS, (_rss_bytes("VmSize") + int(limit_bytes), hard))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_bytes("VmRSS")
    fn()
    return _rss_bytes("VmHWM") - before


def _child_env():
    """The memory child's environment: glibc's mmap threshold fixed at 128 KiB (setting it turns off the
    dynamic threshold), so every tensor of 128 KiB or more is its own mapping, returned to the system when
    freed: the resident high-water mark then follows the live tensors, not what malloc kept from earlier
    frees (with the dynamic threshold the same step measured anywhere from 7 to 54 MB)."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    return env


def measure_memory(name, mode, batch, height, width, dtype_name, device, limit_bytes=None, timeout=None):
    """``measure_memory_here`` in a fresh Python process: (bytes, None), or (None, why not): "out of
    memory" (past ``limit_bytes``), "time limit" (past ``timeout`` seconds) or the child's error."""
    cmd = [sys.executable, "-m", "bench._memory", name, mode, str(batch), f"{height}x{width}", dtype_name, device]
    if limit_bytes:
        cmd.append(str(int(limit_bytes)))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "time limit"
    lines = proc.stdout.strip().splitlines()
    out = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    if proc.returncode != 0 or "peak_bytes" not in out:
        if out.get("error") == "out of memory" or (limit_bytes and proc.returncode < 0):
            return None, "out of memory"
        return None, (proc.stderr.strip().splitlines()[-1:] or ["failed"])[0]
    return out["peak_bytes"], None
