"""Shared figure helpers: Agg figures, PNG output, wording and the marks every figure uses.

The same colours mean the same thing in the grid, trajectory and pattern figures:
:data:`DEAD_WEIGHT` (inactive by the weight criterion, max |w| <= t), :data:`DEAD_FOLDED`
(dead through the BatchNorm only: max |w * s| <= t < max |w|) and :data:`REACTIVATED`.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "ACTIVE",
    "DEAD_FOLDED",
    "DEAD_WEIGHT",
    "EVENT",
    "MARKERS",
    "QUALITATIVE",
    "REACTIVATED",
    "new_figure",
    "plural",
    "save_figure",
]

DEAD_WEIGHT = "#d62728"  # red
DEAD_FOLDED = "#9467bd"  # purple
REACTIVATED = "#1f77b4"  # blue
EVENT = "#2ca02c"  # green: a reactivation event
ACTIVE = "#9a9a9a"  # grey

#: 10 qualitative colours (Tableau 10, matplotlib's ``tab10``): distinguishable in print and,
#: for the first 8, for the common colour-vision deficiencies when combined with MARKERS
QUALITATIVE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
#: marker shapes cycled after every 10 colours: 10 x 8 = 80 distinguishable groups
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 filter"``, ``"3 filters"``, ``"0 filters"`` (``many`` for irregular plurals)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


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
