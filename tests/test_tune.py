"""Measured dispatch (fast_unet/tuning.py): the tuner picks the faster backend, its cache round-trips and is
keyed, nothing is timed under compile tracing or graph capture, overrides win, and a tuned model gives the
untuned model's numbers."""
import json
import os
import time
import warnings

import pytest
import torch

import fast_unet
from fast_unet import backends, dispatch, tuning

from helpers import assert_close, conditioned_inputs, model_pair

OP = "tune_probe"
SLOW_S, FAST_S = 0.02, 0.001


@pytest.fixture(autouse=True)
def _tuning_state(monkeypatch, tmp_path):
    """Tuning on, a fresh cache folder and in-memory state; restored after."""
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv(tuning.ENV_VAR, raising=False)
    tuning.reset()
    with fast_unet.tune(True):
        yield
    tuning.reset()


class _Counted(torch.autograd.Function):
    backward_calls = 0

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        _Counted.backward_calls += 1
        return g * 2


@pytest.fixture
def probe(monkeypatch):
    """Registers ``tune_probe`` (test-only) on ext and eager; ``probe(slow=...)`` sets which one sleeps
    SLOW_S (the other FAST_S). Returns the calls per backend. Both backends serve it whatever loads here."""
    monkeypatch.setattr(dispatch, "_IMPLS", dict(dispatch._IMPLS))
    monkeypatch.setattr(dispatch, "OPS", list(dispatch.OPS))
    monkeypatch.setattr(dispatch, "_DEVICES", dict(dispatch._DEVICES))
    orig = dispatch.unavailable
    monkeypatch.setattr(dispatch, "unavailable", lambda op, b: (None if op == OP and b in dispatch._IMPLS[OP]
                                                                else orig(op, b)))
    calls = {"ext": 0, "eager": 0, "grad_enabled": []}
    speed = {"slow": "ext"}

    def impl(backend):
        def fn(x):
            calls[backend] += 1
            if backend == speed.get("fail"):
                raise RuntimeError(f"{backend} cannot")
            calls["grad_enabled"].append(torch.is_grad_enabled())
            torch.rand(1)  # uses the RNG: tuning must restore its state
            time.sleep(SLOW_S if backend == speed["slow"] else FAST_S)
            return _Counted.apply(x)
        return fn

    dispatch.register(OP, "ext", impl("ext"))
    dispatch.register(OP, "eager", impl("eager"))
    _Counted.backward_calls = 0

    def configure(slow="ext", fail=None):
        speed["slow"], speed["fail"] = slow, fail
        return calls

    return configure


def _timed(calls):
    return calls["ext"] + calls["eager"]


@pytest.mark.parametrize("slow", ["ext", "eager"])
def test_picks_the_faster_of_two_backends(probe, slow):
    calls = probe(slow)
    fast = "eager" if slow == "ext" else "ext"
    x = torch.randn(3)
    with fast_unet.tune(False):
        assert dispatch.select(OP, x)[0] == "ext"  # the rule: priority order
    assert calls["ext"] == calls["eager"] == 0
    torch.manual_seed(0)
    y = dispatch.call(OP, x)
    after_tuned = torch.rand(1)
    assert torch.equal(y, x * 2)
    assert dispatch.last_choice[OP] == fast
    # one warm-up, one call per round (20 ms: no repeats); beating the rule's ext takes a second measurement
    assert calls[slow] == (1 + tuning.ROUNDS) * (2 if slow == "ext" else 1)
    assert calls[fast] > 1 + tuning.ROUNDS  # the timed calls and the real one
    assert not any(calls["grad_enabled"][:-1])  # x needs no gradient: the timed calls are forward only
    assert _Counted.backward_calls == 0
    before = dict(calls)
    torch.manual_seed(0)
    dispatch.call(OP, x)
    assert torch.equal(torch.rand(1), after_tuned), "tuning changed the RNG state"
    assert calls[fast] == before[fast] + 1 and calls[slow] == before[slow], "a known key was timed again"


def test_a_backend_that_fails_while_timed_is_left_out(probe):
    calls = probe("eager", fail="ext")
    with pytest.warns(RuntimeWarning, match="tuning tune_probe: ext failed .RuntimeError: ext cannot.; not a candidate"):
        y = dispatch.call(OP, torch.randn(3))
    assert dispatch.last_choice[OP] == "eager" and calls["ext"] == 1 and y.shape == (3,)


def test_grad_times_the_backward_and_leaves_the_graph_alone(probe):
    calls = probe("ext")
    x = torch.randn(4, requires_grad=True)
    y = dispatch.call(OP, x)
    assert dispatch.last_choice[OP] == "eager"
    assert _Counted.backward_calls >= 1 + tuning.ROUNDS, "forward + backward when a gradient is needed"
    assert x.grad is None, "tuning accumulated into the caller's gradients"
    assert y.grad_fn is not None and y.grad_fn.next_functions[0][0].variable is x
    n = _Counted.backward_calls
    y.sum().backward()
    assert _Counted.backward_calls == n + 1, "the caller's graph holds more than its own call"
    assert torch.equal(x.grad, torch.full_like(x, 2.0))
    key = tuning.op_key(OP, (x,), None)
    assert key.endswith("grad=1") and tuning.op_key(OP, (x.detach(),), None).endswith("grad=0")
    with torch.no_grad():
        assert tuning.op_key(OP, (x,), None).endswith("grad=0")
    assert all(calls["grad_enabled"])


def test_cache_round_trips_to_a_new_process(probe):
    calls = probe("ext")
    x = torch.randn(5)
    dispatch.call(OP, x)
    path = tuning.cache_path()
    data = json.load(open(path))
    (top, entries), = data.items()
    assert top == tuning.device_key(x.device)
    entry = entries[tuning.op_key(OP, (x,), None)]
    assert entry["backend"] == "eager" and entry["rule"] == "ext"
    assert entry["ms"]["ext"] > entry["ms"]["eager"]
    assert entry["confirm_ms"]["ext"] > entry["confirm_ms"]["eager"]  # a choice against the rule, measured twice
    tuning.reset()  # a new process: nothing in memory
    n = _timed(calls)
    dispatch.call(OP, x)
    assert dispatch.last_choice[OP] == "eager"
    assert _timed(calls) == n + 1, "a second process timed a key the cache holds"
    # another shape is a new key: timed, and added beside the first
    dispatch.call(OP, torch.randn(6))
    assert _timed(calls) > n + 2
    assert len(json.load(open(path))[top]) == 2
    info = tuning.choices()
    assert info[top][tuning.op_key(OP, (x,), None)]["backend"] == "eager"


def test_corrupt_cache_is_ignored_with_one_warning(probe):
    calls = probe("ext")
    path = tuning.cache_path()
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as f:
        f.write('{"not json')
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache") as record:
        dispatch.call(OP, torch.randn(3))
        dispatch.call(OP, torch.randn(4))  # the rewrite reads the file again: still one warning
    assert len([w for w in record if "tuning cache" in str(w.message)]) == 1
    assert dispatch.last_choice[OP] == "eager" and calls["ext"] > 0
    assert len(json.load(open(path))[tuning.device_key(torch.device("cpu"))]) == 2  # rewritten whole


@pytest.mark.parametrize("change", ["device", "versions"])
def test_cache_is_keyed_by_device_and_versions(probe, monkeypatch, change):
    calls = probe("ext")
    x = torch.randn(3)
    dispatch.call(OP, x)
    tuning.reset()
    if change == "device":
        monkeypatch.setattr(tuning, "_device_model", lambda *a: "another CPU")
    else:
        monkeypatch.setattr(tuning, "_versions", lambda: "torch 0.0 | triton none | fast_unet 0.0")
    n = calls["ext"]
    dispatch.call(OP, x)
    assert calls["ext"] == n + 2 * (1 + tuning.ROUNDS), "another device or version used this one's choice"
    assert len(json.load(open(tuning.cache_path()))) == 2


def test_nothing_is_timed_under_compile_tracing(probe, monkeypatch):
    calls = probe("ext")
    x = torch.randn(3)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    dispatch.call(OP, x)
    assert dispatch.last_choice[OP] == "ext" and (calls["ext"], calls["eager"]) == (1, 0)
    assert not os.path.exists(tuning.cache_path())
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    dispatch.call(OP, x)  # timed: eager
    n = _timed(calls)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    dispatch.call(OP, x)
    assert dispatch.last_choice[OP] == "eager" and _timed(calls) == n + 1  # the known choice applies


def test_torch_compile_traces_the_known_choice(monkeypatch):
    """torch.compile (fullgraph: no graph break) of a dispatched op with tuning on: nothing timed, the rule
    while nothing is known, the choice this process knows once there is one."""
    if backends.load_error("ext"):
        pytest.skip(f"needs the extension: {backends.load_error('ext')}")
    from fast_unet import ops

    x, w, b = torch.randn(2, 8, 4, 4), torch.randn(8), torch.randn(8)

    def f(x):
        return ops.group_norm_relu(x, w, b, 1e-5, None, None)

    torch._dynamo.reset()
    try:
        y = torch.compile(f, backend="eager", fullgraph=True)(x)
        assert tuning.tuned == 0 and dispatch.last_choice["group_norm_relu"] == "ext"
        key = (tuning.device_key(x.device), tuning.op_key("group_norm_relu", (x, w, b, 1e-5, None, None), None))
        monkeypatch.setitem(tuning._choices, key, "eager")
        torch._dynamo.reset()
        y2 = torch.compile(f, backend="eager", fullgraph=True)(x)
        assert tuning.tuned == 0 and dispatch.last_choice["group_norm_relu"] == "eager"
        assert_close(y2, y, atol=1e-5, rtol=1e-5, what="eager against ext")
    finally:
        torch._dynamo.reset()


def test_nothing_is_timed_under_graph_capture(probe, monkeypatch):
    calls = probe("ext")
    x = torch.randn(3)
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_initialized", lambda: True)
        m.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        dispatch.call(OP, x)
        assert dispatch.last_choice[OP] == "ext" and (calls["ext"], calls["eager"]) == (1, 0)
    dispatch.call(OP, x)
    tuning.reset()  # the choice is on file only
    n = _timed(calls)
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_initialized", lambda: True)
        m.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        dispatch.call(OP, x)
    assert dispatch.last_choice[OP] == "eager" and _timed(calls) == n + 1  # the cached choice applies


@pytest.mark.parametrize("setting", [f"{OP}=ext", "auto,tune_probe=ext", "ext"])
def test_overrides_win_over_the_tuner(probe, monkeypatch, setting):
    calls = probe("ext")
    monkeypatch.setenv(dispatch.ENV_VAR, setting)
    dispatch.call(OP, torch.randn(3))
    assert dispatch.last_choice[OP] == "ext" and (calls["ext"], calls["eager"]) == (1, 0)
    assert not os.path.exists(tuning.cache_path())


def test_switch_follows_the_environment(monkeypatch):
    with fast_unet.tune(None):
        monkeypatch.setenv(tuning.ENV_VAR, "1")
        assert tuning.enabled()
        monkeypatch.setenv(tuning.ENV_VAR, "0")
        assert not tuning.enabled()
        with fast_unet.tune(True):
            assert tuning.enabled()
        assert not tuning.enabled()


def test_cache_folder(monkeypatch, tmp_path):
    assert tuning.cache_path() == os.path.join(os.environ[tuning.CACHE_ENV], "tune.json")
    monkeypatch.delenv(tuning.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert tuning.cache_path() == str(tmp_path / "fast_unet" / "tune.json")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tuning.cache_path() == os.path.join(os.path.expanduser("~"), ".cache", "fast_unet", "tune.json")


# --- the model: tuned and untuned agree, whatever each op picks ------------------------------------------

PICKS = {"gn_eager_attn_ext": {"group_norm_relu": "eager", "attention": "ext"},
         "gn_ext_attn_eager": {"group_norm_relu": "ext", "attention": "eager"},
         "measured": None}


@pytest.mark.parametrize("picks", list(PICKS), ids=list(PICKS))
def test_tuned_model_matches_untuned(monkeypatch, picks, choices):
    if backends.load_error("ext"):
        pytest.skip(f"needs the extension: {backends.load_error('ext')}")
    want = PICKS[picks]
    if want is not None:  # the measurement replaced by set times: this backend is the fastest
        def measure(op, candidates, run, args, device, rounds=tuning.ROUNDS):
            return {b: 0.0 if b == want.get(op) else 1.0 for b in candidates}

        monkeypatch.setattr(tuning, "measure", measure)
    fast, ref = model_pair(16)
    x, t = conditioned_inputs(ref, 2, 16)
    results = []
    for on in (False, True):
        fast.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        with fast_unet.tune(on):
            with torch.no_grad():
                out_ng = fast(x, t)
            out = fast(xi, t)
        out.sum().backward()
        results.append((out_ng, out, xi.grad, {n: p.grad.clone() for n, p in fast.named_parameters()}))
    (a_ng, a, ax, ag), (b_ng, b, bx, bg) = results
    assert_close(b_ng, a_ng, atol=2e-5, rtol=1e-4, what="forward (no grad)")
    assert_close(b, a, atol=2e-5, rtol=1e-4, what="forward")
    assert_close(bx, ax, atol=1e-5, rtol=1e-4, what="input gradient")
    for n in ag:
        scale = ag[n].abs().max().item() + 1e-6
        err = (bg[n].double() - ag[n].double()).abs().max().item()
        assert err <= 1e-4 * scale + 1e-6, f"{n}: tuned gradient off by {err:.3g} (scale {scale:.3g})"
    if want is not None:
        ran = set(choices)
        for op, b in want.items():
            assert (op, b) in ran, f"{op} did not run on {b} with tuning on: {sorted(ran)}"


def test_info_lists_the_tuned_choices(probe):
    import subprocess
    import sys

    probe("ext")
    x = torch.randn(3)
    dispatch.call(OP, x)
    top, key = tuning.device_key(x.device), tuning.op_key(OP, (x,), None)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "fast_unet.info", *a], capture_output=True,  # noqa: E731
                                    text=True, check=True, env=env).stdout
    info = json.loads(run("--json"))
    assert info["tuning"]["cache"] == tuning.cache_path()
    assert info["tuning"]["choices"][top][key]["backend"] == "eager"
    text = run()
    assert f"    {key}: eager (rule: ext); eager " in text and top in text


# --- python -m bench: the tuned model beside the untuned one ---------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "autocast-bfloat16"])
def test_bench_times_tuned_beside_untuned(tmp_path, dtype):
    import subprocess
    import sys

    out = tmp_path / "b.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[tuning.CACHE_ENV] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-m", "bench", "--tune", "--dtype", dtype, "--batch", "1", "--size", "16",
                           "--models", "fast_unet", "--warmup", "1", "--repeats", "1", "--no-kernel-count",
                           "--no-memory", "--quiet", "--json", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert list(data["models"]) == ["fast_unet", "fast_unet_tuned"] and data["dtype"] == dtype
    for mode in ("forward", "train"):
        tuned = data["models"]["fast_unet_tuned"][mode]
        assert tuned["speedup_vs_fast_unet"] == pytest.approx(data["models"]["fast_unet"][mode]["median_ms"]
                                                              / tuned["median_ms"])
        t = data["tuning"][mode]
        assert t["first_call_s"] >= t["timing_s"] >= 0
        if dtype == "float32" and not backends.load_error("ext"):
            assert t["keys"] >= 1  # group_norm_relu and attention: ext or eager
        assert f"fast_unet_tuned {mode}: first call" in proc.stdout
    assert data["tuning"]["cache"] == str(tmp_path / "cache" / "tune.json")
    if data["tuning"]["forward"]["keys"]:
        assert json.loads((tmp_path / "cache" / "tune.json").read_text())
    assert f"B=1, 16x16, {dtype}" in proc.stdout
