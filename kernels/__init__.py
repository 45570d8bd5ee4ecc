"""Triton kernels of craft_ext, installed as ``craft_ext.kernels``.

Importing a submodule registers its ops (``torch.library.triton_op``) as
``torch.ops.craft_ext.<op>_triton``. Kernels run on CUDA GPUs, and on CPU tensors under
``TRITON_INTERPRET=1`` (set before the first import; slow, for tests).
"""

from __future__ import annotations

import importlib

_SUBMODULES = ("filter_stats", "reactivate", "connection_scores")

for _name in _SUBMODULES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as _exc:  # a kernel file not written yet in this checkout
        if _exc.name != f"{__name__}.{_name}":
            raise
