"""What ``craft-train`` prints: the start-up lines, one table row per epoch (as it ends), the
end-of-run row, and the summary.

Epochs are numbered from 1 in everything printed (``metrics.jsonl`` and ``summary.json``
keep the 0-based ``epoch`` index of their records).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["EpochTable", "Printing", "format_summary", "plural"]


def plural(n: int, word: str) -> str:
    """``"1 filter"``, ``"2 filters"``."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def _accuracy_keys(entries: list[dict[str, Any]]) -> list[str]:
    return sorted({k for e in entries for k in e if k.endswith("/accuracy")})


class EpochTable:
    """Rows of the per-epoch table: epoch, step, mean loss, inactive filters (by the run's
    criterion) before and after the epoch-end reactivation, filters reactivated, and one
    accuracy column per verification set (``-`` where an epoch was not verified)."""

    def __init__(self, val_names: list[str]) -> None:
        self.keys = [f"val/{name}/accuracy" for name in val_names]

    def header(self) -> str:
        head = f"{'epoch':>5} {'step':>7} {'loss':>8} {'inactive':>8} {'reactiv.':>8} {'after':>6}"
        return head + "".join(f" {k.split('/')[1][:14]:>14}" for k in self.keys)

    def row(self, entry: dict[str, Any], label: str | None = None) -> str:
        """The row of an epoch entry (``label`` replaces the epoch number, e.g. ``end``)."""
        loss = entry.get("loss")
        after = entry.get("inactive_after")
        cells = [
            f"{label or entry['epoch'] + 1:>5}",
            f"{entry['step']:>7}",
            f"{loss:>8.4f}" if isinstance(loss, float) and math.isfinite(loss) else f"{'-':>8}",
            f"{entry['inactive_filters']:>8}",
            f"{entry['reactivated']:>8}",
            f"{'-' if after is None else after:>6}",
        ]
        for key in self.keys:
            value = entry.get(key)
            cells.append(f"{value:>14.4f}" if isinstance(value, float) else f"{'-':>14}")
        return " ".join(cells)


def format_summary(summary: dict[str, Any], *, table: bool = True) -> str:
    """A readable report of a run: the table of its epochs (``table``; ``craft-train`` prints
    the rows as the epochs end and passes False), the end-of-run row when the run stopped
    mid-epoch, then totals, best accuracy and where the outputs are."""
    entries = list(summary["epochs"])
    final = summary.get("final")
    lines = []
    if table:
        tab = EpochTable([k.split("/")[1] for k in _accuracy_keys([*entries, final or {}])])
        lines.append(tab.header())
        lines += [tab.row(e) for e in entries]
        if final:
            lines.append(tab.row(final, label="end"))
    best = ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in summary["best"].items())
    lines.append(
        f"steps {summary['steps']}, reactivated filters in total {summary['reactivated_total']}, "
        f"inactive now {summary['inactive_filters_now']}, best accuracy: "
        + (best or "none (no verification set)")
    )
    skipped = summary.get("skipped_images") or {}
    if skipped.get("count"):
        files = skipped["files"]
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        lines.append(
            f"skipped {plural(skipped['count'], 'unreadable image')} (--on-error skip; listed "
            f"in summary.json): {shown}"
        )
    lines.append(f"outputs in {summary['output']}")
    return "\n".join(lines)


class Printing:
    """What a :class:`craft_ext.train.Trainer` prints: lines on rank 0 (above the progress
    bar), the epoch table's rows, the bar's epoch label."""

    is_main: bool
    val_sets: list[Any]
    epoch: int
    planned_epochs: int
    _bar: Any

    def say(self, text: str) -> None:
        """Print a line on rank 0 (above the progress bar while there is one)."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def _say_row(self, entry: dict[str, Any], label: str | None = None) -> None:
        table = EpochTable([vs.name for vs in self.val_sets])
        if not getattr(self, "_table_started", False):
            self.say(table.header())
            self._table_started = True
        self.say(table.row(entry, label))

    def _epoch_label(self) -> str:
        return f"epoch {min(self.epoch + 1, self.planned_epochs)}/{self.planned_epochs}"

    @staticmethod
    def _accuracies(metrics: dict[str, float]) -> str:
        return ", ".join(
            f"{k.split('/')[1]} {v:.4f}" for k, v in metrics.items() if k.endswith("/accuracy")
        )
