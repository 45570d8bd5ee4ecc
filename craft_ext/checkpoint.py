"""Atomic checkpoint files, loaded safely, with one-line reasons when they cannot be.

A checkpoint is written to a temporary file in the destination's directory, flushed to disk
and renamed over the destination, so a crash or kill mid-write never leaves a truncated file
where a good one was. Loading uses ``torch.load(weights_only=True)``: a checkpoint from
elsewhere cannot run code. A file that cannot be loaded raises :class:`CheckpointError` whose
one-line message names the file and says why (truncated or corrupt, refused because it holds
code, a text file, not a PyTorch file); :func:`intact_alternative` finds a loadable
checkpoint beside it.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "atomic_copy",
    "atomic_save",
    "intact_alternative",
    "load_checkpoint",
]

CHECKPOINT_FORMAT = "craft_ext.checkpoint.v1"

#: the file names of a run directory's checkpoints, the one resumed by default first
RUN_CHECKPOINTS = ("checkpoint_last.pt", "checkpoint_best.pt")

_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message (one line) names the file and why."""


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


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _refusal_reason(message: str) -> str:
    """The part of torch's weights-only refusal that says what was found (e.g. "Trying to
    load unsupported GLOBAL posix.system ..."), without its advice paragraphs."""
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    keep = [
        ln
        for ln in lines[1:]
        if not ln.startswith(("Please file an issue", "Check the documentation"))
    ]
    reason = _one_line(" ".join(keep)).removeprefix("WeightsUnpickler error:").strip()
    return reason or "objects other than tensors"


def _why_unloadable(path: Path, exc: BaseException) -> str:
    """Why ``torch.load(path, weights_only=True)`` raised ``exc``, in a few words."""
    with open(path, "rb") as f:
        head = f.read(512)
    if isinstance(exc, pickle.UnpicklingError) and "weights_only" in str(exc):
        return (
            "refused: it holds Python objects that could run code when loaded, not just "
            f"tensors and containers ({_refusal_reason(str(exc))})"
        )
    if not head:
        return "empty file, not a checkpoint"
    if head.startswith(_ZIP_MAGIC):
        return f"truncated or corrupt checkpoint ({_one_line(str(exc)) or type(exc).__name__})"
    if b"\0" not in head:
        try:
            head.decode("utf-8")
            return "a text file, not a PyTorch checkpoint"
        except UnicodeDecodeError:
            pass
    return f"not a PyTorch checkpoint ({type(exc).__name__}: {_one_line(str(exc))})"


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a craft_ext checkpoint (or a run directory's ``checkpoint_last.pt``) safely.

    Raises ``FileNotFoundError`` when there is no such file and :class:`CheckpointError` (one
    line, naming the file) when it is truncated, corrupt, holds code, is not a PyTorch file or
    does not hold a dict.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RUN_CHECKPOINTS[0]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # e.g. torch's pickle-protocol notes: the error says it
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch.load raises anything from OSError to KeyError
        raise CheckpointError(f"{path}: {_why_unloadable(path, exc)}") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a craft_ext checkpoint (got {type(obj).__name__})")
    return obj


def intact_alternative(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]] | None:
    """A loadable craft-train checkpoint beside ``path`` (``checkpoint_best.pt`` beside
    ``checkpoint_last.pt`` and the other way round), with its contents; None when there is
    none. For the message of a run whose checkpoint is broken."""
    path = Path(path)
    folder, name = (path, RUN_CHECKPOINTS[0]) if path.is_dir() else (path.parent, path.name)
    for other in RUN_CHECKPOINTS:
        candidate = folder / other
        if other == name or not candidate.is_file():
            continue
        try:
            ckpt = load_checkpoint(candidate)
        except (CheckpointError, OSError):
            continue
        if ckpt.get("format") == CHECKPOINT_FORMAT:
            return candidate, ckpt
    return None
