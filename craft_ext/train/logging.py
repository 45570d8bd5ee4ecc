"""Run-directory records of ``craft-train``: metrics JSONL, TensorBoard and other JSONL logs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["JsonlWriter", "RunLogger"]


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/Inf become strings, tuples lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class JsonlWriter:
    """Appends one JSON object per line, flushed at once (a killed run keeps its records)."""

    def __init__(self, path: Path, *, truncate_after_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            # on resume, drop records the interrupted run wrote after its last checkpoint
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if int(json.loads(line).get("step", 0)) <= truncate_after_step:
                        kept.append(line)
                except (ValueError, TypeError):
                    continue
            self.path.write_text("".join(k + "\n" for k in kept))
        self._file = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(_clean(record)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class RunLogger:
    """``metrics.jsonl`` + TensorBoard scalars (``tb/``) + the CRAFT logs of a run directory.

    Only rank 0 writes; other ranks get a logger whose methods do nothing.
    """

    def __init__(self, out_dir: Path, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.out_dir = Path(out_dir)
        self._tb = None
        if not enabled:
            return
        self.metrics = JsonlWriter(self.out_dir / "metrics.jsonl", truncate_after_step=resume_step)
        self.filter_stats = JsonlWriter(
            self.out_dir / "filter_stats.jsonl", truncate_after_step=resume_step
        )
        self.reactivations = JsonlWriter(
            self.out_dir / "reactivations.jsonl", truncate_after_step=resume_step
        )
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tb"), purge_step=resume_step)
        except ImportError:  # tensorboard not installed: JSONL only
            self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        """Write a metrics record; numeric fields also go to TensorBoard at ``record['step']``."""
        if not self.enabled:
            return
        self.metrics.write(record)
        if self._tb is not None:
            step = int(record.get("step", 0))
            for key, value in record.items():
                if key in ("step", "epoch", "kind") or isinstance(value, bool):
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def log_filter_stats(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.filter_stats.write(record)

    def log_reactivation(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.reactivations.write(record)

    def close(self) -> None:
        if not self.enabled:
            return
        for w in (self.metrics, self.filter_stats, self.reactivations):
            w.close()
        if self._tb is not None:
            self._tb.close()
