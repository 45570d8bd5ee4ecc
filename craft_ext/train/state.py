"""Checkpoints of a ``craft-train`` run: what a checkpoint holds, writing it atomically,
and restoring a run from one (checked beforehand by :mod:`craft_ext.train.resume`).

:class:`Checkpointing` is a mixin of :class:`craft_ext.train.Trainer`. A checkpoint holds the
model, head, optimizers (with the Reactivator's state), schedulers, AMP scaler, RNG, the data
position (epoch and optimizer steps done in it) and the loss sums of the current epoch and log
window, so a resumed run continues bit-identically on CPU. Checkpoints fall on
optimizer-step boundaries (with ``--grad-accum`` never between the micro-batches of a step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from craft_ext.checkpoint import CHECKPOINT_FORMAT, CheckpointError, atomic_copy, atomic_save
from craft_ext.train.errors import one_line
from craft_ext.train.resume import schedule_notes

__all__ = ["Checkpointing"]


class Checkpointing:
    """Saving and restoring the state of a :class:`craft_ext.train.Trainer`."""

    cfg: Any
    backbone: torch.nn.Module
    head: Any
    optimizer: torch.optim.Optimizer
    head_optimizer: torch.optim.Optimizer
    schedulers: list[Any]
    scaler: Any
    device: torch.device
    world: int
    is_main: bool
    out: Path
    epoch: int
    step: int
    batch_in_epoch: int
    steps_per_epoch: int
    best: dict[str, float]
    history: list[dict[str, Any]]
    reactivated_total: int
    skipped_images: dict[str, str]
    last_val_step: int
    saved_step: int
    last_good_checkpoint: Path | None
    resume_note: str | None
    _window: list[Any]
    _epoch_loss: list[Any]

    def position(self) -> str:
        """Where the run is (what a checkpoint of it records), e.g. "epoch 2 of 3, 4 of its 6
        steps done"."""
        if self.epoch >= self.cfg.epochs:
            return "all epochs done"
        return (
            f"epoch {self.epoch + 1} of {self.cfg.epochs}, {self.batch_in_epoch} of its "
            f"{self.steps_per_epoch} steps done"
        )

    def _state(self) -> dict[str, Any]:
        head_full = self.head.full_state_dict()  # collective under DDP: every rank calls it
        return {
            "format": CHECKPOINT_FORMAT,
            "backbone": self.backbone.state_dict(),
            "head": head_full,
            "optimizer": self.optimizer.state_dict(),
            "head_optimizer": self.head_optimizer.state_dict() if self.world == 1 else None,
            "schedulers": [s.state_dict() for s in self.schedulers],
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.world,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device)
            if self.device.type == "cuda"
            else None,
            "best": dict(self.best),
            "history": list(self.history),
            "reactivated_total": self.reactivated_total,
            "skipped_images": dict(self.skipped_images),
            "last_val_step": self.last_val_step,
            "loss_window": [self._window[0].detach().cpu(), self._window[1]],
            "epoch_loss": [self._epoch_loss[0].detach().cpu(), self._epoch_loss[1]],
            "config": self.cfg.to_dict(),
        }

    def save(self, name: str = "checkpoint_last.pt", *, also_best: bool = False) -> Path | None:
        """Write a checkpoint atomically (rank 0; collective: call on every rank); returns its
        path. ``also_best`` (read on rank 0 only) also writes ``checkpoint_best.pt``."""
        state = self._state()
        if name == "checkpoint_last.pt":
            self.saved_step = self.step
        if not self.is_main:
            return None
        path = atomic_save(state, self.out / name)
        if name == "checkpoint_last.pt":
            self.last_good_checkpoint = path
        if also_best:  # the same bytes: copied, not serialised a second time
            atomic_copy(path, self.out / "checkpoint_best.pt")
        return path

    def _load(self, ckpt: dict[str, Any], where: str) -> None:
        """Resume from ``ckpt`` (read from ``where`` and checked by :func:`load_for_resume`)."""
        try:
            self.backbone.load_state_dict(ckpt["backbone"])
            self.head.load_full_state_dict(ckpt["head"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            same_world = ckpt.get("world_size") == self.world
            if ckpt.get("head_optimizer") is not None and same_world:
                self.head_optimizer.load_state_dict(ckpt["head_optimizer"])
            for s, sd in zip(self.schedulers, ckpt["schedulers"], strict=True):
                s.load_state_dict(sd)
            self.scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(
                f"--resume {where}: its state does not fit this run (other --reactivation, "
                f"--reactivate-layers or --criterion?): {one_line(exc)[:300]}"
            ) from None
        self.epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        self.batch_in_epoch = int(ckpt["batch_in_epoch"])
        saved = ckpt.get("config") or {}
        old = (ckpt.get("world_size", 1), saved.get("batch_size"), saved.get("grad_accum", 1))
        now = (self.world, self.cfg.batch_size, self.cfg.grad_accum)
        if old != now and old[1] is not None:
            # batch positions depend on them: restart the interrupted epoch where the images
            # done so far end
            done = self.batch_in_epoch * old[0] * old[1] * old[2]
            self.batch_in_epoch = min(done // (now[0] * now[1] * now[2]), self.steps_per_epoch)
        torch.set_rng_state(ckpt["rng"])
        if ckpt.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(ckpt["cuda_rng"], self.device)
        self.best = dict(ckpt.get("best", {}))
        self.history = list(ckpt.get("history", []))
        self.reactivated_total = int(ckpt.get("reactivated_total", 0))
        self.skipped_images = dict(ckpt.get("skipped_images", {}))
        self.last_val_step = int(ckpt.get("last_val_step", -1))
        for mine, key in ((self._window, "loss_window"), (self._epoch_loss, "epoch_loss")):
            if key in ckpt:
                mine[0], mine[1] = ckpt[key][0].to(self.device), int(ckpt[key][1])
        self.saved_step = self.step
        notes = schedule_notes(ckpt, self.cfg)
        if not same_world:
            notes.append("world size (head momentum restarts from zero)")
        #: said when the run starts
        self.resume_note = (
            f"craft-train: resuming from {where} at step {self.step} ({self.position()})"
            + (f"; changed since: {', '.join(notes)}" if notes else "")
        )
