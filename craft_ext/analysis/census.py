"""Census of inactive filters (paper Table 1).

A filter is *inactive* at threshold ``t`` when every weight satisfies ``|w| <= t``, i.e. its
``max_abs <= t`` (the same rule as :func:`craft_ext.reactivate_`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..ops import filter_stats
from .io import Source, conv_weights, first_conv, load_state_dict

__all__ = ["DEFAULT_THRESHOLDS", "census", "format_census", "inactive_mask", "threshold_key"]

DEFAULT_THRESHOLDS: tuple[float, ...] = (1e-3, 1e-6)


def threshold_key(t: float) -> str:
    """Compact spelling of a threshold used in result keys: ``1e-3``, ``2.5e-4``, ``0``."""
    if t == 0:
        return "0"
    mantissa, exponent = f"{t:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def inactive_mask(weight: Tensor, threshold: float = 1e-3) -> Tensor:
    """Bool [N] on CPU: filters of ``weight`` [N, ...] whose max |w| is ``<= threshold``."""
    return filter_stats(weight.detach()).max_abs.cpu() <= threshold


def _layer_census(name: str, weight: Tensor, thresholds: Sequence[float]) -> dict[str, Any]:
    stats = filter_stats(weight.detach())
    max_abs = stats.max_abs.cpu()
    entry: dict[str, Any] = {
        "layer": name,
        "shape": list(weight.shape),
        "filters": int(weight.shape[0]),
    }
    for t in thresholds:
        key = threshold_key(t)
        idx = torch.nonzero(max_abs <= t).flatten().tolist()
        entry[f"inactive_{key}"] = len(idx)
        entry[f"fraction_{key}"] = len(idx) / max(int(weight.shape[0]), 1)
        entry[f"indices_{key}"] = idx
    entry["max_abs_min"] = float(max_abs.min()) if max_abs.numel() else float("nan")
    entry["l1_total"] = float(stats.l1.sum())
    return entry


def census(
    source: Source,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    all_layers: bool = False,
    layer: str | None = None,
) -> dict[str, Any]:
    """Count the inactive filters of the first conv layer (and optionally of every conv layer).

    Args:
        source: module, state dict, checkpoint dict, checkpoint file or run directory.
        thresholds: thresholds ``t`` (filter inactive when max |w| <= t).
        all_layers: also report every 4-D conv weight under ``"layers"``.
        layer: state-dict name of the layer to report at top level (default: first conv).

    Returns:
        A JSON-serialisable dict: ``layer``, ``shape``, ``filters``, and per threshold key
        ``k`` (see :func:`threshold_key`, e.g. ``1e-3``) ``inactive_k`` (count),
        ``fraction_k`` and ``indices_k``; ``layers`` (list of the same per layer) and
        ``total_filters`` / ``total_inactive_k`` when ``all_layers``.
    """
    thresholds = tuple(float(t) for t in thresholds)
    sd = load_state_dict(source)
    name, weight = first_conv(sd, layer)
    result = _layer_census(name, weight, thresholds)
    result["thresholds"] = list(thresholds)
    if all_layers:
        layers = [_layer_census(k, v, thresholds) for k, v in conv_weights(sd).items()]
        result["layers"] = layers
        result["total_filters"] = sum(e["filters"] for e in layers)
        for t in thresholds:
            key = threshold_key(t)
            result[f"total_inactive_{key}"] = sum(e[f"inactive_{key}"] for e in layers)
    return result


def format_census(result: dict[str, Any]) -> str:
    """Human-readable table of a :func:`census` result."""
    keys = [threshold_key(t) for t in result["thresholds"]]
    lines = [
        f"first layer {result['layer']} {tuple(result['shape'])}: {result['filters']} filters",
    ]
    for k in keys:
        n = result[f"inactive_{k}"]
        lines.append(
            f"  inactive (max|w| <= {k}): {n:4d} / {result['filters']} "
            f"({100.0 * result[f'fraction_{k}']:.1f}%)  {result[f'indices_{k}']}"
        )
    if "layers" in result:
        width = max([len(e["layer"]) for e in result["layers"]] + [5])
        header = f"{'layer':<{width}} {'filters':>8} " + " ".join(f"{'<=' + k:>10}" for k in keys)
        lines += ["", header, "-" * len(header)]
        for e in result["layers"]:
            cells = " ".join(f"{e[f'inactive_{k}']:>10d}" for k in keys)
            lines.append(f"{e['layer']:<{width}} {e['filters']:>8d} {cells}")
        total = " ".join(f"{result[f'total_inactive_{k}']:>10d}" for k in keys)
        lines.append(f"{'total':<{width}} {result['total_filters']:>8d} {total}")
    return "\n".join(lines)
