"""Analysis tools for first-layer filters (CRAFT, Bhatta et al., arXiv 2312.00072).

Python API behind the ``craft-analyze`` console script:

* :func:`census` -- inactive filters at 1e-3 / 1e-6 by the weight criterion (max |w|) and the
  BN-folded one (max |w * gamma / sqrt(var + eps)|), first conv or every conv (paper Table 1);
* :func:`threshold_sweep` -- zero filters with max |w| <= theta and compare embeddings
  (paper Eq. 1);
* :func:`filter_grid` -- filters sorted by L1 as colour images, inactive (by weight and by
  fold) and reactivated filters marked (Fig. 4);
* :func:`filter_patterns` -- PCA + mean-shift clustering of the filters (Fig. 5);
* :func:`plot_trajectory` -- per-filter max |w| (raw and folded) over training steps with
  reactivations (Fig. 2).

Sources may be an ``nn.Module``, a state dict (any wrapper key prefix), a checkpoint dict
(craft-train's, or ``state_dict`` / ``model`` / ``net_state_dict`` / ``backbone`` wrappers), a
file holding either, or a craft-train run directory (see :mod:`craft_ext.analysis.io`). The
BatchNorm after a conv is found in the state dict by key order and channel count
(:func:`craft_ext.channel.channels_from_state_dict`): no network needs to be built.
"""

from __future__ import annotations

from .census import (
    DEFAULT_THRESHOLDS,
    LayerStats,
    census,
    format_census,
    inactive_mask,
    layer_stats,
    threshold_key,
)
from .figures import filter_grid
from .io import AnalysisError, first_conv, load_model, load_state_dict, unwrap_state_dict
from .patterns import choose_bandwidth, filter_patterns
from .runlog import reactivation_events, read_jsonl
from .threshold import DEFAULT_THETAS, format_sweep, input_size, load_images, threshold_sweep
from .trajectory import load_trajectory, plot_trajectory

__all__ = [
    "DEFAULT_THETAS",
    "DEFAULT_THRESHOLDS",
    "AnalysisError",
    "LayerStats",
    "census",
    "choose_bandwidth",
    "filter_grid",
    "filter_patterns",
    "first_conv",
    "format_census",
    "format_sweep",
    "inactive_mask",
    "input_size",
    "layer_stats",
    "load_images",
    "load_model",
    "load_state_dict",
    "load_trajectory",
    "plot_trajectory",
    "reactivation_events",
    "read_jsonl",
    "threshold_key",
    "threshold_sweep",
    "unwrap_state_dict",
]
