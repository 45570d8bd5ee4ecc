"""``--resume``: load a checkpoint and check that it fits the run before anything changes.

Every refusal is a :class:`craft_ext.checkpoint.CheckpointError` with a one-line message that
names the checkpoint and says what is wrong (truncated, code refused, a text file, not a
craft-train checkpoint, another network, another data set), and, when the file is broken,
which checkpoint beside it is intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from craft_ext.checkpoint import (
    CHECKPOINT_FORMAT,
    RUN_CHECKPOINTS,
    CheckpointError,
    intact_alternative,
    load_checkpoint,
)
from craft_ext.train.config import TrainConfig

__all__ = ["load_for_resume", "schedule_notes"]

#: options that shape the model or its optimizer state: a checkpoint of other values of them
#: cannot be resumed
MODEL_OPTIONS = (
    "network",
    "width",
    "widths",
    "embedding_size",
    "image_size",
    "activation",
    "residual_scale",
    "optimizer",
)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def checkpoint_path(where: str | Path) -> Path:
    """The file ``--resume WHERE`` reads: WHERE, or a run directory's checkpoint_last.pt."""
    path = Path(where)
    return path / RUN_CHECKPOINTS[0] if path.is_dir() else path


def _offer(path: Path) -> str:
    """A note naming a loadable checkpoint beside ``path`` ("; X is intact (step S): use
    --resume X"), or "" when there is none."""
    alt = intact_alternative(path)
    if alt is None:
        return ""
    other, ckpt = alt
    return f"; {other} is intact (step {ckpt.get('step', '?')}): use --resume {other}"


def load_for_resume(where: str | Path, cfg: TrainConfig, num_classes: int) -> dict[str, Any]:
    """The checkpoint ``--resume WHERE`` names, checked against ``cfg``; raises
    FileNotFoundError or :class:`CheckpointError` (one line) when it cannot be resumed."""
    path = checkpoint_path(where)
    if not path.exists():
        raise FileNotFoundError(
            f"--resume {where}: no checkpoint there ({path} not found){_offer(path)}"
        )
    try:
        ckpt = load_checkpoint(path, map_location="cpu")
    except CheckpointError as exc:
        raise CheckpointError(f"--resume {exc}{_offer(path)}") from None
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        kind = "a state dict (backbone.pth?)" if "format" not in ckpt else repr(ckpt["format"])
        raise CheckpointError(
            f"--resume {path}: not a craft-train checkpoint ({kind}; a craft-train checkpoint "
            f"has format {CHECKPOINT_FORMAT!r}){_offer(path)}"
        )
    missing = [k for k in ("backbone", "head", "optimizer", "schedulers", "step") if k not in ckpt]
    if missing:
        raise CheckpointError(f"--resume {path}: incomplete checkpoint, no {missing}")
    saved = ckpt.get("config") or {}
    defaults = TrainConfig()
    for name in MODEL_OPTIONS:
        then = saved.get(name, getattr(defaults, name))
        now = getattr(cfg, name)
        if isinstance(then, list | tuple) and isinstance(now, list | tuple):
            then, now = list(then), list(now)
        if then != now:
            if name == "network":
                detail = f"checkpoint is {then}, --network is {now}"
            else:
                detail = f"checkpoint has {_flag(name)} {_shown(then)}, this run {_shown(now)}"
            raise CheckpointError(f"--resume {path}: {detail}")
    head = ckpt["head"].get("weight") if isinstance(ckpt["head"], dict) else None
    if head is not None and head.shape[0] != num_classes:
        raise CheckpointError(
            f"--resume {path}: checkpoint's head has {head.shape[0]} identities, --data "
            f"{cfg.data} has {num_classes}"
        )
    return ckpt


def schedule_notes(ckpt: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """Options that changed the schedule or data order since the checkpoint was written, as
    notes for the user (they are allowed: the remaining steps follow the new values)."""
    saved = ckpt.get("config") or {}
    notes = []
    for name in ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "seed", "data"):
        if name in saved and saved[name] != getattr(cfg, name):
            notes.append(f"{_flag(name)} {_shown(saved[name])} -> {_shown(getattr(cfg, name))}")
    return notes
