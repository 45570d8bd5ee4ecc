"""Filter grid figure (paper Fig. 4).

The first-layer filters, sorted by L1 norm (strongest first) in row-major order, each drawn
as one colour image: its R, G, B input-channel weights as the pixel's red, green and blue,
scaled symmetrically per filter (``0.5 + 0.5 * w / max |w|``: zero is mid grey, the filter's
largest positive weight full intensity), as filter visualisations usually are. A conv with
other than 3 input channels is drawn in grey, its weights averaged over input channels.

Under each filter: its index in the layer and its L1 norm. Frames mark inactive filters: solid
red by the weight criterion (max |w| <= t), dashed purple for filters dead only through the
BatchNorm after the conv (max |w * s| <= t < max |w|, s = gamma / sqrt(running_var + eps)),
the latter only when the source has such a BatchNorm; a blue triangle marks filters a run
reactivated (from its ``reactivations.jsonl``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .census import layer_stats, threshold_key
from .io import AnalysisError, Source, load_state_dict
from .plotting import DEAD_FOLDED, DEAD_WEIGHT, REACTIVATED, new_figure, plural, save_figure
from .runlog import reactivation_events

__all__ = ["GRID_DPI", "filter_grid", "filter_images", "grid_figsize", "new_figure", "save_figure"]

GRID_DPI = 100
_CELL = (0.95, 1.12)  # inches per filter: tile + label
_TOP, _BOTTOM, _SIDE = 0.78, 0.5, 0.15  # margins in inches: title, legend, sides


def filter_images(weight: np.ndarray) -> np.ndarray:
    """Per-filter symmetric normalisation of a conv weight [N, C, kh, kw] to images
    [N, kh, kw, 3] in [0, 1]: ``0.5 + 0.5 * w / max |w|`` per filter (an all-zero filter is
    uniform mid grey). C == 3: the input channels are R, G, B; otherwise the weights are
    averaged over input channels and drawn in grey."""
    w = np.asarray(weight, dtype=np.float64)
    if w.ndim != 4:
        raise AnalysisError(f"expected a conv weight [N, C, kh, kw], got {tuple(w.shape)}")
    if w.shape[1] != 3:
        w = np.repeat(w.mean(axis=1, keepdims=True), 3, axis=1)
    peak = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
    peak = np.where(peak > 0, peak, 1.0)[:, None, None, None]
    return np.clip(0.5 + 0.5 * w / peak, 0.0, 1.0).transpose(0, 2, 3, 1)


def grid_figsize(filters: int, cols: int) -> tuple[float, float]:
    """Default figure size in inches for ``filters`` tiles in ``cols`` columns: about one
    inch per filter plus title and legend, no blank margins."""
    rows = max(1, math.ceil(filters / cols))
    width = max(cols * _CELL[0] + 2 * _SIDE, 6.4)  # the legend needs ~6.4 in
    return round(width, 2), round(rows * _CELL[1] + _TOP + _BOTTOM, 2)


def _reactivated(source: Source, reactivations: Any, layer: str) -> list[int] | None:
    """Reactivated filter indices: from ``reactivations`` (indices, a reactivations.jsonl or a
    run directory) or, when None, from the run directory ``source``; None if unknown."""
    if reactivations is None:
        if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
            reactivations = Path(source)
        else:
            return None
    if isinstance(reactivations, (str, os.PathLike)):
        path = Path(reactivations)
        if not path.exists():
            raise FileNotFoundError(f"no such reactivations file: {str(path)!r}")
        if path.is_dir() and not (path / "reactivations.jsonl").is_file():
            return None
        events = reactivation_events(path, layer)
        return sorted({int(f) for e in events for f in e["filters"]})
    return sorted({int(f) for f in reactivations})


def filter_grid(
    source: Source,
    out: str | os.PathLike,
    *,
    layer: str | None = None,
    cols: int = 8,
    descending: bool = True,
    threshold: float = 1e-3,
    reactivations: Any = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = GRID_DPI,
    title: str | None = None,
) -> dict[str, Any]:
    """Draw the first-layer filter grid (Fig. 4, module docs) to a PNG.

    Args:
        source: module, state dict, checkpoint or run directory.
        out: PNG path (its directory must exist).
        layer: state-dict name of the layer (default: first conv).
        cols: filters per grid row.
        descending: sort by L1 from strongest (True) or weakest.
        threshold: inactive threshold ``t`` of the marks.
        reactivations: reactivated filters to mark: a list of indices, a
            ``reactivations.jsonl`` or a run directory; default: the run directory ``source``'s
            log, if it is one (none marked otherwise).
        figsize, dpi: figure size (default :func:`grid_figsize`); the PNG is
            ``figsize * dpi`` pixels.
        title: first title line (default: layer name, shape and sort order).

    Returns:
        dict with ``out``, ``layer``, ``filters``, ``bn`` (BatchNorm folded into the marks, or
        None), ``order`` (filter index at each grid position), ``l1`` (sorted L1 norms),
        ``inactive`` (by weight), ``inactive_folded`` (by the folded criterion; equal to
        ``inactive`` without a BatchNorm), ``reactivated`` (indices, or None when unknown).
    """
    sd = load_state_dict(source)
    ls = layer_stats(sd, layer)
    if ls.weight.dim() != 4:
        raise AnalysisError(f"{ls.name!r} of shape {tuple(ls.weight.shape)} is not a conv weight")
    n = int(ls.weight.shape[0])
    order = torch.argsort(ls.l1, descending=descending, stable=True).numpy()
    images = filter_images(ls.weight.detach().float().cpu().numpy())
    dead_w = ls.dead(threshold).numpy()
    dead_f = ls.dead(threshold, folded=True).numpy()
    revived = _reactivated(source, reactivations, ls.name)
    revived_set = set(revived or [])

    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    fw, fh = figsize or grid_figsize(n, cols)
    fig = new_figure((fw, fh), dpi)
    grid_w = min(cols * _CELL[0], fw - 2 * _SIDE)
    left = (fw - grid_w) / 2 / fw
    axes = fig.subplots(
        rows,
        cols,
        squeeze=False,
        gridspec_kw={
            "left": left,
            "right": 1 - left,
            "top": 1 - min(_TOP / fh, 0.3),
            "bottom": min(_BOTTOM / fh, 0.25),
            "wspace": 0.12,
            "hspace": 0.32,
        },
    )
    for pos, ax in enumerate(axes.flat):
        if pos >= n:
            ax.set_axis_off()
            continue
        i = int(order[pos])
        ax.imshow(images[i], interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"#{i}  L1 {float(ls.l1[i]):.3g}", fontsize=7.5, labelpad=2)
        frame = {"color": "#b0b0b0", "lw": 0.6, "ls": "-"}
        if dead_w[i]:
            frame = {"color": DEAD_WEIGHT, "lw": 2.6, "ls": "-"}
        elif dead_f[i]:
            frame = {"color": DEAD_FOLDED, "lw": 2.6, "ls": (0, (2.5, 1.5))}
        for spine in ax.spines.values():
            spine.set_edgecolor(frame["color"])
            spine.set_linewidth(frame["lw"])
            spine.set_linestyle(frame["ls"])
        if i in revived_set:
            ax.plot(
                [1.0],
                [1.0],
                marker="^",
                ms=7,
                color=REACTIVATED,
                mec="white",
                mew=0.6,
                transform=ax.transAxes,
                clip_on=False,
                zorder=5,
            )

    _legend(fig, ls.bn, threshold, int(dead_w.sum()), int((dead_f & ~dead_w).sum()), revived)
    direction = "strongest" if descending else "weakest"
    line1 = title or (
        f"{ls.name} {tuple(ls.weight.shape)}: {plural(n, 'filter')} sorted by L1 norm, "
        f"{direction} first"
    )
    colour = "RGB = input channels" if ls.weight.shape[1] == 3 else "grey: mean over inputs"
    line2 = f"{colour}; each filter scaled to its own max |w| (mid grey = 0)"
    if ls.bn:
        line2 += f"; marks fold in BatchNorm {ls.bn}"
    fig.suptitle(line1, fontsize=10.5, y=1 - 0.1 / fh, va="top")
    fig.text(0.5, 1 - 0.4 / fh, line2, ha="center", va="top", fontsize=8, color="#333333")
    save_figure(fig, out)
    return {
        "out": os.fspath(out),
        "layer": ls.name,
        "filters": n,
        "bn": ls.bn,
        "order": order.tolist(),
        "l1": ls.l1[order].tolist(),
        "inactive": np.flatnonzero(dead_w).tolist(),
        "inactive_folded": np.flatnonzero(dead_f).tolist(),
        "reactivated": revived,
    }


def _legend(
    fig: Any, bn: str | None, t: float, weight: int, folded_only: int, revived: list[int] | None
) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    k = threshold_key(t)
    handles = [
        Patch(
            facecolor="none",
            edgecolor=DEAD_WEIGHT,
            lw=2.2,
            label=f"inactive by weight, max|w| \u2264 {k} ({weight})",
        )
    ]
    if bn:
        handles.append(
            Patch(
                facecolor="none",
                edgecolor=DEAD_FOLDED,
                lw=2.2,
                ls=(0, (2.5, 1.5)),
                label=f"dead through BN only, max|w\u00b7s| \u2264 {k} ({folded_only})",
            )
        )
    if revived is not None:
        handles.append(
            Line2D(
                [],
                [],
                marker="^",
                ls="",
                ms=7,
                color=REACTIVATED,
                label=f"reactivated ({len(revived)})",
            )
        )
    fig.legend(
        handles=handles,
        loc="lower center",
        ncol=len(handles),
        fontsize=8,
        frameon=False,
        handlelength=1.6,
        columnspacing=1.2,
        bbox_to_anchor=(0.5, 0.02 / max(fig.get_figheight(), 1)),
    )
