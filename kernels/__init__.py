"""Triton kernels of craft_ext, installed as ``craft_ext.kernels``.

Importing a submodule registers its ops (``torch.library.triton_op``) as
``torch.ops.craft_ext.<op>_triton``. Kernels run on CUDA GPUs, and on CPU tensors under
``TRITON_INTERPRET=1`` (set before the first import; slow, for tests).
"""

from __future__ import annotations

import importlib

_SUBMODULES = ("filter_stats", "reactivate", "feature_map_stats", "connection_scores")

for _name in _SUBMODULES:
    importlib.import_module(f"{__name__}.{_name}")
