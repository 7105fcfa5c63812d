"""tests/ops: one file per op family, each op's tests on every backend.

A test that takes the ``backend`` fixture runs once per backend: ``eager``, ``ext`` (the compiled
extension), ``triton`` (the Triton kernels on CPU tensors under Triton's interpreter: only when
``TRITON_INTERPRET=1`` was set at process start, as triton.jit reads it at import) and ``triton-cuda``
(the Triton kernels on CUDA tensors, where a GPU is). ``@pytest.mark.backends(...)`` narrows that list
(a Triton-kernel test: ``backends("triton")``); ``@pytest.mark.op(...)`` (or a module's ``pytestmark``)
names the dispatched op(s) the test exercises.

The fixture sets ``FAST_UNET_BACKEND`` to the backend (forced: an input it cannot take is a RuntimeError,
never a silent fallback) and gives ``backend.name`` and ``backend.device``. It skips, with the reason, a
backend that has no implementation of the op, that does not load, or (triton) that has neither the
interpreter nor CUDA here. The triton params carry the ``triton`` marker, so the two CI stages are

    python -m pytest -q tests                                     # stage 1: triton params skip
    TRITON_INTERPRET=1 python -m pytest -q tests/interpret tests/ops -m triton   # stage 2
"""
import os
from types import SimpleNamespace

import pytest
import torch

import fast_unet.ops  # noqa: F401  (registers every op)
from fast_unet import backends, dispatch

INTERPRET_AT_START = os.environ.get("TRITON_INTERPRET", "0") == "1"

PARAMS = {
    "eager": pytest.param("eager", id="eager"),
    "ext": pytest.param("ext", id="ext"),
    "triton": pytest.param("triton", id="triton", marks=pytest.mark.triton),
    "triton-cuda": pytest.param("triton-cuda", id="triton-cuda", marks=[pytest.mark.triton, pytest.mark.gpu]),
}


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    names = marker.args if marker else tuple(PARAMS)
    unknown = set(names) - set(PARAMS)
    if unknown:
        raise ValueError(f"{metafunc.definition.nodeid}: unknown backends {sorted(unknown)}; expected {list(PARAMS)}")
    metafunc.parametrize("backend", [PARAMS[n] for n in names], indirect=True)


def skip_reason(name, ops):
    """Why backend ``name`` cannot run the tests of ``ops`` in this process (None: it can)."""
    impl = "triton" if name.startswith("triton") else name
    for op in ops:
        if impl not in dispatch.implementations(op):
            return f"{impl} has no implementation of {op}"
    if name == "triton":
        if not INTERPRET_AT_START:
            return ("the Triton kernels on CPU tensors need TRITON_INTERPRET=1 at process start: they run in "
                    "stage 2 (TRITON_INTERPRET=1 python -m pytest tests/interpret tests/ops -m triton)")
    elif name == "triton-cuda":
        if INTERPRET_AT_START:
            return "triton-cuda runs with TRITON_INTERPRET unset (the interpreter would run the kernels on the host)"
        if not torch.cuda.is_available():
            return "triton-cuda needs a CUDA device"
    err = backends.load_error(impl)
    if err:
        return f"{impl} does not load: {err}"
    return None


@pytest.fixture
def backend(request, monkeypatch):
    """SimpleNamespace(name, device) of the backend this test runs on; FAST_UNET_BACKEND forced to it."""
    name = request.param
    marker = request.node.get_closest_marker("op")
    ops = marker.args if marker else ()
    why = skip_reason(name, ops)
    if why:
        pytest.skip(why)
    monkeypatch.setenv("FAST_UNET_BACKEND", "triton" if name.startswith("triton") else name)
    torch.manual_seed(0)
    return SimpleNamespace(name=name, device=torch.device("cuda" if name == "triton-cuda" else "cpu"))


@pytest.fixture
def ext_ops():
    """The extension's implementations (see helpers.require_ext); skips, with the reason, when fast_unet._C
    is not built. For the extension-specific tests."""
    from helpers import require_ext

    return require_ext()


@pytest.fixture
def ext_cuda(ext_ops):
    """ext_ops, for the tests of the extension's CUDA kernels: skips without a CUDA build or device."""
    if not ext_ops.CUDA_BUILT:
        pytest.skip("fast_unet._C was built without CUDA kernels")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return ext_ops
