"""Filter grid figure (paper Fig. 4).

The first-layer filters, sorted by L1 norm (strongest first) in row-major order, drawn as
their R, G and B weight planes on one symmetric grey scale (black negative, grey zero, white
positive), plus the per-pixel standard deviation across R, G, B (black: colour-blind,
bright: colour-sensitive).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..ops import filter_stats
from .io import AnalysisError, Source, first_conv, load_state_dict

__all__ = ["GRID_DPI", "GRID_FIGSIZE", "filter_grid", "mosaic", "new_figure", "save_figure"]

GRID_FIGSIZE = (16.0, 5.0)
GRID_DPI = 100


def new_figure(figsize: tuple[float, float], dpi: int) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, out: str | os.PathLike) -> str:
    """Save ``fig`` as PNG at its own size and dpi (no tight bbox: size is figsize * dpi)."""
    out = os.fspath(out)
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"output directory does not exist: {parent!r}")
    fig.savefig(out, format="png", dpi=fig.dpi)
    return out


def mosaic(tiles: np.ndarray, cols: int, pad: int = 1) -> np.ndarray:
    """Arrange ``tiles`` [N, h, w] in row-major order on a grid with ``cols`` columns.

    Padding and unused cells are NaN (drawn in the axes background colour).
    """
    n, h, w = tiles.shape
    rows = max(1, math.ceil(n / cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), np.nan, dtype=np.float64)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y : y + h, x : x + w] = tiles[i]
    return out


def _sorted_filters(weight: Tensor, descending: bool) -> tuple[np.ndarray, np.ndarray, Tensor]:
    w = weight.detach().float().cpu()
    if w.dim() != 4:
        raise AnalysisError(f"expected a conv weight [N, C, kh, kw], got {tuple(w.shape)}")
    l1 = filter_stats(w).l1
    order = torch.argsort(l1, descending=descending, stable=True)
    return w[order].numpy(), order.numpy(), l1[order]


def filter_grid(
    source: Source,
    out: str | os.PathLike,
    *,
    layer: str | None = None,
    cols: int = 8,
    descending: bool = True,
    figsize: tuple[float, float] = GRID_FIGSIZE,
    dpi: int = GRID_DPI,
    title: str | None = None,
) -> dict[str, Any]:
    """Draw the first-layer filter grid (Fig. 4) to a PNG.

    Args:
        source: module, state dict, checkpoint or run directory.
        out: PNG path (its directory must exist).
        layer: state-dict name of the layer (default: first conv).
        cols: filters per grid row.
        descending: sort by L1 from strongest (True) or weakest.
        figsize, dpi: figure size; the PNG is ``figsize * dpi`` pixels.
        title: figure title (default: layer name and shape).

    Returns:
        dict with ``out``, ``layer``, ``order`` (filter index at each grid position) and
        ``l1`` (sorted L1 norms).
    """
    sd = load_state_dict(source)
    name, weight = first_conv(sd, layer)
    w, order, l1 = _sorted_filters(weight, descending)
    n, c = w.shape[:2]
    scale = float(np.abs(w).max()) or 1.0
    planes = [(f"channel {i}", w[:, i]) for i in range(c)]
    if c == 3:
        planes = [(lab, p) for lab, (_, p) in zip(("R", "G", "B"), planes, strict=True)]
    std = w.std(axis=1) if c > 1 else np.zeros_like(w[:, 0])
    std_max = float(std.max()) or 1.0

    fig = new_figure(figsize, dpi)
    panels = len(planes) + 1
    axes = fig.subplots(1, panels)
    weight_im = None
    for ax, (label, plane) in zip(axes, planes, strict=False):
        weight_im = ax.imshow(
            mosaic(plane, cols), cmap="gray", vmin=-scale, vmax=scale, interpolation="nearest"
        )
        ax.set_title(f"{label} weights", fontsize=12)
    std_im = axes[-1].imshow(
        mosaic(std, cols), cmap="gray", vmin=0.0, vmax=std_max, interpolation="nearest"
    )
    axes[-1].set_title("std across channels", fontsize=12)
    for ax in axes:
        ax.set_facecolor("#b03030")  # grid lines / empty cells
        ax.set_xticks([])
        ax.set_yticks([])
    direction = "strongest" if descending else "weakest"
    fig.suptitle(
        title
        or f"{name} {tuple(weight.shape)}: filters sorted by L1 norm, {direction} first "
        f"(row-major)",
        fontsize=13,
    )
    fig.subplots_adjust(left=0.02, right=0.95, bottom=0.2, top=0.86, wspace=0.08)
    cax_w = fig.add_axes([0.08, 0.12, 0.55, 0.03])
    fig.colorbar(weight_im, cax=cax_w, orientation="horizontal").set_label(
        "weight (black negative, grey zero, white positive)", fontsize=10
    )
    cax_s = fig.add_axes([0.73, 0.12, 0.2, 0.03])
    fig.colorbar(std_im, cax=cax_s, orientation="horizontal").set_label("std", fontsize=10)
    save_figure(fig, out)
    return {
        "out": os.fspath(out),
        "layer": name,
        "filters": int(n),
        "order": order.tolist(),
        "l1": l1.tolist(),
    }
