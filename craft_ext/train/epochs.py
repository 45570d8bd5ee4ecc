"""The ends of a ``craft-train`` run's epochs and of the run: verification, the best
accuracies, each epoch-end record (metrics.jsonl and a table row) with its checkpoints, and at
the end of the run the final record, backbone.pth and summary.json.

:class:`EpochEnds` is a mixin of :class:`craft_ext.train.Trainer`; it reads the trainer's
``cfg``, ``backbone``, ``val_sets``, ``val_specs``, ``schedulers``, ``logger``, the run's
position and records, and calls the methods of its other mixins (``save``, the filter
statistics, ``say``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["EpochEnds"]


class EpochEnds:
    """Verification, epoch ends and the end of a :class:`craft_ext.train.Trainer` run."""

    cfg: Any
    backbone: torch.nn.Module
    device: torch.device
    is_main: bool
    out: Path
    val_sets: list[Any]
    val_specs: list[Any]
    watched: list[str]
    reactivator: Any
    schedulers: list[Any]
    logger: Any
    epoch: int
    step: int
    total_steps: int
    batch_in_epoch: int
    _window: list[Any]
    _epoch_loss: list[Any]
    _step_metrics: tuple[int, dict[str, float]]
    best: dict[str, float]
    history: list[dict[str, Any]]
    final: dict[str, Any] | None
    reactivated_total: int
    decay_budget: float
    skipped_images: dict[str, str]
    saved_step: int
    last_val_step: int

    def evaluate(self) -> dict[str, float]:
        """Verification accuracy on every ``--val`` set (rank 0; others return {})."""
        if not self.is_main or not self.val_sets:
            return {}
        from craft_ext.eval import evaluate

        out = {}
        for vs in self.val_sets:
            res = evaluate(
                self.backbone,
                vs,
                batch_size=max(32, self.cfg.batch_size),
                device=self.device,
                flip=True,
                progress=False,
            )
            out[f"val/{vs.name}/accuracy"] = float(res["accuracy"])
            out[f"val/{vs.name}/accuracy_std"] = float(res["std"])
        self.backbone.train()
        return out

    def _update_best(self, metrics: dict[str, float]) -> bool:
        """Record ``metrics`` in :attr:`best`; whether the first set's accuracy improved
        (it decides checkpoint_best.pt)."""
        accuracies = [k for k in metrics if k.endswith("/accuracy")]
        improved = bool(accuracies) and metrics[accuracies[0]] > self.best.get(accuracies[0], -1.0)
        for key in accuracies:
            self.best[key] = max(metrics[key], self.best.get(key, -1.0))
        return improved

    def _epoch_mean_loss(self) -> float | None:
        """The mean loss of the epoch's steps (None when it had none here); checked finite,
        then the sums restart."""
        total, count = self._epoch_loss
        self._epoch_loss = [torch.zeros((), device=self.device), 0]
        if not count:
            return None
        value = float(total / count)
        self._check_finite(value)
        return value

    def _end_epoch(self) -> None:
        """Epoch end: CRAFT reactivation (every epoch end but the last), statistics,
        verification (every ``val_every_epochs`` and after the last), a table row,
        checkpoints."""
        if self.cfg.plant_inactive and self.epoch == 0:
            # demo only: filters die over a long run (weight decay outweighs their gradient);
            # a few-minute demo simulates that state at the first epoch end
            self._plant_inactive(self.cfg.plant_inactive)
        before = self._record_filter_stats("before")
        last = self.epoch + 1 >= self.cfg.epochs or self.step >= self.total_steps
        # not after the last epoch: a channel reactivated then would never train, and the
        # final model (and its verification) would carry untrained rewrites
        if self.watched and self.cfg.reactivate_every is None and not last:
            self.reactivator.reactivate()
        reactivated = self._drain_events()
        after = self._record_filter_stats("after")
        every = self.cfg.val_every_epochs
        verify = bool(self.val_specs) and (last or bool(every and (self.epoch + 1) % every == 0))
        metrics = self.evaluate() if verify else {}
        if verify:
            self.last_val_step = self.step
        loss = self._epoch_mean_loss()
        entry = {
            "kind": "epoch",
            "epoch": self.epoch,
            "step": self.step,
            "loss": loss,
            "inactive_filters": self._count(before),
            "inactive_after": self._count(after),
            "dead_weight": self._count(before, "weight"),
            "dead_folded": self._count(before, "folded"),
            "reactivated": reactivated,
            "reactivated_total": self.reactivated_total,
            "lr": self.schedulers[0].get_last_lr()[0],
            **metrics,
        }
        self.logger.log(entry)
        self.history.append(entry)
        self._say_row(entry)
        self.epoch += 1
        self.batch_in_epoch = 0
        improved = self._update_best(metrics)
        # verification runs on rank 0 only, so only rank 0 knows whether this epoch improved:
        # gather the (collective) state once on every rank, then write last (and best)
        self.save(also_best=improved)  # the first --val set decides which checkpoint is best

    def _finish(self) -> dict[str, Any]:
        """End of the run: verify it where no epoch end just did (a run stopped by
        ``--max-steps`` inside an epoch), save, write backbone.pth and summary.json."""
        if self._window[1]:
            self._check_finite(float(self._window[0] / self._window[1]))
        improved = False
        verify = bool(self.val_specs) and self.last_val_step != self.step  # same on all ranks
        if verify:
            step, metrics = self._step_metrics
            if step != self.step:
                metrics = self.evaluate()
            self.last_val_step = self.step
            dead = self.dead_counts()
            loss = self._epoch_mean_loss()
            self.final = {
                "kind": "final",
                "epoch": self.epoch,
                "step": self.step,
                "loss": loss,
                "inactive_filters": self._count(dead),
                "dead_weight": self._count(dead, "weight"),
                "dead_folded": self._count(dead, "folded"),
                "reactivated": self._drain_events(),
                "reactivated_total": self.reactivated_total,
                "lr": self.schedulers[0].get_last_lr()[0],
                **metrics,
            }
            self.logger.log(self.final)
            self._say_row(self.final, label="end")
            improved = self._update_best(metrics)
        if self.saved_step != self.step or verify:
            self.save(also_best=improved)
        summary = self._summary()
        if self.is_main:
            torch.save(self.backbone.state_dict(), self.out / "backbone.pth.tmp")
            os.replace(self.out / "backbone.pth.tmp", self.out / "backbone.pth")
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.logger.close()
        return summary

    def _summary(self) -> dict[str, Any]:
        return {
            "config": self.cfg.to_dict(),
            "steps": self.step,
            "epochs_completed": self.epoch,
            "reactivated_total": self.reactivated_total,
            "decay_budget": self.decay_budget,
            "inactive_filters_now": self.inactive_counts(),
            "dead_now": self.dead_counts(),
            "best": self.best,
            "epochs": self.history,
            "final": self.final,
            "skipped_images": {
                "count": len(self.skipped_images),
                "files": list(self.skipped_images),
                "reasons": list(self.skipped_images.values()),
            },
            "output": str(self.out),
        }
