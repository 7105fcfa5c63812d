"""fast_unet: a fast drop-in for the DDPM noise-prediction UNet (see README.md)."""
import importlib.util as _ilu
import os as _os
import sys as _sys


def _source_kernels():
    """``fast_unet.kernels`` is the repository's top-level ``kernels/`` folder (``setup.py`` installs it under
    this name). In a source checkout, editable install or not, bind the name to the ``kernels/`` beside this
    package, so a checkout never picks up another checkout's kernels. The package's ``__init__`` imports
    nothing (Triton loads with the kernel modules, on first use)."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    src = _os.path.join(_os.path.dirname(here), "kernels")
    if "fast_unet.kernels" in _sys.modules or _os.path.isdir(_os.path.join(here, "kernels")):
        return
    init = _os.path.join(src, "__init__.py")
    if not _os.path.isfile(init):
        return
    spec = _ilu.spec_from_file_location("fast_unet.kernels", init, submodule_search_locations=[src])
    module = _ilu.module_from_spec(spec)
    _sys.modules["fast_unet.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_source_kernels()

from .model import UNet, DoubleConv, Down, Up, SelfAttention  # noqa: E402
from . import ops, dispatch  # noqa: E402
from .tuning import tune  # noqa: E402

__version__ = "0.1.0"
__all__ = ["UNet", "DoubleConv", "Down", "Up", "SelfAttention", "ops", "dispatch", "tune", "__version__"]
