"""Build fast_unet; the C++/CUDA extension ``fast_unet._C`` comes from csrc/ when there is one.

Install with ``pip install --no-build-isolation -e .`` (the build imports the installed torch).

Environment:
- ``FAST_UNET_SKIP_EXT=1``: build no extension (pure Python + Triton; eager fallback everywhere).
- ``FAST_UNET_FORCE_CUDA=1`` / ``FAST_UNET_SKIP_CUDA=1``: force or skip the CUDA sources (default:
  built when torch is a CUDA build and nvcc is found).
- ``TORCH_CUDA_ARCH_LIST``: the CUDA architectures (default here: "8.0;9.0").
- ``MAX_JOBS``: ninja's parallel jobs (default: from CPU count and memory).
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _max_jobs():
    if "MAX_JOBS" in os.environ:
        return
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    # nvcc on the big templated headers can take ~4 GiB a job.
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(mem_gib // 4))))


def extensions():
    """(ext_modules, cmdclass) for fast_unet._C, or nothing when there are no sources or it is skipped."""
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if _flag("FAST_UNET_SKIP_EXT") or not cpp:
        return [], {}
    import torch
    from torch.utils import cpp_extension

    _max_jobs()
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    define_macros = []
    use_cuda = bool(cu) and not _flag("FAST_UNET_SKIP_CUDA") and (
        _flag("FAST_UNET_FORCE_CUDA") or (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None)
    )
    include_dirs = [os.path.join(HERE, "csrc")]
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        # The nvidia CUDA-13 wheels carry headers (cublas_v2.h, cusparse.h) that ATen/cuda needs.
        try:
            import nvidia

            for base in nvidia.__path__:
                include_dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        except ImportError:
            pass
        define_macros.append(("FAST_UNET_WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "fast_unet._C", cpp + cu, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "fast_unet._C", cpp, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="fast_unet",
    version="0.1.0",
    description="Fused-kernel drop-in for the DDPM noise-prediction UNet",
    packages=find_packages(include=["fast_unet", "fast_unet.*", "kernels", "kernels.*", "bench", "bench.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={"test": ["pytest", "pytest-benchmark", "numpy"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
