"""What fast_unet changes in Triton's interpreter to make its runs cheaper, held to changing nothing else:
loading the triton backend under the interpreter skips the language re-patching on helper calls inside a
launch (``fast_unet.backends._skip_nested_language_patches``), and ``backends.interpreter_tiles`` turns off
the int32 overflow check for the wiring runs only."""
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter

from fast_unet import backends
from fast_unet.kernels import _common


@triton.jit
def _helpers_in_a_loop(x_ptr, out_ptr, N: tl.constexpr, REPEAT: tl.constexpr):
    offs = tl.program_id(0) * N + tl.arange(0, N)
    v = tl.load(x_ptr + offs)
    for _ in range(REPEAT):
        # a helper of another module and one of Triton's own (tl.sum sees triton.language.core): device-function
        # calls in every iteration of every program
        v = _common.relu(v) - 1.0 + tl.sum(v, 0) * 0.0
    tl.store(out_ptr + offs, _common.maximum(v, -2.5))


def _count_scans(monkeypatch, launch):
    calls = []
    real = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    launch()
    monkeypatch.setattr(interpreter, "_patch_builtin", real)
    return len(calls)


def test_helper_calls_inside_a_launch_do_not_patch_the_language_again(monkeypatch):
    assert backends.load_error("triton") is None
    assert interpreter._patch_lang.fast_unet_skips_nested
    x = torch.randn(4, 16)
    out = torch.empty_like(x)
    _helpers_in_a_loop[(1,)](x, out, N=16, REPEAT=1)  # a helper's first call ever rewrites it (its module gains `tl`)
    once = _count_scans(monkeypatch, lambda: _helpers_in_a_loop[(1,)](x, out, N=16, REPEAT=1))
    assert once > 0
    many = _count_scans(monkeypatch, lambda: _helpers_in_a_loop[(4,)](x, out, N=16, REPEAT=3))
    assert many == once  # Triton's own scans again for each of the 4 x (3 x 2 + 1) helper calls
    want = x
    for _ in range(3):
        want = torch.relu(want) - 1.0
    torch.testing.assert_close(out, torch.maximum(want, torch.tensor(-2.5)))
    # the launch's patches were undone: triton.language is the compiler's again
    assert tl.core.is_builtin(tl.arange) and tl.core.is_builtin(tl.tensor.__add__)


def test_the_overflow_check_is_off_only_in_the_wiring_runs(monkeypatch, interpreter_tiles):
    assert not interpreter.interpreter_builder.options.sanitize_overflow


def test_the_kernel_tests_run_with_the_overflow_check():
    """tests/ops does not take ``interpreter_tiles``: every kernel runs there with Triton's int32 check."""
    assert interpreter.interpreter_builder.options.sanitize_overflow
    assert any(obj is interpreter.interpreter_builder for obj, _, _ in backends.interpreter_tiles())
    assert _common.INTERPRET
