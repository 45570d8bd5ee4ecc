"""Build script for craft_ext.

The package always ships its C++/CUDA sources as ``craft_ext/csrc``. The compiled extension
``craft_ext._C`` is built from them either

* here, at install time, when torch is importable in the build environment: ``pip install
  --no-build-isolation .`` (torch installed first) or an editable install; or
* on first ``import craft_ext`` (or by ``python -m craft_ext.build``), against the torch that
  imports it, into a cache directory: what a plain ``pip install .`` gives, since pip's isolated
  build environment has no torch (listing torch in the build requirements would build against
  another, freshly downloaded torch). See ``craft_ext/build.py``.

Both use the same sources and flags (``craft_ext/build.py``, loaded here by path):

* the C++ CPU kernels (``csrc/cpu/*.cpp``) always;
* the CUDA kernels (``csrc/cuda/*.cu``) when torch was built with CUDA (``torch.version.cuda``)
  and a CUDA toolkit is found (``CUDA_HOME``), or when ``FORCE_CUDA=1``. Whether a GPU is
  visible at build time does not matter;
* torch's standard flags (C++ standard included) plus ``-O3 -ffp-contract=off -DNDEBUG``.

Environment variables:

``FORCE_CUDA=1``            build the CUDA sources even if the checks above say no.
``TORCH_CUDA_ARCH_LIST``    GPU architectures (default ``"8.0;9.0"``: A100 and H100/H200).
``MAX_JOBS``                parallel compile jobs (read by torch's ninja build).
``CRAFT_EXT_NO_EXTENSION=1`` do not compile at install time.

If compilation fails here (no compiler, broken toolkit) the install still succeeds with a
warning; the first import then tries again and warns if it cannot compile either.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_module():
    """craft_ext/build.py without importing craft_ext (whose __init__ needs torch)."""
    spec = importlib.util.spec_from_file_location(
        "_craft_ext_build", os.path.join(ROOT, "craft_ext", "build.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


build = _load_build_module()


def _extensions():
    """Return (ext_modules, cmdclass) for the compiled extension, or ([], {})."""
    if build.truthy("CRAFT_EXT_NO_EXTENSION"):
        print("craft_ext: CRAFT_EXT_NO_EXTENSION set, not compiling csrc/", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print(
            "craft_ext: torch is not importable in this (isolated) build environment: the "
            "package ships csrc/ and compiles the kernels on first `import craft_ext` against "
            "the installed torch (or run `python -m craft_ext.build`); `pip install "
            "--no-build-isolation .` compiles them now.",
            file=sys.stderr,
        )
        return [], {}

    config = build.extension_config(build.Path(ROOT, "csrc"), torch)
    if config.cuda_arch_list:
        os.environ["TORCH_CUDA_ARCH_LIST"] = config.cuda_arch_list
    sources = [os.path.join("csrc", *s.split("/")) for s in config.sources]
    extra = {"cxx": list(config.cxx_flags)}
    if config.with_cuda:
        extra["nvcc"] = list(config.nvcc_flags)
    ext = (CUDAExtension if config.with_cuda else CppExtension)(
        "craft_ext._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        py_limited_api=True,
        # torch >= 2.6 defines Py_LIMITED_API (its minimum Python) for py_limited_api itself
        define_macros=[]
        if hasattr(cpp_extension, "min_supported_cpython")
        else [("Py_LIMITED_API", "0x030A0000")],
    )

    class OptionalBuildExtension(BuildExtension):
        """Compile the extension; on failure warn and install the pure-Python package."""

        def build_extension(self, ext):  # noqa: D401 - setuptools hook
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler missing, toolkit broken, ...
                print(
                    f"craft_ext: WARNING: could not compile {ext.name} ({exc}); installing "
                    "without it. The first `import craft_ext` tries again (and warns if it "
                    "fails too); ops fall back to Triton / reference code meanwhile.",
                    file=sys.stderr,
                )

    print(
        f"craft_ext: compiling {build.describe(config)} kernels from {len(sources)} sources",
        file=sys.stderr,
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

# csrc/ ships as package data (craft_ext/csrc/...) so that an installed craft_ext can compile
# itself; its folders become data-only packages.
csrc_packages = sorted(
    "craft_ext." + os.path.relpath(d, ROOT).replace(os.sep, ".")
    for d, _, _ in os.walk(os.path.join(ROOT, "csrc"))
    if "__pycache__" not in d
)
packages = find_packages(include=["craft_ext", "craft_ext.*"]) + ["craft_ext.kernels"]

setup(
    packages=packages + csrc_packages,
    package_dir={"craft_ext.kernels": "kernels", "craft_ext.csrc": "csrc"},
    package_data={name: ["*.cpp", "*.h", "*.cu", "*.cuh", "*.hpp"] for name in csrc_packages},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
