"""craft_ext: CRAFT filter reactivation and face-recognition training kernels for PyTorch.

Face-recognition CNNs end training with many first-layer filters *inactive* (every weight
within 1e-3 of zero). CRAFT (Bhatta et al., arXiv 2312.00072) overwrites each with the
negative of a strong active filter at every epoch end. craft_ext does this on the device with
fused kernels and no host synchronisation.

Quick use::

    import craft_ext
    stats = craft_ext.filter_stats(model.conv1.weight)          # max_abs, l1, mean, std
    r = craft_ext.reactivate_(model.conv1.weight)               # in place, CRAFT rule
    print(int(r.count), "filters reactivated")

    # BN-aware: detect on the folded filter, revive the whole channel (conv + BN + PReLU)
    r = craft_ext.reactivate_(model.conv1.weight, bn=model.bn1, prelu=model.prelu,
                              criterion="folded")
    opt = craft_ext.ReactivatingSGD(model.parameters(), lr=0.1, momentum=0.9,
                                    reactivate=craft_ext.channels_of(model, "conv1"),
                                    criterion="folded")

Importing craft_ext does not initialise CUDA.
"""

from __future__ import annotations

from ._extension import extension_error, extension_loaded
from .channel import CRITERIA, Channel, channel_of, channels_of
from .counter_rng import CounterGenerator
from .ops import (
    BACKENDS,
    METHODS,
    FeatureMapStats,
    FilterStats,
    Reactivation,
    available_backends,
    feature_map_stats,
    filter_stats,
    reactivate_,
    resolve_backend,
    use_backend,
)
from .optim import ReactivatingSGD
from .reactivator import ReactivationEvent, Reactivator

__version__ = "0.1.0"

# Subpackages load on first use (``craft_ext.models``, ...), keeping ``import craft_ext`` light.
_SUBMODULES = frozenset(
    {"analysis", "checkpoint", "data", "demo", "eval", "heads", "losses", "models", "pruning",
     "pruning_cli", "sparsify", "train"}
)  # fmt: skip


def __getattr__(name: str) -> object:
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "CRITERIA",
    "METHODS",
    "Channel",
    "CounterGenerator",
    "FeatureMapStats",
    "FilterStats",
    "ReactivatingSGD",
    "Reactivation",
    "ReactivationEvent",
    "Reactivator",
    "available_backends",
    "channel_of",
    "channels_of",
    "extension_error",
    "extension_loaded",
    "feature_map_stats",
    "filter_stats",
    "reactivate_",
    "resolve_backend",
    "use_backend",
]
