"""Filter trajectories over training (paper Fig. 2).

Reads a craft-train run directory: ``filter_stats.jsonl`` (per-epoch first-layer statistics,
one line per epoch end and ``when`` = ``before`` / ``after`` that epoch's reactivation) and,
if present, ``reactivations.jsonl``. Plots each filter's max |w| and L1 norm against epoch:
a reactivation shows as a vertical jump at its epoch, marked with a triangle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .figures import new_figure, save_figure
from .io import AnalysisError

__all__ = [
    "FILTER_STATS_FILE",
    "REACTIVATIONS_FILE",
    "TRAJECTORY_DPI",
    "TRAJECTORY_FIGSIZE",
    "load_trajectory",
    "plot_trajectory",
    "read_jsonl",
]

FILTER_STATS_FILE = "filter_stats.jsonl"
REACTIVATIONS_FILE = "reactivations.jsonl"
TRAJECTORY_FIGSIZE = (12.0, 8.0)
TRAJECTORY_DPI = 100
_WHEN_ORDER = {"before": 0, None: 1, "after": 2}


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Parse a JSON-lines file (blank lines skipped; a torn last line, as left by a killed
    writer, is ignored).

    Raises:
        FileNotFoundError: no such file.
        AnalysisError: a malformed line other than the last one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    lines = path.read_text().splitlines()
    records = []
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == last:
                continue
            raise AnalysisError(f"{str(path)!r} line {i + 1}: invalid JSON ({exc})") from exc
        if not isinstance(obj, dict):
            raise AnalysisError(f"{str(path)!r} line {i + 1}: expected a JSON object")
        records.append(obj)
    return records


def _run_files(run: str | os.PathLike) -> tuple[Path, Path | None]:
    p = Path(run)
    if not p.exists():
        raise FileNotFoundError(f"no such run directory: {str(p)!r}")
    if p.is_file():
        stats, rdir = p, p.parent
    else:
        stats, rdir = p / FILTER_STATS_FILE, p
        if not stats.is_file():
            raise FileNotFoundError(
                f"{str(p)!r} has no {FILTER_STATS_FILE} (is it a craft-train run directory?)"
            )
    react = rdir / REACTIVATIONS_FILE
    return stats, react if react.is_file() else None


def load_trajectory(run: str | os.PathLike, layer: str | None = None) -> dict[str, Any]:
    """Per-filter statistics over training from a run directory (or a filter_stats.jsonl).

    Args:
        run: run directory or path to its ``filter_stats.jsonl``.
        layer: layer to read (default: ``conv1.weight`` if present, else the first one seen).

    Returns:
        dict with ``layer``; ``epoch``, ``step`` ([T] arrays), ``when`` (list of str or None)
        for the T records ordered by (step, before < after); ``max_abs``, ``l1``, ``mean``,
        ``std`` ([T, N] float arrays); ``reactivations``: the events for this layer
        (dicts with ``step``, ``epoch``, ``filters``, ``donors``, ``method``).
    """
    stats_path, react_path = _run_files(run)
    records = read_jsonl(stats_path)
    if not records:
        raise AnalysisError(f"{str(stats_path)!r} holds no records")
    layers = [r.get("layer") for r in records]
    if layer is None:
        layer = "conv1.weight" if "conv1.weight" in layers else layers[0]
    recs = [r for r in records if r.get("layer") == layer]
    if not recs:
        raise AnalysisError(f"{str(stats_path)!r} has no records for layer {layer!r}")
    for i, r in enumerate(recs):
        if "max_abs" not in r or "l1" not in r:
            raise AnalysisError(f"{str(stats_path)!r}: record {i} lacks max_abs / l1")
    recs.sort(
        key=lambda r: (
            r.get("step", 0) if r.get("step") is not None else 0,
            r.get("epoch", 0),
            _WHEN_ORDER.get(r.get("when"), 1),
        )
    )
    width = len(recs[0]["max_abs"])
    if any(len(r["max_abs"]) != width for r in recs):
        raise AnalysisError(f"{str(stats_path)!r}: filter count changes between records")

    def col(key: str) -> np.ndarray:
        if all(key in r for r in recs):
            return np.asarray([r[key] for r in recs], dtype=np.float64)
        return np.full((len(recs), width), np.nan)

    events = []
    if react_path is not None:
        for e in read_jsonl(react_path):
            if e.get("param", layer) == layer and e.get("filters"):
                events.append(e)
    return {
        "layer": layer,
        "filters": width,
        "epoch": np.asarray([r.get("epoch", i) for i, r in enumerate(recs)], dtype=np.float64),
        "step": np.asarray([r.get("step", -1) for r in recs], dtype=np.int64),
        "when": [r.get("when") for r in recs],
        "max_abs": col("max_abs"),
        "l1": col("l1"),
        "mean": col("mean"),
        "std": col("std"),
        "reactivations": events,
    }


def _event_x(event: dict[str, Any], traj: dict[str, Any]) -> float:
    if "epoch" in event:
        return float(event["epoch"])
    steps, epochs = traj["step"], traj["epoch"]
    idx = np.flatnonzero(steps >= event.get("step", 0))
    return float(epochs[idx[0]] if idx.size else epochs[-1])


def plot_trajectory(
    run: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layer: str | None = None,
    threshold: float = 1e-3,
    log: bool = True,
    figsize: tuple[float, float] = TRAJECTORY_FIGSIZE,
    dpi: int = TRAJECTORY_DPI,
) -> dict[str, Any]:
    """Plot per-filter max |w| and L1 over training with reactivations marked (Fig. 2).

    Filters are coloured by fate: red = inactive at the last record, blue = reactivated at
    least once, grey = always active. The dashed line is the inactive threshold.

    Args:
        run: run directory or its ``filter_stats.jsonl``.
        out: PNG path (its directory must exist).
        layer: layer name in the statistics (default ``conv1.weight``).
        threshold: inactive threshold drawn on the max |w| panel.
        log: log-scale y axes (zeros drawn at the bottom of the axis).
        figsize, dpi: figure size; the PNG is ``figsize * dpi`` pixels.

    Returns:
        dict: ``out``, ``layer``, ``filters``, ``records``, ``epochs``, ``reactivation_events``,
        ``reactivated_filters`` (sorted indices), ``inactive_final`` (indices inactive in the
        last record) and ``inactive_first``.
    """
    traj = load_trajectory(run, layer)
    x = traj["epoch"]
    max_abs, l1 = traj["max_abs"], traj["l1"]
    n = traj["filters"]
    reactivated = sorted({int(f) for e in traj["reactivations"] for f in e["filters"]})
    final_inactive = np.flatnonzero(max_abs[-1] <= threshold)
    first_inactive = np.flatnonzero(max_abs[0] <= threshold)

    fig = new_figure(figsize, dpi)
    ax_m, ax_l = fig.subplots(2, 1, sharex=True)
    colours = {"inactive": "#d62728", "reactivated": "#1f77b4", "active": "#9a9a9a"}
    fate = np.full(n, "active", dtype=object)
    fate[reactivated] = "reactivated"
    fate[final_inactive] = "inactive"

    for ax, values, label in ((ax_m, max_abs, "max |w|"), (ax_l, l1, "L1 norm")):
        floor = None
        if log:
            pos = values[np.isfinite(values) & (values > 0)]
            floor = float(pos.min()) / 10 if pos.size else 1e-8
            if label == "max |w|":
                floor = min(floor, threshold / 10)
            values = np.where(values > 0, values, floor)
        for order in ("active", "reactivated", "inactive"):  # important lines on top
            for i in np.flatnonzero(fate == order):
                ax.plot(
                    x,
                    values[:, i],
                    color=colours[order],
                    lw=0.9,
                    alpha=0.5 if order == "active" else 0.9,
                )
        for e in traj["reactivations"]:
            ex = _event_x(e, traj)
            ax.axvline(ex, color="#2ca02c", ls=":", lw=0.8, alpha=0.7)
            after = np.flatnonzero((x == ex) & np.asarray([w == "after" for w in traj["when"]]))
            row = after[-1] if after.size else int(np.argmin(np.abs(x - ex)))
            fl = [int(f) for f in e["filters"] if 0 <= int(f) < n]
            ax.scatter(
                np.full(len(fl), ex),
                values[row, fl],
                marker="^",
                s=28,
                color="#2ca02c",
                zorder=5,
                edgecolors="black",
                linewidths=0.3,
            )
        if log:
            ax.set_yscale("log")
            ax.set_ylim(bottom=floor)
        ax.set_ylabel(label + (" (log)" if log else ""), fontsize=11)
        ax.grid(True, alpha=0.3)
    ax_m.axhline(threshold, color="black", ls="--", lw=1.0)

    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=colours["inactive"], label=f"inactive at end ({len(final_inactive)})"),
        Line2D([], [], color=colours["reactivated"], label=f"reactivated ({len(reactivated)})"),
        Line2D([], [], color=colours["active"], label="always active"),
        Line2D([], [], color="black", ls="--", label=f"threshold {threshold:g}"),
        Line2D([], [], color="#2ca02c", marker="^", ls=":", label="reactivation"),
    ]
    ax_m.legend(handles=handles, fontsize=9, loc="best", framealpha=0.85)
    ax_l.set_xlabel("epoch", fontsize=11)
    fig.suptitle(
        f"{traj['layer']}: {n} filters over {len(np.unique(x))} epochs, "
        f"{len(traj['reactivations'])} reactivation events",
        fontsize=13,
    )
    fig.subplots_adjust(left=0.08, right=0.97, bottom=0.08, top=0.92, hspace=0.08)
    save_figure(fig, out)
    return {
        "out": os.fspath(out),
        "layer": traj["layer"],
        "filters": n,
        "records": len(x),
        "epochs": sorted({float(v) for v in x}),
        "reactivation_events": len(traj["reactivations"]),
        "reactivated_filters": reactivated,
        "inactive_first": first_inactive.tolist(),
        "inactive_final": final_inactive.tolist(),
    }
