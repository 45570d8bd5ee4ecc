"""Loading of the compiled extension ``craft_ext._C`` and of the Triton kernels package.

Neither initialises CUDA: loading ``_C`` registers operators with the dispatcher, and importing
Triton only reads its Python modules.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import torch

_EXTENSION_ERROR: str | None = None
_EXTENSION_LOADED = False
if importlib.util.find_spec("craft_ext._C") is None:
    _EXTENSION_ERROR = (
        "craft_ext._C is not built: install with `pip install --no-build-isolation .` after "
        "torch (or `python setup.py build_ext --inplace` in a checkout)"
    )
else:
    try:
        from craft_ext import _C  # noqa: F401  (registers torch.ops.craft_ext.*)

        _EXTENSION_LOADED = True
    except ImportError as exc:  # e.g. compiled against another torch
        _EXTENSION_ERROR = f"craft_ext._C failed to load: {exc}"


def extension_loaded() -> bool:
    """Whether the compiled csrc extension (``craft_ext._C``) is loaded.

    False when the package was installed without a compiler (or with
    ``CRAFT_EXT_NO_EXTENSION=1``): every op then runs on its Triton or reference backend.
    """
    return _EXTENSION_LOADED


def extension_error() -> str | None:
    """Why the compiled extension could not be imported (None when it was)."""
    return _EXTENSION_ERROR


@torch.compiler.assume_constant_result
def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``torch.ops.craft_ext.<op>`` has a compiled kernel for ``dispatch_key``.

    Kernels are registered when ``craft_ext._C`` is imported, so under ``torch.compile`` the
    answer is a constant of the trace.
    """
    if not _EXTENSION_LOADED or not torch._C._dispatch_has_kernel(f"craft_ext::{op}"):
        return False  # no compiled schema for this op (e.g. a Triton/torch-only op)
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"craft_ext::{op}", dispatch_key)


def _import_kernels():
    """Import ``craft_ext.kernels`` (the Triton kernels); None when Triton is unavailable.

    Installed, ``kernels/`` is the subpackage ``craft_ext.kernels``. In a source checkout it
    sits beside ``craft_ext/``, and is loaded from there under the same name.
    """
    if importlib.util.find_spec("triton") is None:
        return None
    if "craft_ext.kernels" in sys.modules:
        return sys.modules["craft_ext.kernels"]
    here = Path(__file__).resolve().parent
    if (here / "kernels" / "__init__.py").is_file():
        return importlib.import_module("craft_ext.kernels")
    src = here.parent / "kernels"
    spec = importlib.util.spec_from_file_location(
        "craft_ext.kernels", src / "__init__.py", submodule_search_locations=[str(src)]
    )
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    sys.modules["craft_ext.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules["craft_ext.kernels"]
        raise
    return module


try:
    KERNELS = _import_kernels()
    TRITON_ERROR: str | None = None if KERNELS is not None else "triton is not installed"
except ImportError as exc:  # triton present but broken
    KERNELS = None
    TRITON_ERROR = str(exc)
