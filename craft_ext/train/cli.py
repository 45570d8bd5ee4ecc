"""``craft-train`` command line (also ``python -m craft_ext.train.cli``, e.g. under torchrun)."""

from __future__ import annotations

import math
import sys

from .config import parse_config
from .trainer import Trainer, TrainingDiverged, format_summary


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, train, print the summary; returns the exit code."""
    cfg = parse_config(argv)
    try:
        trainer = Trainer(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"craft-train: error: {exc}", file=sys.stderr)
        return 2
    if trainer.is_main:
        print(
            f"craft-train: {cfg.network} on {cfg.data} ({len(trainer.train_set)} images, "
            f"{trainer.num_classes} identities), {cfg.epochs} epochs x "
            f"{trainer.steps_per_epoch} steps, reactivation={cfg.reactivation} "
            f"({', '.join(trainer.watched) or 'no layers'}), device={trainer.device}, "
            f"world={trainer.world}, output={trainer.out}"
        )
        d = trainer.decay_budget
        print(
            f"craft-train: decay budget D = sum(lr_t) * weight_decay / (1 - momentum) = {d:.3g} "
            f"over {trainer.total_steps} steps: a weight without useful gradient shrinks by "
            f"~exp(-D) = {math.exp(-d):.2g} ("
            + (
                "first-layer channels are likely to die; --criterion folded detects them"
                if d >= 5
                else "little die-off expected"
            )
            + ")"
        )
    try:
        summary = trainer.run()
    except TrainingDiverged as exc:
        print(f"craft-train: {exc}", file=sys.stderr)
        return 3
    finally:
        trainer.close()
    if trainer.is_main:
        print(format_summary(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
