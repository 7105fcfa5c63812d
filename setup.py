"""Build fast_unet; the C++/CUDA extension ``fast_unet._C`` comes from csrc/ when there is one.

Install with ``pip install --no-build-isolation -e .`` (the build imports the installed torch).

Environment:
- ``FAST_UNET_SKIP_EXT=1``: build no extension (pure Python + Triton; eager fallback everywhere).
- ``FAST_UNET_FORCE_CUDA=1`` / ``FAST_UNET_SKIP_CUDA=1``: force or skip the CUDA sources (default:
  built when torch is a CUDA build and nvcc is found).
- ``TORCH_CUDA_ARCH_LIST``: the CUDA architectures (default here: "8.0;9.0").
- ``CUDA_HOME``: the toolkit; when unset it is found from ``nvcc`` on PATH (wrapper scripts included).
- ``FAST_UNET_CPU_ARCH``: the ``-march=`` of the C++ kernels (default ``native``: the build machine's
  ISA, AVX-512 or AVX2, picked up by ATen's ``Vectorized``); ``none`` adds no ``-march``.
- ``MAX_JOBS``: ninja's parallel jobs (default: from CPU count and memory).

The architectures and the CPU ISA are compiled into ``fast_unet._C.build_info()``.
"""
import glob
import os
import re
import shutil
import subprocess
import tempfile

from setuptools import setup

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


def _find_cuda_home():
    """The toolkit that holds nvcc: ``CUDA_HOME`` if set, else asked of ``nvcc`` itself (``--dryrun``
    prints its ``TOP``, which sees through wrapper scripts such as /usr/local/bin/nvcc)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.cu")
            open(src, "w").close()
            out = subprocess.run([nvcc, "--dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
        if m:
            return os.path.realpath(m.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def _arch_digits(arch_list):
    """"8.0;9.0+PTX" -> "80_90" (a macro value that survives the shell, ninja and nvcc, which splits commas)."""
    return "_".join(a.split("+")[0].replace(".", "") for a in re.split(r"[;\s,]+", arch_list) if a) or "none"


def extensions():
    """(ext_modules, cmdclass) for fast_unet._C, or nothing when there are no sources or it is skipped."""
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    if _flag("FAST_UNET_SKIP_EXT") or not cpp:
        return [], {}
    cuda_home = None if _flag("FAST_UNET_SKIP_CUDA") else _find_cuda_home()
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    import torch
    from torch.utils import cpp_extension

    _max_jobs()
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-Wno-unknown-pragmas"]
    cpu_arch = os.environ.get("FAST_UNET_CPU_ARCH", "native").strip()
    if cpu_arch and cpu_arch != "none":
        cxx.append(f"-march={cpu_arch}")
    define_macros = [("FAST_UNET_CPU_ARCH", re.sub(r"[^A-Za-z0-9_.-]", "_", cpu_arch or "none"))]
    use_cuda = bool(cu) and not _flag("FAST_UNET_SKIP_CUDA") and (
        _flag("FAST_UNET_FORCE_CUDA") or (torch.version.cuda is not None and cuda_home is not None)
    )
    include_dirs = [os.path.join(HERE, "csrc")]
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        define_macros.append(("FAST_UNET_CUDA_ARCHS", _arch_digits(os.environ["TORCH_CUDA_ARCH_LIST"])))
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
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "fast_unet._C", cpp, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
if ext_modules:
    print(f"fast_unet: building {ext_modules[0].name} from {len(ext_modules[0].sources)} sources, MAX_JOBS={os.environ.get('MAX_JOBS')}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '-')})")

setup(
    name="fast_unet",
    version="0.1.0",
    description="Fused-kernel drop-in for the DDPM noise-prediction UNet",
    # The Triton kernels live in the top-level kernels/ folder and install as fast_unet.kernels; bench/ runs
    # from the repository root and is not installed. Nothing installs under a name this project does not own.
    packages=["fast_unet", "fast_unet.kernels"],
    package_dir={"fast_unet.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "pillow", "tqdm", "safetensors"],
    extras_require={"test": ["pytest", "pytest-benchmark", "numpy"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
