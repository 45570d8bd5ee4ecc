"""Build script for craft_ext.

`pip install --no-build-isolation .` (torch installed first) compiles ``csrc/`` into
``craft_ext._C`` with torch.utils.cpp_extension and ninja:

* the C++ CPU kernels (``csrc/cpu/*.cpp``) always;
* the CUDA kernels (``csrc/cuda/*.cu``) when torch was built with CUDA (``torch.version.cuda``)
  and a CUDA toolkit is found (``CUDA_HOME``), or when ``FORCE_CUDA=1``. Whether a GPU is
  visible at build time does not matter.

Environment variables:

``FORCE_CUDA=1``            build the CUDA sources even if the checks above say no.
``TORCH_CUDA_ARCH_LIST``    GPU architectures (default ``"8.0;9.0"``: A100 and H100/H200).
``MAX_JOBS``                parallel compile jobs (read by torch's ninja build).
``CRAFT_EXT_NO_EXTENSION=1`` skip the compiled extension (pure Triton / reference package).

If compilation fails (no compiler, broken toolkit) the build still succeeds with a warning and
the package falls back to Triton / reference code: ``craft_ext.extension_loaded()`` is then False.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _extensions():
    """Return (ext_modules, cmdclass) for the compiled extension, or ([], {})."""
    if _truthy("CRAFT_EXT_NO_EXTENSION"):
        print("craft_ext: CRAFT_EXT_NO_EXTENSION set, not compiling csrc/", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import (
            CUDA_HOME,
            BuildExtension,
            CppExtension,
            CUDAExtension,
        )
    except ImportError:
        print(
            "craft_ext: torch is not importable at build time; install torch first and use "
            "`pip install --no-build-isolation .` to compile the kernels. Building without them.",
            file=sys.stderr,
        )
        return [], {}

    with_cuda = _truthy("FORCE_CUDA") or (torch.version.cuda is not None and CUDA_HOME is not None)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # no floating-point contraction: kernels round like the PyTorch references (mean + std * z)
    cxx_flags = ["-O3", "-std=c++17", "-ffp-contract=off", "-fdiagnostics-color=always"]
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extension = CUDAExtension
        extra = {
            "cxx": cxx_flags + ["-DCRAFT_EXT_WITH_CUDA"],
            # No --use_fast_math: it flushes float32 denormals to zero (cvt.rn.ftz, setp.ftz),
            # so a filter of denormals would get max_abs 0. The kernels are memory bound.
            "nvcc": ["-O3", "-std=c++17", "-lineinfo", "-DCRAFT_EXT_WITH_CUDA"],
        }
    else:
        extension = CppExtension
        extra = {"cxx": cxx_flags}

    ext = extension(
        "craft_ext._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        define_macros=define_macros,
        py_limited_api=True,
    )

    class OptionalBuildExtension(BuildExtension):
        """Compile the extension; on failure warn and install the pure-Python package."""

        def build_extension(self, ext):  # noqa: D401 - setuptools hook
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler missing, toolkit broken, ...
                print(
                    f"craft_ext: WARNING: could not compile {ext.name} ({exc}); installing "
                    "without it. craft_ext.extension_loaded() will be False and ops fall back "
                    "to Triton / reference code.",
                    file=sys.stderr,
                )

    kind = "C++ CPU + CUDA" if with_cuda else "C++ CPU"
    print(f"craft_ext: compiling {kind} kernels from {len(sources)} sources", file=sys.stderr)
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

packages = find_packages(include=["craft_ext", "craft_ext.*"]) + ["craft_ext.kernels"]

setup(
    packages=packages,
    package_dir={"craft_ext.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp39"}} if ext_modules else {},
)
