"""Atomic checkpoint files.

A checkpoint is written to a temporary file in the destination's directory, flushed to disk
and renamed over the destination, so a crash or kill mid-write never leaves a truncated file
where a good one was. Loading uses ``torch.load(weights_only=True)``: a checkpoint from
elsewhere cannot run code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_FORMAT", "atomic_copy", "atomic_save", "load_checkpoint"]

CHECKPOINT_FORMAT = "craft_ext.checkpoint.v1"


def _atomic_write(path: str | os.PathLike[str], write: Callable[[Any], None]) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)`` atomically (temporary file + fsync + rename)."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy the file ``src`` to ``dst`` atomically (e.g. the best checkpoint from the last one,
    without serialising the state again)."""

    def write(f: Any) -> None:
        with open(src, "rb") as s:
            shutil.copyfileobj(s, f, 1 << 20)

    return _atomic_write(dst, write)


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a craft_ext checkpoint (or a run directory's ``checkpoint_last.pt``) safely."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint_last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a craft_ext checkpoint (got {type(obj).__name__})")
    return obj
