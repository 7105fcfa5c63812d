"""fast_unet's ops: the functional API the model is written in. Every call goes through
``fast_unet.dispatch``, which picks, per call, the first backend (triton, ext, eager) that can take it.

One file per op family holds the op's public function, each backend's ``torch.library`` custom op (with
``register_fake`` and ``register_autograd``), each backend's reasons check, and the registration of its
eager twin (in ``fast_unet/eager.py``). The eager twin of a fused op is the composition it fuses, built
from the smaller ops, themselves dispatched.

| op               | file                 | triton kernels               | ext (csrc/)        | tests                        |
|------------------|----------------------|------------------------------|--------------------|------------------------------|
| group_norm_relu  | ops/group_norm.py    | kernels/group_norm.py        | group_norm cpu+cuda| tests/ops/test_group_norm.py |
| attention        | ops/attention.py     | kernels/attention.py         | attention cpu      | tests/ops/test_attention.py  |
| time_embedding   | ops/time_embedding.py| kernels/time_embedding.py    | -                  | tests/ops/test_time_embedding.py |
| conv3x3          | ops/conv.py          | kernels/conv.py              | -                  | tests/ops/test_conv.py       |
| gn_relu_maxpool  | ops/resample.py      | kernels/resample.py          | -                  | tests/ops/test_resample.py   |
| upsample2x       | ops/resample.py      | kernels/resample.py          | -                  | tests/ops/test_resample.py   |
| linear_residual  | ops/linear.py        | kernels/linear.py            | -                  | tests/ops/test_linear.py     |
| ln_linear        | ops/linear.py        | kernels/linear.py, kernels/ln_backward.py | -     | tests/ops/test_linear.py     |
| mlp_residual     | ops/linear.py        | kernels/linear.py, kernels/ln_backward.py | -     | tests/ops/test_linear.py     |
| gn_ln_linear     | ops/linear.py        | kernels/linear.py, kernels/ln_backward.py | -     | tests/ops/test_linear.py     |

The whole model on each backend against the reference: tests/test_model.py (eager, ext),
tests/interpret/test_model.py (triton under the interpreter), tests/gpu/ (CUDA).

``Lazy`` is the currency between the model's blocks: a conv output that its consumer normalises.
"""
from typing import NamedTuple, Optional

import torch

from .. import backends, dispatch
from .attention import attention
from .conv import conv3x3
from .group_norm import group_norm_relu
from .linear import gn_ln_linear, linear_residual, ln_linear, mlp_residual
from .resample import gn_relu_maxpool, upsample2x
from .time_embedding import time_embedding


class Lazy(NamedTuple):
    """relu(GroupNorm(1, C)(y)) + emb[:, :, None, None], not yet materialised.

    y: (B, C, H, W) a conv output; partials: y's (B, P, 3) float32 GroupNorm statistics per tile (from the
    conv's epilogue), or None when the conv that made y wrote none; weight, bias, eps: the GroupNorm's;
    emb: (B, C) or None. Each consumer applies the normalisation as it reads y (``norm()``), or
    materialises it (``materialize()``)."""

    y: torch.Tensor
    partials: Optional[torch.Tensor]
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float
    emb: Optional[torch.Tensor] = None

    def norm(self):
        """(partials, weight, bias, eps): the ``norm`` argument of the ops that normalise on load."""
        if self.emb is not None:
            raise ValueError("a lazily normalised tensor with an embedding can only be materialised")
        return (self.partials, self.weight, self.bias, self.eps)

    def materialize(self):
        return group_norm_relu(self.y, self.weight, self.bias, self.eps, self.emb, self.partials)


# Load the compiled backends now, not inside a forward that torch.compile traces (a missing or broken one is a
# reason, never an error). The Triton kernels choose the interpreter here: TRITON_INTERPRET=1 must be set
# before fast_unet.ops is imported.
for _backend in dispatch.PRIORITY:
    backends.load_error(_backend)

__all__ = ["Lazy", "attention", "conv3x3", "gn_ln_linear", "gn_relu_maxpool", "group_norm_relu", "linear_residual",
           "ln_linear", "mlp_residual", "time_embedding", "upsample2x"]
