"""Filter trajectories over training (paper Fig. 2).

Reads a craft-train run directory (:mod:`craft_ext.analysis.runlog`): ``filter_stats.jsonl``
and, if present, ``reactivations.jsonl``. The x axis is the optimizer step. When the run
recorded dense statistics (``--stats-every``: records with ``when == "step"``) they are
plotted with the epoch-end records; otherwise the epoch ends alone. An epoch end's ``"after"``
record (after its reactivation) is drawn a little to the right of its ``"before"`` record, so
a reactivation reads as a jump from one point to another rather than two points on top of
each other.

Panels: per-filter max |w| of the raw filters and, when the run logged them (a BatchNorm after
the layer), of the BN-folded filters ``w * s`` (the criterion that finds channels dead
through BN); otherwise the L1 norm. The y axes are logarithmic with the inactive threshold
drawn, so the decay of a dying filter toward the threshold is a straight-ish descent.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .io import AnalysisError
from .plotting import (
    ACTIVE,
    DEAD_FOLDED,
    DEAD_WEIGHT,
    EVENT,
    REACTIVATED,
    new_figure,
    plural,
    save_figure,
)
from .runlog import FILTER_STATS_FILE, REACTIVATIONS_FILE, read_jsonl, run_files

__all__ = [
    "FILTER_STATS_FILE",
    "REACTIVATIONS_FILE",
    "TRAJECTORY_DPI",
    "TRAJECTORY_FIGSIZE",
    "load_trajectory",
    "plot_trajectory",
    "read_jsonl",
]

TRAJECTORY_FIGSIZE = (10.0, 7.5)
TRAJECTORY_DPI = 100
_WHEN_ORDER = {"step": 0, None: 0, "before": 1, "after": 2}


def _x_positions(step: np.ndarray, epoch: np.ndarray, when: list[Any]) -> tuple[np.ndarray, str]:
    """x of every record: its step (its epoch when steps are missing), ``"after"`` records
    shifted right by a small offset (0.3 of the smallest gap between records, at most 1% of
    the span)."""
    if np.all(step >= 0):
        base, axis = step.astype(np.float64), "step"
    else:
        base, axis = epoch.astype(np.float64), "epoch"
    uniq = np.unique(base)
    gaps = np.diff(uniq)
    span = float(uniq[-1] - uniq[0]) if uniq.size > 1 else 1.0
    delta = min(0.3 * float(gaps.min()) if gaps.size else 0.3, 0.01 * span) or 0.3
    after = np.asarray([w == "after" for w in when], dtype=bool)
    return base + delta * after, axis


def load_trajectory(run: str | os.PathLike, layer: str | None = None) -> dict[str, Any]:
    """Per-filter statistics over training from a run directory (or a filter_stats.jsonl).

    Args:
        run: run directory or path to its ``filter_stats.jsonl``.
        layer: layer to read (default: ``conv1.weight`` if present, else the first one seen).

    Returns:
        dict with ``layer``, ``filters``; for the T records, ordered by step and then
        ``"step"`` < ``"before"`` < ``"after"``: ``epoch``, ``step`` ([T] arrays; step -1 when
        missing), ``when`` (str or None each), ``x`` ([T] plot positions, see module docs) and
        ``x_axis`` (``"step"`` or ``"epoch"``); ``dense`` (whether ``when == "step"`` records
        exist); ``max_abs``, ``l1``, ``mean``, ``std`` ([T, N] float arrays, NaN when a record
        lacks them); ``folded_max_abs`` / ``folded_l1`` ([T, N], or None unless every record
        has them); ``threshold`` (the run's, or None); ``reactivations``: the events for this
        layer (dicts with ``step``, ``epoch``, ``filters``, ``donors``, ``method``).
    """
    stats_path, react_path = run_files(run)
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
            r["step"] if isinstance(r.get("step"), int) else 0,
            r.get("epoch", 0),
            _WHEN_ORDER.get(r.get("when"), 0),
        )
    )
    width = len(recs[0]["max_abs"])
    if any(len(r["max_abs"]) != width for r in recs):
        raise AnalysisError(f"{str(stats_path)!r}: filter count changes between records")

    def col(key: str, missing: Any = "nan") -> Any:
        if all(key in r and len(r[key]) == width for r in recs):
            return np.asarray([r[key] for r in recs], dtype=np.float64)
        return np.full((len(recs), width), np.nan) if missing == "nan" else None

    epoch = np.asarray([r.get("epoch", i) for i, r in enumerate(recs)], dtype=np.float64)
    step = np.asarray([r.get("step", -1) for r in recs], dtype=np.int64)
    when = [r.get("when") for r in recs]
    x, axis = _x_positions(step, epoch, when)
    thresholds = {r["threshold"] for r in recs if isinstance(r.get("threshold"), (int, float))}
    events = []
    if react_path is not None:
        for e in read_jsonl(react_path):
            if e.get("param", layer) == layer and e.get("filters"):
                events.append(e)
    return {
        "layer": layer,
        "filters": width,
        "epoch": epoch,
        "step": step,
        "when": when,
        "x": x,
        "x_axis": axis,
        "dense": "step" in when,
        "max_abs": col("max_abs"),
        "l1": col("l1"),
        "mean": col("mean"),
        "std": col("std"),
        "folded_max_abs": col("folded_max_abs", None),
        "folded_l1": col("folded_l1", None),
        "threshold": float(min(thresholds)) if thresholds else None,
        "reactivations": events,
    }


def _event_rows(event: dict[str, Any], traj: dict[str, Any]) -> tuple[int, int] | None:
    """Indices of the records just before and just after a reactivation event: an epoch end's
    ``"before"`` / ``"after"`` pair, else (a reactivation every N steps) the first record at or
    after the event's step and the one preceding it."""
    step, when, epoch = traj["step"], traj["when"], traj["epoch"]
    s = event.get("step")
    at = (
        (step == s)
        if isinstance(s, int) and traj["x_axis"] == "step"
        else (epoch == event.get("epoch"))
    )
    b = [i for i in np.flatnonzero(at) if when[i] == "before"]
    a = [i for i in np.flatnonzero(at) if when[i] == "after"]
    if b and a:
        return int(b[-1]), int(a[-1])
    if not isinstance(s, int):
        return None
    later = np.flatnonzero(step >= s)
    if not later.size or later[0] == 0:
        return None
    return int(later[0]) - 1, int(later[0])


def _fates(traj: dict[str, Any], threshold: float, reactivated: list[int]) -> np.ndarray:
    """Per filter: ``"weight"`` (inactive by weight at the last record), ``"folded"`` (dead
    through BN only), ``"reactivated"`` (alive at the end after a reactivation), ``"active"``."""
    n = traj["filters"]
    fate = np.full(n, "active", dtype=object)
    fate[reactivated] = "reactivated"
    if traj["folded_max_abs"] is not None:
        fate[traj["folded_max_abs"][-1] <= threshold] = "folded"
    fate[traj["max_abs"][-1] <= threshold] = "weight"
    return fate


_FATE_STYLE = {
    "active": (ACTIVE, 0.7, 0.35),
    "reactivated": (REACTIVATED, 1.0, 0.85),
    "folded": (DEAD_FOLDED, 1.1, 0.95),
    "weight": (DEAD_WEIGHT, 1.1, 0.95),
}


def plot_trajectory(
    run: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layer: str | None = None,
    threshold: float | None = None,
    log: bool = True,
    figsize: tuple[float, float] = TRAJECTORY_FIGSIZE,
    dpi: int = TRAJECTORY_DPI,
) -> dict[str, Any]:
    """Plot per-filter max |w| (raw and BN-folded) over training with reactivations (Fig. 2).

    Filters are coloured by their state at the last record: red = inactive by weight, purple
    = dead through the BatchNorm only (folded max |w * s| <= threshold), blue = reactivated at
    least once and alive, grey = always active. At a reactivation, the reactivated filters'
    values just before are circled and those just after marked with triangles.

    Args:
        run: run directory or its ``filter_stats.jsonl``.
        out: PNG path (its directory must exist).
        layer: layer name in the statistics (default ``conv1.weight``).
        threshold: inactive threshold (default: the run's, else 1e-3).
        log: log-scale y axes (zeros drawn at the bottom of the axis).
        figsize, dpi: figure size; the PNG is ``figsize * dpi`` pixels.

    Returns:
        dict: ``out``, ``layer``, ``filters``, ``records``, ``dense``, ``x_axis``, ``epochs``,
        ``threshold``, ``folded`` (whether folded statistics were plotted),
        ``reactivation_events``, ``reactivated_filters`` (sorted indices), ``inactive_first``
        / ``inactive_final`` (by weight, first / last record) and ``inactive_final_folded``
        (by the folded criterion; [] without folded statistics).
    """
    traj = load_trajectory(run, layer)
    t = float(threshold if threshold is not None else (traj["threshold"] or 1e-3))
    n, x = traj["filters"], traj["x"]
    reactivated = sorted({int(f) for e in traj["reactivations"] for f in e["filters"]})
    reactivated = [f for f in reactivated if 0 <= f < n]
    fate = _fates(traj, t, reactivated)
    folded = traj["folded_max_abs"]
    panels = [("max |w|", traj["max_abs"], True)]
    if folded is not None:
        panels.append(("folded max |w\u00b7s|", folded, True))
    else:
        panels.append(("L1 norm", traj["l1"], False))

    fig = new_figure(figsize, dpi)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    rows = [(r, e) for e in traj["reactivations"] if (r := _event_rows(e, traj)) is not None]
    for ax, (label, values, thresholded) in zip(axes, panels, strict=True):
        _panel(ax, traj, values, fate, rows, t if thresholded else None, log)
        ax.set_ylabel(label + (" (log)" if log else ""), fontsize=10)
    _epoch_axis(axes[0], traj)
    axes[-1].set_xlabel(traj["x_axis"], fontsize=10)
    _legend(fig, fate, t, bool(rows))

    steps = int(traj["step"].max()) if traj["x_axis"] == "step" else None
    epochs = len(np.unique(traj["epoch"]))
    span = f"{plural(steps, 'step')}, " if steps is not None else ""
    cadence = "at epoch ends only"
    if traj["dense"]:
        dense_steps = np.unique(traj["step"][[w == "step" for w in traj["when"]]])
        every = int(np.median(np.diff(dense_steps))) if dense_steps.size > 1 else 1
        cadence = f"every {plural(every, 'step')} and at epoch ends"
    fig.suptitle(
        f"{traj['layer']}: {plural(n, 'filter')} over {span}{plural(epochs, 'epoch')}, "
        f"{plural(len(traj['reactivations']), 'reactivation event')} "
        f"(statistics {cadence})",
        fontsize=11,
    )
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.88, hspace=0.1)
    save_figure(fig, out)
    last_f = np.flatnonzero(folded[-1] <= t).tolist() if folded is not None else []
    return {
        "out": os.fspath(out),
        "layer": traj["layer"],
        "filters": n,
        "records": len(x),
        "dense": traj["dense"],
        "x_axis": traj["x_axis"],
        "epochs": sorted({float(v) for v in traj["epoch"]}),
        "threshold": t,
        "folded": folded is not None,
        "reactivation_events": len(traj["reactivations"]),
        "reactivated_filters": reactivated,
        "inactive_first": np.flatnonzero(traj["max_abs"][0] <= t).tolist(),
        "inactive_final": np.flatnonzero(traj["max_abs"][-1] <= t).tolist(),
        "inactive_final_folded": last_f,
    }


def _panel(
    ax: Any,
    traj: dict[str, Any],
    values: np.ndarray,
    fate: np.ndarray,
    rows: list[tuple[tuple[int, int], dict[str, Any]]],
    threshold: float | None,
    log: bool,
) -> None:
    x = traj["x"]
    floor = None
    if log:
        pos = values[np.isfinite(values) & (values > 0)]
        floor = float(pos.min()) / 3 if pos.size else 1e-8
        if threshold is not None:
            floor = min(floor, threshold / 10)
        values = np.where(values > 0, values, floor)
    for kind in ("active", "reactivated", "folded", "weight"):  # important lines on top
        colour, lw, alpha = _FATE_STYLE[kind]
        for i in np.flatnonzero(fate == kind):
            ax.plot(x, values[:, i], color=colour, lw=lw, alpha=alpha)
    for (b, a), event in rows:
        fl = [int(f) for f in event["filters"] if 0 <= int(f) < traj["filters"]]
        ax.axvline((x[b] + x[a]) / 2, color=EVENT, ls=":", lw=0.9, alpha=0.8)
        ax.scatter(
            x[[b] * len(fl)],
            values[b, fl],
            s=22,
            facecolors="none",
            edgecolors="k",
            linewidths=0.7,
            zorder=5,
        )
        ax.scatter(
            x[[a] * len(fl)],
            values[a, fl],
            s=30,
            marker="^",
            color=EVENT,
            edgecolors="k",
            linewidths=0.3,
            zorder=6,
        )
    if threshold is not None:
        ax.axhline(threshold, color="black", ls="--", lw=1.0)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
    ax.grid(True, alpha=0.3, which="major")


def _epoch_axis(ax: Any, traj: dict[str, Any]) -> None:
    """Epoch ends as ticks on a top axis (step x axis only)."""
    if traj["x_axis"] != "step":
        return
    ends: dict[float, float] = {}
    for i, w in enumerate(traj["when"]):
        if w == "before":
            ends[float(traj["epoch"][i])] = float(traj["x"][i])
    if not ends:
        return
    top = ax.secondary_xaxis("top")
    top.set_xticks(list(ends.values()), labels=[f"{int(e) + 1}" for e in ends])
    top.set_xlabel("end of epoch", fontsize=9)
    top.tick_params(labelsize=8)


_FATE_LABEL = {
    "weight": "inactive by weight at the end",
    "folded": "dead through BN only at the end",
    "reactivated": "reactivated, alive at the end",
    "active": "always active",
}


def _legend(fig: Any, fate: np.ndarray, t: float, events: bool) -> None:
    """Legend below the panels: one entry per filter fate that occurs (with its count), the
    threshold, and the reactivation marks when there are events."""
    from matplotlib.lines import Line2D

    handles = []
    for kind, label in _FATE_LABEL.items():
        count = int((fate == kind).sum())
        if count:
            colour = _FATE_STYLE[kind][0]
            handles.append(
                Line2D([], [], color=colour, label=f"{label} ({plural(count, 'filter')})")
            )
    handles.append(Line2D([], [], color="black", ls="--", label=f"threshold {t:g}"))
    if events:
        handles += [
            Line2D([], [], color=EVENT, ls=":", label="reactivation"),
            Line2D([], [], marker="o", ls="", mfc="none", mec="k", label="just before"),
            Line2D([], [], marker="^", ls="", color=EVENT, mec="k", mew=0.3, label="just after"),
        ]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8.5, frameon=False)
