"""Loading of the compiled extension ``craft_ext._C`` and of the Triton kernels package.

``craft_ext._C`` comes from, first match wins:

1. a prebuilt ``craft_ext/_C*.so``, compiled at install time (``pip install
   --no-build-isolation .``, an editable install) or by ``python setup.py build_ext --inplace``;
2. the compile cache (see :mod:`craft_ext.build`), filled by an earlier import or by
   ``python -m craft_ext.build``;
3. compiled now into that cache, once, with a message and progress on stderr (the case after a
   plain ``pip install .``, whose isolated build has no torch to compile against).

When none works (no compiler, broken toolkit) importing craft_ext warns once, saying what failed,
where the log is and how to fix it, ``extension_loaded()`` is False and every op runs on its
Triton or reference code. ``CRAFT_EXT_REQUIRE_EXTENSION=1`` makes that an ImportError;
``CRAFT_EXT_NO_EXTENSION=1`` neither compiles nor loads the extension.

Neither initialises CUDA: loading ``_C`` registers operators with the dispatcher, and importing
Triton only reads its Python modules. A prebuilt or cached ``_C`` loads without a compiler call.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import time
import warnings
from pathlib import Path

import torch

# `python -m craft_ext.build` runs build.py as __main__ after this package imported it
warnings.filterwarnings(
    "ignore", message=r"'craft_ext\.build' found in sys\.modules", category=RuntimeWarning
)

from . import build as _build  # noqa: E402  (after the filter above)

#: How ``craft_ext._C`` was obtained at import: ``origin`` (prebuilt, cache, compiled, disabled,
#: missing), ``path`` of the library, ``seconds`` spent finding, compiling and loading it.
EXTENSION_INFO: dict[str, object] = {}


def _load_extension() -> str | None:
    """Load ``craft_ext._C``; fill EXTENSION_INFO; return why it is not loaded (None: loaded)."""
    if _build.truthy("CRAFT_EXT_NO_EXTENSION"):
        EXTENSION_INFO.update(origin="disabled")
        return "disabled by CRAFT_EXT_NO_EXTENSION=1 (unset it to compile and load the kernels)"
    prebuilt = ""
    spec = importlib.util.find_spec("craft_ext._C")
    if spec is not None:
        try:
            from craft_ext import _C  # noqa: F401  (registers torch.ops.craft_ext.*)

            EXTENSION_INFO.update(origin="prebuilt", path=spec.origin)
            return None
        except ImportError as exc:  # e.g. compiled against another torch
            prebuilt = f"the prebuilt {spec.origin} does not load ({exc}); "
            print(f"craft_ext: {prebuilt}using the compile cache instead", file=sys.stderr)
    try:
        target = _build.target()
        compiled = not _build.ready(target)
        library = _build.ensure_built() if compiled else target.library
        _build.load(library)
    except Exception as exc:  # no compiler, broken toolkit, unwritable cache, ...
        EXTENSION_INFO.update(origin="missing", log=str(getattr(exc, "log", None) or ""))
        return f"{prebuilt}{exc}"
    EXTENSION_INFO.update(origin="compiled" if compiled else "cache", path=str(library))
    return None


_start = time.perf_counter()
_EXTENSION_ERROR: str | None = _load_extension()
_EXTENSION_LOADED = _EXTENSION_ERROR is None
EXTENSION_INFO["seconds"] = round(time.perf_counter() - _start, 4)
if not _EXTENSION_LOADED:
    if _build.truthy("CRAFT_EXT_REQUIRE_EXTENSION"):
        raise ImportError(
            f"craft_ext: CRAFT_EXT_REQUIRE_EXTENSION=1 but the compiled kernels are not "
            f"available: {_EXTENSION_ERROR}"
        )
    if EXTENSION_INFO.get("origin") != "disabled":
        warnings.warn(
            f"craft_ext: compiled kernels not available, ops fall back to their Triton / "
            f"reference code (slower): {_EXTENSION_ERROR} (CRAFT_EXT_NO_EXTENSION=1 silences "
            "this warning, CRAFT_EXT_REQUIRE_EXTENSION=1 makes it an error)",
            RuntimeWarning,
            stacklevel=1,
        )


def extension_loaded() -> bool:
    """Whether the compiled csrc extension (``craft_ext._C``) is loaded.

    False when the kernels could not be compiled (importing craft_ext then warned why) or with
    ``CRAFT_EXT_NO_EXTENSION=1``: every op then runs on its Triton or reference backend.
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
