"""Reading a craft-train run directory's JSON-lines logs.

* ``filter_stats.jsonl``: one record per watched layer at every ``--stats-every`` steps
  (``when`` = ``"step"``) and at every epoch end (``"before"`` / ``"after"`` its
  reactivation): ``epoch``, ``step``, ``layer``, ``threshold``, per-filter ``max_abs``, ``l1``,
  ``mean``, ``std`` and, with a BatchNorm after the layer, ``folded_max_abs``, ``folded_l1``,
  ``bn_weight``;
* ``reactivations.jsonl``: one record per reactivation event: ``step``, ``epoch``, ``param``,
  ``method``, ``filters``, ``donors``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .io import PREFIXES, AnalysisError

__all__ = [
    "FILTER_STATS_FILE",
    "REACTIVATIONS_FILE",
    "reactivation_events",
    "read_jsonl",
    "run_files",
]

FILTER_STATS_FILE = "filter_stats.jsonl"
REACTIVATIONS_FILE = "reactivations.jsonl"


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


def run_files(run: str | os.PathLike) -> tuple[Path, Path | None]:
    """``(filter_stats.jsonl, reactivations.jsonl or None)`` of a run directory, or of the
    directory holding ``run`` when it is a file (taken as the statistics file).

    Raises:
        FileNotFoundError: ``run`` does not exist, or is a directory without statistics.
    """
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


def _bare(name: str) -> str:
    """``name`` without leading wrapper prefixes (``module.``, ``_orig_mod.``, ...)."""
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                name, changed = name[len(prefix) :], True
    return name


def _same_layer(param: Any, layer: str) -> bool:
    """Whether an event's ``param`` names ``layer``, up to wrapper prefixes
    (``module.conv1.weight`` is ``conv1.weight``; ``layer1.0.conv1.weight`` is not); an event
    without one applies to all."""
    if not isinstance(param, str):
        return True
    return _bare(param) == _bare(layer)


def reactivation_events(path: str | os.PathLike | None, layer: str) -> list[dict[str, Any]]:
    """The events of ``reactivations.jsonl`` at ``path`` that reactivated filters of
    ``layer`` (in file order); ``[]`` when ``path`` is None.

    ``path`` may be the file or a run directory (a directory without the file has no events).
    """
    if path is None:
        return []
    p = Path(path)
    if p.is_dir():
        p = p / REACTIVATIONS_FILE
        if not p.is_file():
            return []
    return [e for e in read_jsonl(p) if e.get("filters") and _same_layer(e.get("param"), layer)]
