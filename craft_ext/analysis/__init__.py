"""Analysis tools for first-layer filters (CRAFT, Bhatta et al., arXiv 2312.00072).

Python API behind the ``craft-analyze`` console script:

* :func:`census` -- inactive first-layer filters at 1e-3 / 1e-6 (paper Table 1);
* :func:`threshold_sweep` -- zero filters with max |w| <= theta and compare embeddings
  (paper Eq. 1);
* :func:`filter_grid` -- filters sorted by L1 as RGB planes and cross-channel std (Fig. 4);
* :func:`filter_patterns` -- PCA + mean-shift clustering of the filters (Fig. 5);
* :func:`plot_trajectory` -- per-filter max |w| / L1 over training with reactivations (Fig. 2).

Sources may be an ``nn.Module``, a state dict, a craft-train checkpoint dict, a file holding
either, or a craft-train run directory (see :mod:`craft_ext.analysis.io`).
"""

from __future__ import annotations

from .census import DEFAULT_THRESHOLDS, census, format_census, inactive_mask, threshold_key
from .figures import filter_grid
from .io import AnalysisError, first_conv, load_model, load_state_dict, unwrap_state_dict
from .patterns import filter_patterns
from .threshold import DEFAULT_THETAS, format_sweep, load_images, threshold_sweep
from .trajectory import load_trajectory, plot_trajectory, read_jsonl

__all__ = [
    "DEFAULT_THETAS",
    "DEFAULT_THRESHOLDS",
    "AnalysisError",
    "census",
    "filter_grid",
    "filter_patterns",
    "first_conv",
    "format_census",
    "format_sweep",
    "inactive_mask",
    "load_images",
    "load_model",
    "load_state_dict",
    "load_trajectory",
    "plot_trajectory",
    "read_jsonl",
    "threshold_key",
    "threshold_sweep",
    "unwrap_state_dict",
]
