"""Unique filter patterns (paper Fig. 5).

The first-layer filters are flattened to an [N, C*kh*kw] matrix (64 x 27 for iresnet),
clustered with mean shift (scikit-learn, flat kernel) in the full weight space and projected
on their first two principal components for display. The number of clusters is the number
of unique filter patterns; all inactive filters fall in one cluster near the origin.

Bandwidth. sklearn's ``estimate_bandwidth(quantile=q)`` (the mean distance to the
``int(N * q)``-th nearest neighbour) breaks down for N = 32-64 filters in 27 dimensions:
distances concentrate, the 6th neighbour of a filter is about as far as any other filter,
and scattered filters all merge into one pattern. By default the bandwidth is therefore
**half the median pairwise Euclidean distance between the active filters** (max |w| >
threshold): two filters belong to one pattern when they are much closer than two typical
filters are. The median of the N(N-1)/2 distances is stable for small N; the inactive filters
(one pattern by definition, near the origin) are left out of it so that a layer with many
dead filters is not judged by them. On trained iresnet first layers (64 filters) this gives
10-18 patterns, planted clusters are recovered exactly, and 32 untrained (random) filters are
32 patterns; sklearn's estimate is still available with ``quantile=``.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .census import layer_stats
from .io import Source, load_state_dict
from .plotting import DEAD_FOLDED, MARKERS, QUALITATIVE, new_figure, plural, save_figure

__all__ = ["PATTERNS_DPI", "PATTERNS_FIGSIZE", "choose_bandwidth", "filter_patterns"]

PATTERNS_FIGSIZE = (10.0, 6.0)
PATTERNS_DPI = 100
#: default bandwidth: this fraction of the median pairwise distance between active filters
PAIRWISE_FRACTION = 0.5


def choose_bandwidth(
    x: np.ndarray, active: np.ndarray, quantile: float | None = None
) -> tuple[float, str]:
    """``(bandwidth, rule)`` for mean shift on the rows of ``x`` [N, D] (module docs).

    Default: :data:`PAIRWISE_FRACTION` times the median pairwise distance between the rows
    flagged ``active`` (all rows when fewer than 2 are). With ``quantile``: sklearn's
    ``estimate_bandwidth(x, quantile=quantile)``. ``rule`` says which was used, in words.
    A zero estimate (identical filters) falls back to the data's largest |value| (any positive
    bandwidth then groups them).
    """
    n = x.shape[0]
    if quantile is not None:
        from sklearn.cluster import estimate_bandwidth

        bw = float(estimate_bandwidth(x, quantile=quantile, n_samples=None)) if n > 1 else 0.0
        rule = f"sklearn estimate_bandwidth(quantile={quantile:g})"
    else:
        from scipy.spatial.distance import pdist

        pts = x[active] if int(active.sum()) >= 2 else x
        d = pdist(pts) if pts.shape[0] > 1 else np.zeros(0)
        bw = PAIRWISE_FRACTION * float(np.median(d)) if d.size else 0.0
        which = "active " if pts.shape[0] < n else ""
        rule = (
            f"{PAIRWISE_FRACTION:g} x median pairwise distance of the {pts.shape[0]} {which}filters"
        )
    if not np.isfinite(bw) or bw <= 0:
        spread = float(np.abs(x).max()) if x.size else 0.0
        bw = max(spread, 1e-12)
        rule += " (zero: identical filters; max |w| used)"
    return bw, rule


def filter_patterns(
    source: Source,
    *,
    layer: str | None = None,
    bandwidth: float | None = None,
    quantile: float | None = None,
    threshold: float = 1e-3,
    out: str | os.PathLike | None = None,
    figsize: tuple[float, float] = PATTERNS_FIGSIZE,
    dpi: int = PATTERNS_DPI,
) -> dict[str, Any]:
    """PCA + mean-shift clustering of the first-layer filters (module docs).

    Args:
        source: module, state dict, checkpoint or run directory.
        layer: state-dict name of the layer (default: first conv).
        bandwidth: mean-shift bandwidth in weight units (> 0; default: :func:`choose_bandwidth`).
        quantile: estimate the bandwidth with sklearn's ``estimate_bandwidth(quantile=...)``
            instead of the default rule.
        threshold: inactive threshold: marks inactive filters (by weight and, with a
            BatchNorm after the conv, by the folded criterion) and leaves them out of the
            default bandwidth estimate.
        out: PNG path for the scatter plot (none drawn when None).
        figsize, dpi: figure size; the PNG is ``figsize * dpi`` pixels.

    Returns:
        JSON-serialisable dict: ``layer``, ``filters``, ``dims``, ``clusters`` (number of
        unique patterns), ``labels`` [N] (0 = largest pattern), ``cluster_sizes``,
        ``bandwidth``, ``bandwidth_rule`` (how it was chosen), ``inactive`` (indices, by
        weight), ``inactive_folded`` (by the folded criterion; = ``inactive`` without a
        BatchNorm), ``bn``, ``inactive_clusters`` (labels holding weight-inactive filters),
        ``explained_variance_ratio``, ``pca`` ([N, 2] coordinates) and ``out``.
    """
    from sklearn.cluster import MeanShift
    from sklearn.decomposition import PCA

    sd = load_state_dict(source)
    ls = layer_stats(sd, layer)
    weight = ls.weight
    x = weight.detach().double().cpu().reshape(weight.shape[0], -1).numpy()
    n, d = x.shape
    inactive = ls.dead(threshold).numpy()
    inactive_f = ls.dead(threshold, folded=True).numpy()

    if bandwidth is not None:
        bw, rule = float(bandwidth), "given"
    else:
        bw, rule = choose_bandwidth(x, ~inactive, quantile)
    raw = MeanShift(bandwidth=bw, bin_seeding=False).fit(x).labels_.astype(int)
    # relabel by size (0 = largest pattern), ties by first filter: stable colours and legend
    uniq, sizes = np.unique(raw, return_counts=True)
    first = np.asarray([np.flatnonzero(raw == u)[0] for u in uniq])
    rank = {int(u): r for r, u in enumerate(uniq[np.lexsort((first, -sizes))])}
    labels = np.asarray([rank[int(v)] for v in raw], dtype=int)
    uniq, sizes = np.unique(labels, return_counts=True)

    k = min(2, n, d)
    varies = n > 1 and bool(np.any(x.std(axis=0) > 0))
    pca = PCA(n_components=k).fit(x) if varies else None
    coords = pca.transform(x) if pca is not None else np.zeros((n, k))
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    evr = pca.explained_variance_ratio_.tolist() if pca is not None else []

    result: dict[str, Any] = {
        "layer": ls.name,
        "filters": int(n),
        "dims": int(d),
        "clusters": int(len(uniq)),
        "labels": labels.tolist(),
        "cluster_sizes": {int(u): int(s) for u, s in zip(uniq, sizes, strict=True)},
        "bandwidth": bw,
        "bandwidth_rule": rule,
        "threshold": float(threshold),
        "bn": ls.bn,
        "inactive": np.flatnonzero(inactive).tolist(),
        "inactive_folded": np.flatnonzero(inactive_f).tolist(),
        "inactive_clusters": sorted({int(v) for v in labels[inactive]}),
        "explained_variance_ratio": evr,
        "pca": coords.tolist(),
        "out": None,
    }
    if out is not None:
        result["out"] = _plot(result, coords, labels, inactive, inactive_f, out, figsize, dpi)
    return result


_LEGEND_PATTERNS = 10  # patterns listed by name in the legend (one per colour); rest summarised


def _scatter(ax: Any, coords: np.ndarray, labels: np.ndarray, masks: dict[str, np.ndarray]) -> None:
    """Filters coloured by pattern (colour, then marker shape), inactive ones overlaid,
    indices annotated."""
    for lab in np.unique(labels):
        sel = labels == lab
        ax.scatter(
            coords[sel, 0],
            coords[sel, 1],
            s=46,
            color=QUALITATIVE[lab % len(QUALITATIVE)],
            marker=MARKERS[(lab // len(QUALITATIVE)) % len(MARKERS)],
            edgecolors="black",
            linewidths=0.4,
            zorder=3,
        )
    w, f = masks["weight"], masks["folded_only"]
    ax.scatter(coords[w, 0], coords[w, 1], s=70, marker="x", color="black", lw=1.0, zorder=4)
    ax.scatter(
        coords[f, 0],
        coords[f, 1],
        s=110,
        facecolors="none",
        edgecolors=DEAD_FOLDED,
        lw=1.4,
        zorder=4,
    )
    for i, (px, py) in enumerate(coords[:, :2]):
        ax.annotate(
            str(i), (px, py), fontsize=6, alpha=0.6, xytext=(3, 3), textcoords="offset points"
        )
    ax.grid(True, alpha=0.3)


def _handles(result: dict[str, Any], labels: np.ndarray, masks: dict[str, np.ndarray]) -> list:
    """Legend entries: the largest patterns, then inactive marks that occur."""
    from matplotlib.lines import Line2D

    handles = []
    for lab in range(min(result["clusters"], _LEGEND_PATTERNS)):
        handles.append(
            Line2D(
                [],
                [],
                ls="",
                marker=MARKERS[(lab // len(QUALITATIVE)) % len(MARKERS)],
                color=QUALITATIVE[lab % len(QUALITATIVE)],
                mec="black",
                mew=0.4,
                label=f"pattern {lab} ({plural(int((labels == lab).sum()), 'filter')})",
            )
        )
    if result["clusters"] > _LEGEND_PATTERNS:
        rest = result["clusters"] - _LEGEND_PATTERNS
        handles.append(Line2D([], [], ls="", label=f"... and {plural(rest, 'more pattern')}"))
    t = f"{result['threshold']:g}"
    if masks["weight"].any():
        n = int(masks["weight"].sum())
        label = f"inactive by weight, max|w| \u2264 {t} ({n})"
        handles.append(Line2D([], [], ls="", marker="x", color="black", label=label))
    if masks["folded_only"].any():
        n = int(masks["folded_only"].sum())
        handles.append(
            Line2D(
                [],
                [],
                ls="",
                marker="o",
                mfc="none",
                mec=DEAD_FOLDED,
                mew=1.4,
                ms=9,
                label=f"dead through BN only, max|w\u00b7s| \u2264 {t} ({n})",
            )
        )
    return handles


def _bulk_box(coords: np.ndarray) -> tuple[float, float, float, float] | None:
    """(x0, x1, y0, y1) around the central 75% of the points when they fill less than a tenth
    of the plot's extent (a few strong filters spread the projection and crowd the others near
    the origin), else None."""
    if coords.shape[0] < 8:
        return None
    centre = np.median(coords, axis=0)
    dist = np.linalg.norm(coords - centre, axis=1)
    bulk = coords[dist <= np.quantile(dist, 0.75)]
    lo, hi = bulk.min(axis=0), bulk.max(axis=0)
    span = coords.max(axis=0) - coords.min(axis=0)
    if np.any(span <= 0) or np.prod((hi - lo) / span) >= 0.1:
        return None
    pad = 0.12 * np.maximum(hi - lo, 1e-3 * span)
    return lo[0] - pad[0], hi[0] + pad[0], lo[1] - pad[1], hi[1] + pad[1]


def _plot(
    result: dict[str, Any],
    coords: np.ndarray,
    labels: np.ndarray,
    inactive: np.ndarray,
    inactive_f: np.ndarray,
    out: str | os.PathLike,
    figsize: tuple[float, float],
    dpi: int,
) -> str:
    """The PCA scatter (left), the legend (right) and, when most filters crowd near the
    origin, a zoom on them (bottom right)."""
    masks = {"weight": inactive, "folded_only": inactive_f & ~inactive}
    fig = new_figure(figsize, dpi)
    ax = fig.add_axes((0.09, 0.1, 0.53, 0.76))
    _scatter(ax, coords, labels, masks)
    evr = result["explained_variance_ratio"] + [0.0, 0.0]
    ax.set_xlabel(f"PC 1 ({100 * evr[0]:.1f}% of variance)", fontsize=10)
    ax.set_ylabel(f"PC 2 ({100 * evr[1]:.1f}% of variance)", fontsize=10)
    box = _bulk_box(coords)
    legend_box = (0.66, 0.5, 0.33, 0.4) if box is not None else (0.66, 0.1, 0.33, 0.8)
    fig.legend(
        handles=_handles(result, labels, masks),
        loc="center left",
        bbox_to_anchor=legend_box,
        fontsize=7.5,
        frameon=False,
        handletextpad=0.3,
    )
    if box is not None:
        inset = fig.add_axes((0.7, 0.1, 0.27, 0.36))
        _scatter(inset, coords, labels, masks)
        inset.set_xlim(box[0], box[1])
        inset.set_ylim(box[2], box[3])
        inset.tick_params(labelsize=6.5)
        inset.set_title("zoom on the grey box", fontsize=8)
        zoom = ax.indicate_inset_zoom(inset, edgecolor="#444444", alpha=0.8)
        connectors = getattr(zoom, "connectors", None) or (
            zoom[1] if isinstance(zoom, tuple) else []
        )
        for line in connectors:  # the box alone: connectors would cross the legend
            line.set_visible(False)
    fig.suptitle(
        f"{result['layer']}: {plural(result['filters'], 'filter')}, "
        f"{plural(result['clusters'], 'unique pattern')} (PCA projection)",
        fontsize=11,
        y=0.975,
    )
    fig.text(
        0.5,
        0.925,
        f"mean shift in the {result['dims']}-D weight space, bandwidth "
        f"{result['bandwidth']:.3g}: {result['bandwidth_rule']}",
        ha="center",
        fontsize=8.5,
        color="#333333",
    )
    return save_figure(fig, out)
