"""Unique filter patterns (paper Fig. 5).

The first-layer filters are flattened to an [N, C*kh*kw] matrix (64 x 27 for iresnet),
projected on their first two principal components for display, and clustered with mean
shift (scikit-learn) in the full weight space. The number of clusters is the number of
unique filter patterns; all inactive filters fall in one cluster near the origin.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .census import inactive_mask
from .figures import new_figure, save_figure
from .io import Source, first_conv, load_state_dict

__all__ = ["PATTERNS_DPI", "PATTERNS_FIGSIZE", "filter_patterns"]

PATTERNS_FIGSIZE = (8.0, 6.5)
PATTERNS_DPI = 100


def _bandwidth(x: np.ndarray, quantile: float) -> float:
    from sklearn.cluster import estimate_bandwidth

    n = x.shape[0]
    bw = float(estimate_bandwidth(x, quantile=quantile, n_samples=None)) if n > 1 else 0.0
    if not np.isfinite(bw) or bw <= 0:
        # all filters (nearly) identical: any positive bandwidth groups them
        spread = float(np.abs(x).max()) if x.size else 0.0
        bw = max(spread, 1e-12)
    return bw


def filter_patterns(
    source: Source,
    *,
    layer: str | None = None,
    bandwidth: float | None = None,
    quantile: float = 0.2,
    threshold: float = 1e-3,
    out: str | os.PathLike | None = None,
    figsize: tuple[float, float] = PATTERNS_FIGSIZE,
    dpi: int = PATTERNS_DPI,
) -> dict[str, Any]:
    """PCA + mean-shift clustering of the first-layer filters.

    Args:
        source: module, state dict, checkpoint or run directory.
        layer: state-dict name of the layer (default: first conv).
        bandwidth: mean-shift bandwidth in weight units (default: estimated with
            ``sklearn.cluster.estimate_bandwidth(quantile=quantile)``).
        quantile: quantile for the bandwidth estimate.
        threshold: inactive threshold, for marking inactive filters.
        out: PNG path for the scatter plot (none drawn when None).
        figsize, dpi: figure size; the PNG is ``figsize * dpi`` pixels.

    Returns:
        JSON-serialisable dict: ``layer``, ``filters``, ``clusters`` (number of unique
        patterns), ``labels`` [N], ``cluster_sizes``, ``bandwidth``, ``inactive`` (indices),
        ``inactive_clusters`` (labels holding inactive filters), ``explained_variance_ratio``,
        ``pca`` ([N, 2] coordinates) and ``out``.
    """
    from sklearn.cluster import MeanShift
    from sklearn.decomposition import PCA

    sd = load_state_dict(source)
    name, weight = first_conv(sd, layer)
    x = weight.detach().double().cpu().reshape(weight.shape[0], -1).numpy()
    n, d = x.shape
    inactive = inactive_mask(weight, threshold).numpy()

    bw = float(bandwidth) if bandwidth is not None else _bandwidth(x, quantile)
    labels = MeanShift(bandwidth=bw, bin_seeding=False).fit(x).labels_.astype(int)
    uniq, sizes = np.unique(labels, return_counts=True)

    k = min(2, n, d)
    varies = n > 1 and bool(np.any(x.std(axis=0) > 0))
    pca = PCA(n_components=k).fit(x) if varies else None
    coords = pca.transform(x) if pca is not None else np.zeros((n, k))
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    evr = pca.explained_variance_ratio_.tolist() if pca is not None else []

    result: dict[str, Any] = {
        "layer": name,
        "filters": int(n),
        "dims": int(d),
        "clusters": int(len(uniq)),
        "labels": labels.tolist(),
        "cluster_sizes": {int(u): int(s) for u, s in zip(uniq, sizes, strict=True)},
        "bandwidth": bw,
        "inactive": np.flatnonzero(inactive).tolist(),
        "inactive_clusters": sorted({int(v) for v in labels[inactive]}),
        "explained_variance_ratio": evr,
        "pca": coords.tolist(),
        "out": None,
    }
    if out is not None:
        result["out"] = _plot(result, coords, labels, inactive, out, figsize, dpi)
    return result


def _plot(
    result: dict[str, Any],
    coords: np.ndarray,
    labels: np.ndarray,
    inactive: np.ndarray,
    out: str | os.PathLike,
    figsize: tuple[float, float],
    dpi: int,
) -> str:
    import matplotlib

    fig = new_figure(figsize, dpi)
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["tab20"]
    for i, lab in enumerate(sorted(set(labels.tolist()))):
        sel = labels == lab
        act = sel & ~inactive
        ina = sel & inactive
        color = cmap(i % 20)
        label = f"pattern {lab} ({int(sel.sum())})"
        if act.any():
            ax.scatter(
                coords[act, 0],
                coords[act, 1],
                s=45,
                color=color,
                label=label,
                edgecolors="black",
                linewidths=0.4,
            )
            label = None
        if ina.any():
            ax.scatter(coords[ina, 0], coords[ina, 1], s=60, color=color, marker="x", label=label)
    for i, (px, py) in enumerate(coords[:, :2]):
        ax.annotate(
            str(i), (px, py), fontsize=6, alpha=0.6, xytext=(2, 2), textcoords="offset points"
        )
    evr = result["explained_variance_ratio"] + [0.0, 0.0]
    ax.set_xlabel(f"PC 1 ({100 * evr[0]:.1f}% variance)", fontsize=11)
    ax.set_ylabel(f"PC 2 ({100 * evr[1]:.1f}% variance)", fontsize=11)
    ax.set_title(
        f"{result['layer']}: {result['filters']} filters, {result['clusters']} unique patterns "
        f"(mean shift, bandwidth {result['bandwidth']:.3g}); x = inactive",
        fontsize=10,
    )
    ax.grid(True, alpha=0.3)
    if result["clusters"] <= 20:
        ax.legend(fontsize=8, loc="best", framealpha=0.8)
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.1, top=0.92)
    return save_figure(fig, out)
