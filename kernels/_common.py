"""Helpers shared by the Triton kernels."""
import os

import torch
import triton
import triton.language as tl

# The dtypes every launcher takes (activations, weights); statistics and partial sums are float32.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_NAMES = tuple(str(dt).removeprefix("torch.") for dt in DTYPES)  # "float32", ...: the compile report's


def check_param(name, p, x, x_name="the input"):
    """A 1-D parameter (a norm's weight or bias, a bias: shape (C,)) may be float32 or ``x``'s dtype (under
    autocast the (C,) parameters stay float32: ``fast_unet.dispatch``); the kernels load it and convert to
    float32. TypeError naming the argument otherwise."""
    if p.dtype != x.dtype and p.dtype != torch.float32:
        raise TypeError(f"{name} has dtype {p.dtype}; a (C,) parameter must be float32 or {x_name}'s dtype "
                        f"{x.dtype}")

# Decided when kernels/ is imported, like triton.jit itself (which reads TRITON_INTERPRET at decoration).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_UPCAST_DOT = tl.constexpr(INTERPRET)


def _fp32_precision(*chain):
    """The first ``fp32_precision`` other than "none" along ``chain`` (leaf first: op, backend, global)."""
    for obj in chain:
        p = getattr(obj, "fp32_precision", "none")
        if p != "none":
            return p
    return "none"


def conv_tf32():
    """True when PyTorch would run a float32 convolution with TF32: ``torch.backends.cudnn.conv.fp32_precision``
    (then cudnn's, then the global one) is "tf32". That API is the authoritative one since torch 2.9: the legacy
    ``torch.backends.cudnn.allow_tf32`` sets it (False -> "none", True -> "tf32", the default), while reading
    the legacy flag after the new API was used raises. Older torch: ``allow_tf32``."""
    b = torch.backends
    conv = getattr(b.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        return _fp32_precision(conv, b.cudnn, b) == "tf32"
    return bool(b.cudnn.allow_tf32)


def matmul_tf32():
    """True when PyTorch would run a float32 matmul with TF32: ``torch.backends.cuda.matmul.fp32_precision``
    (then the global one) is "tf32", which ``torch.set_float32_matmul_precision("high"/"medium")`` and the
    legacy ``torch.backends.cuda.matmul.allow_tf32 = True`` set; "highest" (the default) leaves it "none".
    Older torch: ``torch.get_float32_matmul_precision() != "highest"``."""
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision"):
        return _fp32_precision(b.cuda.matmul, b.cuda, b) == "tf32"
    return torch.get_float32_matmul_precision() != "highest"


def conv_ieee(dtype):
    """The ``IEEE`` constexpr of a convolution's dots: exact float32 products unless PyTorch allows TF32 for
    convolutions (``conv_tf32``); False for bf16/fp16. Read by the launcher, at launch."""
    return dtype == torch.float32 and not conv_tf32()


def matmul_ieee(dtype):
    """The ``IEEE`` constexpr of a matmul's (linear, attention) dots: exact float32 products unless PyTorch
    allows TF32 for matmuls (``matmul_tf32``); False for bf16/fp16. Read by the launcher, at launch."""
    return dtype == torch.float32 and not matmul_tf32()


def precisions(dtype_name):
    """[(IEEE, config label suffix)] of the builds a launcher can pick for a dtype (the compile report):
    float32 exact and, where PyTorch allows TF32, " tf32"; bf16/fp16 their tensor cores."""
    return [(True, ""), (False, " tf32")] if dtype_name == "float32" else [(False, "")]


def with_ones(builds, ones):
    """``builds`` plus, for the first build of each kernel label, one build per int argument in ``ones``
    (those that are 1 at inputs the launchers take: a batch of one, a 1x1 image, one channel...) with that
    argument specialised to the constant 1, and one with all of them at 1, as the JIT does on a GPU
    (``triton.jit`` turns an int argument equal to 1 into a constexpr): code that only compiles when an
    argument is a tensor (``(C * HW).to(...)`` with both at 1; a variable that is a constant on one branch
    and a tensor on the other) fails there. The label gets `` <name>=1`` for each."""
    out = list(builds)
    first = {}
    for b in builds:
        first.setdefault(b[0], b)
    for name, fn, label, dtype, ce, opts in first.values():
        skip = {p.name for p in getattr(fn, "params", ()) if getattr(p, "do_not_specialize", False)}
        args = [a for a in sorted(ones) if a in fn.arg_names and a not in ce and a not in skip]
        for subset in [[a] for a in args] + ([args] if len(args) > 1 else []):
            out.append((name, fn, label + "".join(f" {a}=1" for a in subset), dtype,
                        dict(ce, **{a: 1 for a in subset}), dict(opts)))
    return out


def with_fp32_params(builds, params):
    """``builds`` plus, for each bf16/fp16 build of a kernel that takes some of the (C,) parameter pointers
    ``params`` (a module's ``AOT_PARAM_POINTERS``), the same build with those pointers ``*fp32``: the
    signature of a launch under autocast, where the (C,) parameters stay float32 (``fast_unet.dispatch``).
    The label gets `` fp32-params``."""
    out = list(builds)
    for name, fn, label, dtype, ce, opts in builds:
        names = [a for a in fn.arg_names if a in params and a not in ce]
        if dtype == "float32" or not names:
            continue
        types = dict(opts.get("arg_types", {}), **{a: "*fp32" for a in names})
        out.append((name, fn, label + " fp32-params", dtype, dict(ce), dict(opts, arg_types=types)))
    return out


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """tl.dot(a, b) with float32 accumulation; ``IEEE``: exact float32 products; otherwise float32 operands
    take TF32 tensor cores (tl.dot's default input precision) and bf16/fp16 operands their own. The
    launchers set IEEE from PyTorch's TF32 settings (``conv_ieee``, ``matmul_ieee``).

    Triton 3.8's interpreter computes tl.dot of bfloat16 operands wrongly; it computes every dot in
    float32 anyway, so under the interpreter the (already rounded) operands are upcast first: the
    result is the same as the GPU's bf16/fp16 tensor-core product with float32 accumulation."""
    if _UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def relu(x):
    """max(x, 0) that keeps NaN, as torch.relu does (``tl.maximum``'s default, ``max.f32`` on a GPU and
    ``np.fmax`` under the interpreter, turns NaN into 0)."""
    return tl.maximum(x, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def maximum(a, b):
    """Elementwise max that propagates NaN from either side (max-pool, running maxima), as PyTorch does."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def max_nan(x, axis):
    """``tl.max(x, axis)`` that propagates NaN (``tl.max`` combines with a NaN-dropping maximum).

    Under the interpreter, ``tl.reduce`` with a combine function of its own runs that function once per
    element in Python (200 ms for a 64 x 64 tile), so there the same result comes from ``tl.max`` and a
    count of the NaNs, both numpy reductions. GPU builds are unaffected (constexpr)."""
    if _UPCAST_DOT:
        has_nan = tl.sum((x != x).to(tl.int32), axis) > 0
        return tl.where(has_nan, float("nan"), tl.max(x, axis))
    return tl.reduce(x, axis, maximum)


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """``x.to(dtype)`` for float32 ``x``, rounded to nearest even as on the GPU.

    Triton 3.8's interpreter converts float32 to bfloat16 by truncation (round toward zero), where the GPU
    rounds to nearest even; a kernel that rounds an intermediate to bf16 on purpose (to match what an
    unfused path stores) would see different values under the interpreter. There the rounding is done
    on the bits first (add 0x7FFF plus the lowest kept bit, clear the low 16 bits: exact RTNE for finite
    values), so the truncating cast that follows is exact. GPU builds are unaffected (constexpr)."""
    if _UPCAST_DOT and dtype == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        x = ((u >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)
