"""Builds the native extension ``stepdrop._C``; package metadata lives in pyproject.toml.

The C++ kernels (csrc/*.cpp, OpenMP) are always built. The CUDA kernels (kernels/*.cu) are
added where nvcc is found and torch is a CUDA build. Build knobs (environment variables):

    STEPDROP_CUDA          "auto" (default), "1" (require the CUDA build), "0" (C++ only)
    CUDA_HOME              CUDA toolkit; defaults to /usr/local/cuda when that exists
    TORCH_CUDA_ARCH_LIST   GPU architectures; default "7.5;8.0;9.0+PTX" (Turing to Hopper as
                           machine code, and PTX that newer GPUs compile at load time)
    MAX_JOBS               parallel compile jobs (read by torch's ninja build)

Build with ``pip install --no-build-isolation [-e] .`` (isolation would fetch another torch).
"""

from __future__ import annotations

import glob
import os

from setuptools import setup

# Set before torch.utils.cpp_extension is imported: it reads CUDA_HOME at import time, and
# otherwise guesses /usr/local from an nvcc wrapper on PATH (ENVIRONMENT.md).
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "7.5;8.0;9.0+PTX")

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

CUDA_MODES = ("0", "1", "auto")


def _nvcc() -> str | None:
    """Path of nvcc in the toolkit torch will use, or None."""
    home = cpp_extension.CUDA_HOME
    path = os.path.join(home, "bin", "nvcc") if home else None
    return path if path and os.path.isfile(path) and os.access(path, os.X_OK) else None


def _want_cuda() -> bool:
    mode = os.environ.get("STEPDROP_CUDA", "auto").strip().lower() or "auto"
    if mode not in CUDA_MODES:
        raise SystemExit(f"STEPDROP_CUDA must be one of {CUDA_MODES}, got {mode!r}")
    if mode == "0":
        return False
    nvcc, torch_cuda = _nvcc(), torch.version.cuda
    if mode == "1" and (nvcc is None or torch_cuda is None):
        why = "nvcc not found (set CUDA_HOME to the toolkit)" if nvcc is None else f"torch {torch.__version__} is not a CUDA build"
        raise SystemExit(f"STEPDROP_CUDA=1 but the CUDA kernels cannot be built: {why}")
    return nvcc is not None and torch_cuda is not None


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp"))
    cxx = ["-O3", "-fopenmp"]
    kwargs = dict(
        name="stepdrop._C",
        include_dirs=[os.path.abspath("csrc"), os.path.abspath("kernels")],
        extra_link_args=["-fopenmp"],
    )
    if _want_cuda():
        return cpp_extension.CUDAExtension(
            sources=sources + sorted(glob.glob("kernels/*.cu")),
            extra_compile_args={"cxx": cxx + ["-DSTEPDROP_WITH_CUDA"], "nvcc": ["-O3"]},
            **kwargs,
        )
    return cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
