"""bench.kernels on fast_unet under the Triton interpreter: the launch recorder, dry mode, the write
declarations (each kernel module's ``WRITES`` / ``UPDATES``).

Small shapes (B=1, 8x8, float32) and the interpreter's large tiles (``fast_unet.backends.interpreter_tiles``,
for the whole module: the dry and the real traces compared here both take them): counts do not depend on
them. The eager-model counter's own tests (meta against CPU tensors, bytes of single ops) are in
tests/test_eager_kernel_count.py.
"""
import contextlib

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import KernelInterface

from bench import kernels as bk

F32 = torch.float32
UNFUSED = {"FAST_UNET_BACKEND": bk.UNFUSED}


@pytest.fixture(scope="module", autouse=True)
def _interpreter_tiles():
    from fast_unet import backends

    with pytest.MonkeyPatch.context() as mp:
        for module, name, value in backends.interpreter_tiles():
            mp.setattr(module, name, value)
        yield


def _sig(trace):
    return [(x.kind, x.name, x.inside, x.read_bytes, x.write_bytes) for x in trace.launches]


@contextlib.contextmanager
def _executions(per_launch=None):
    """Count the kernels the interpreter really runs (below the recorder's hook): ``runs[0]``.
    ``per_launch(kernel, named_tensors, run)``: wrap each run (to look at its arguments)."""
    runs = [0]
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        runs[0] += 1
        go = lambda: original(self, *args, grid=grid, warmup=warmup, **kwargs)  # noqa: E731
        if per_launch is None:
            return go()
        named = list(zip(self.arg_names, args)) + list(kwargs.items())
        return per_launch(self, [(n, a) for n, a in named if isinstance(a, torch.Tensor)], go)

    InterpretedFunction.run = run
    try:
        yield runs
    finally:
        InterpretedFunction.run = original


def _bits(t):
    return t.detach().reshape(-1).clone().view(torch.uint8)


@pytest.fixture(scope="module")
def dry_traces():
    """Dry traces of both variants, forward and training step, B=1, 8x8."""
    return {(name, step): bk.trace_step("fast_unet", step, 1, 8, 8, F32, "cpu", env)
            for name, env in (("fused", {}), ("unfused", UNFUSED)) for step in bk.STEPS}


@pytest.fixture(scope="module")
def real_train():
    """One real (non-dry) training step under the interpreter, B=1, 8x8: its trace, the number of kernels
    the interpreter ran, and per kernel the arguments a launch changed (every tensor argument is
    snapshotted around each run), with the arguments its module declares it writes."""
    changed = {}  # kernel name -> (arguments changed, arguments declared written or updated)

    def per_launch(kernel, tensors, go):
        before = [(n, t, _bits(t)) for n, t in tensors]
        out = go()
        writes, updates = bk.declared_writes(kernel)
        seen, _ = changed.setdefault(bk.kernel_name(kernel), (set(), set(writes or ()) | updates))
        seen.update(n for n, t, b in before if not torch.equal(_bits(t), b))
        return out

    with _executions(per_launch) as runs:
        trace = bk.trace_step("fast_unet", "train", 1, 8, 8, F32, "cpu", dry=False)
    return trace, runs[0], changed


def test_counts_are_positive_stable_and_independent_of_batch(dry_traces):
    for (name, step), trace in dry_traces.items():
        s = bk.summarise(trace)
        assert s["triton"] > 0 and s["torch"] > 0, (name, step, s)
        assert s["read_bytes"] > 0 and s["written_bytes"] > 0
    for step in bk.STEPS:
        trace = dry_traces["fused", step]
        again = bk.trace_step("fast_unet", step, 1, 8, 8, F32, "cpu")
        assert _sig(again) == _sig(trace), step
        b3 = bk.trace_step("fast_unet", step, 3, 8, 8, F32, "cpu")
        assert [x[:3] for x in _sig(b3)] == [x[:3] for x in _sig(trace)], step
    f, t = (bk.summarise(dry_traces["unfused", s]) for s in ("forward", "train"))
    assert t["launches"] > f["launches"] and t["triton"] > f["triton"]
    fused = bk.summarise(dry_traces["fused", "forward"])
    assert fused["launches"] < f["launches"]  # the fused model path launches fewer kernels
    assert any(x.name == "_conv3x3_kernel" for x in dry_traces["fused", "forward"].launches)


def test_dry_mode_runs_no_kernel_and_computes_no_op():
    with _executions() as runs:
        trace = bk.trace_step("fast_unet", "train", 1, 8, 8, F32, "cpu")
    assert runs[0] == 0
    assert bk.summarise(trace)["triton"] > 0
    # A dry aten op is counted, and its output is only allocated (its values are whatever was there).
    trace = bk.Trace()
    a = torch.full((4096,), 3.0)
    with bk.OpCounter(trace, "cpu", dry=True):
        b = a * 2
        c = a.add_(1)
    assert [x.name for x in trace.launches] == ["aten.mul.Tensor", "aten.add_.Tensor"]
    assert not torch.equal(b, torch.full_like(a, 6.0)) and c is a and torch.equal(a, torch.full_like(a, 3.0))


def test_recorder_sees_every_launch_and_dry_matches_real(real_train, dry_traces):
    """In a real run the recorder's Triton launches are every kernel the interpreter ran, and the dry
    run's trace is the same launch for launch (names, bytes read and written: dry outputs have the
    real shapes and strides)."""
    trace, runs, _ = real_train
    assert runs == bk.summarise(trace)["triton"] > 0
    assert _sig(dry_traces["fused", "train"]) == _sig(trace)


def _kernel_modules():
    from fast_unet import backends

    return backends.kernel_modules()


def test_every_launched_kernel_declares_its_writes(dry_traces):
    """Each launched kernel is declared in its own module's WRITES or UPDATES, and every declared name is
    a kernel of that module with those pointer arguments."""
    launched = {x.name for tr in dry_traces.values() for x in tr.launches if x.kind == "triton"}
    missing = sorted({x.name for tr in dry_traces.values() for x in tr.launches
                      if x.kind == "triton" and not x.declared})
    assert not missing, f"kernels whose module declares no WRITES / UPDATES entry for them: {missing}"
    declared = set()
    for mod in _kernel_modules():
        objs = {bk.kernel_name(v): v for v in vars(mod).values()
                if isinstance(v, KernelInterface) and bk._kernel_function(v).__module__ == mod.__name__}
        tables = (getattr(mod, "WRITES", {}), getattr(mod, "UPDATES", {}))
        for table in tables:
            for name, args in table.items():
                assert name in objs, f"{mod.__name__}: {name} is not a Triton kernel defined there"
                params = objs[name].arg_names
                bad = sorted(set(args) - {p for p in params if p.endswith("_ptr")})
                assert not bad, f"{mod.__name__}.WRITES/UPDATES: {name} has no pointer arguments {bad}"
                declared.add(name)
    assert launched <= declared


def test_declared_writes_are_what_the_kernels_write(real_train):
    """Over the whole real training step (forward and backward), the arguments each kernel changed
    are exactly the ones its module's WRITES / UPDATES declare."""
    _, _, changed = real_train
    assert changed
    for name, (seen, declared) in changed.items():
        assert seen == declared, f"{name}: changed {sorted(seen)}, declared {sorted(declared)}"


def test_torch_ops_inside_custom_ops_are_counted_once(dry_traces):
    """A dispatch mode that just calls ``func`` would not see the torch ops of a custom op's
    implementation (the mode is popped while it handles the op); OpCounter runs the implementation with
    itself pushed again. The custom ops themselves are not counted, their launches are."""
    trace = dry_traces["unfused", "train"]
    assert not [x for x in trace.launches if x.name.startswith("fast_unet")]
    inside = [(x.kind, x.name, x.inside) for x in trace.launches if x.inside]
    gn_bwd = inside.count(("triton", "_gn_bwd_dx_kernel", "fast_unet::group_norm_relu_backward"))
    assert gn_bwd == 20  # the UNet's 20 GroupNorms
    # two launches per GroupNorm backward (d weight / d bias summed over the batch inside the dx launch), no torch sums
    assert inside.count(("triton", "_gn_bwd_reduce_kernel", "fast_unet::group_norm_relu_backward")) == gn_bwd
    assert len([x for x in inside if x[2] == "fast_unet::group_norm_relu_backward"]) == 2 * gn_bwd
    assert not [x for x in inside if x[0] == "torch" and x[2] == "fast_unet::group_norm_relu_backward"]
    # the time embedding's backward: one launch for the six blocks, its gradients written whole (no zero-fill)
    assert inside.count(("triton", "_temb_bwd_kernel", "fast_unet::time_embedding_backward")) == 1
    assert not [x for x in inside if x[0] == "torch" and x[2] == "fast_unet::time_embedding_backward"]
    assert all(x.inside for x in trace.launches if x.kind == "triton")


@torch.library.custom_op("fast_unet_test::scaled_sum", mutates_args=())
def _scaled_sum(x: torch.Tensor) -> torch.Tensor:
    return (x * 2).sum(0)


@_scaled_sum.register_fake
def _(x):
    return x.new_empty(x.shape[1:])


def test_torch_ops_of_a_custom_ops_implementation_are_counted_inside_it():
    """The torch ops a custom op's implementation runs are each counted once, marked as inside it; the
    custom op itself is not counted."""
    trace = bk.Trace()
    x = torch.randn(4, 3)
    with bk.OpCounter(trace, "cpu"):
        y = _scaled_sum(x) + 1
    assert [(x.name, x.inside) for x in trace.launches] == [
        ("aten.mul.Tensor", "fast_unet_test::scaled_sum"), ("aten.sum.dim_IntList", "fast_unet_test::scaled_sum"),
        ("aten.add.Tensor", None)]
    torch.testing.assert_close(y, (x * 2).sum(0) + 1)
