"""``craft-train`` command line (also ``python -m craft_ext.train.cli``, e.g. under torchrun).

Exit status: 0 done; 2 a problem with an option or an input (one line on stderr naming it;
nothing written, or, for an unreadable image met while training, the steps so far saved);
3 the loss diverged; 130 Ctrl-C (a checkpoint saved at the last step boundary, and how to
resume it said).
"""

from __future__ import annotations

import math
import pickle
import shlex
import sys
from typing import Any

from craft_ext.checkpoint import CheckpointError
from craft_ext.data.image import ImageDecodeError

from .config import TrainConfig, parse_config
from .errors import RunError, TrainingDiverged, TrainingInterrupted, one_line
from .report import format_summary, plural
from .trainer import Trainer

__all__ = ["main", "startup_lines"]

#: errors that a user's option or input caused: one line, exit 2
_INPUT_ERRORS = (
    ValueError,
    OSError,
    ImageDecodeError,
    CheckpointError,
    pickle.UnpicklingError,
    RunError,
)


def _error(message: str) -> int:
    print(f"craft-train: error: {one_line(message)}", file=sys.stderr)
    return 2


def startup_lines(trainer: Trainer) -> list[str]:
    """What ``craft-train`` says before training: the run, its schedule and decay budget,
    and what it verifies on."""
    cfg: TrainConfig = trainer.cfg
    effective = cfg.batch_size * cfg.grad_accum * trainer.world
    batch = f"batch {cfg.batch_size}" + (
        f" x {cfg.grad_accum} accumulated x {trainer.world} processes = {effective}"
        if effective != cfg.batch_size
        else ""
    )
    steps = f"{cfg.epochs} epochs x {trainer.steps_per_epoch} steps"
    if trainer.total_steps < cfg.epochs * trainer.steps_per_epoch:
        steps += f", stopped by --max-steps at {trainer.total_steps} (the LR schedule spans them)"
    lines = [
        f"craft-train: {cfg.network} on {cfg.data} ({len(trainer.train_set)} images, "
        f"{trainer.num_classes} identities), {steps}, {batch}, {cfg.optimizer} lr {cfg.lr:g}, "
        f"reactivation={cfg.reactivation} ({', '.join(trainer.watched) or 'no layers'}), "
        f"device={trainer.device}, world={trainer.world}, output={trainer.out}"
    ]
    d = trainer.decay_budget
    formula = (
        "sum(lr_t) * weight_decay (AdamW, decoupled)"
        if cfg.optimizer == "adamw"
        else "sum(lr_t) * weight_decay / (1 - momentum)"
    )
    lines.append(
        f"craft-train: decay budget D = {formula} = {d:.3g} over {trainer.total_steps} steps: "
        f"a weight without useful gradient shrinks by ~exp(-D) = {math.exp(-d):.2g} ("
        + (
            "first-layer channels are likely to die; --criterion folded detects them"
            if d >= 5
            else "little die-off expected"
        )
        + ")"
    )
    if trainer.val_sets:
        sets = ", ".join(f"{vs.name} ({plural(vs.num_pairs, 'pair')})" for vs in trainer.val_sets)
        lines.append(f"craft-train: verification on {sets}, at epoch ends and the end of the run")
    else:
        why = "--val none" if cfg.val == [] else f"no --val given for --data {cfg.data}"
        lines.append(
            f"craft-train: no verification ({why}): no accuracy will be reported; pass --val "
            "PAIRS_FILE:IMAGES_DIR (e.g. LFW's pairsDevTest.txt) or insightface .bin files"
        )
    return lines


def _resume_hint(argv: list[str]) -> str:
    """The command that resumes this run: its arguments with ``--resume`` added."""
    if any(a == "--resume" or a.startswith("--resume=") for a in argv):
        return shlex.join(["craft-train", *argv])
    return shlex.join(["craft-train", *argv, "--resume"])


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train, print the summary; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    trainer: Any = None
    try:
        cfg = parse_config(args)
        try:
            trainer = Trainer(cfg)
        except _INPUT_ERRORS as exc:
            return _error(str(exc))
        if trainer.is_main:
            for line in startup_lines(trainer):
                print(line, flush=True)
        try:
            summary = trainer.run()
        except RunError as exc:
            return _error(str(exc))
        except TrainingDiverged as exc:
            print(f"craft-train: {exc}", file=sys.stderr)
            return 3
        except TrainingInterrupted as exc:
            if trainer.is_main:
                how = (
                    f"resume with: {_resume_hint(args)}"
                    if exc.checkpoint
                    else "nothing to resume yet"
                )
                print(f"craft-train: {exc}; {how}", file=sys.stderr)
            return 130
        if trainer.is_main:
            print(format_summary(summary, table=False))
        return 0
    except KeyboardInterrupt:  # before training, or a second Ctrl-C while it stopped
        where = getattr(trainer, "last_good_checkpoint", None)
        print(
            "craft-train: interrupted; "
            + (f"the last checkpoint is {where}" if where else "nothing saved"),
            file=sys.stderr,
        )
        return 130
    finally:
        if trainer is not None:
            trainer.close()


if __name__ == "__main__":
    raise SystemExit(main())
