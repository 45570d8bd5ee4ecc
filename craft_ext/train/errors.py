"""How a ``craft-train`` run stops when it cannot go on: one-line errors, a diverged loss,
Ctrl-C.

* :class:`RunError`: a problem with the inputs found while training (an unreadable image);
  its message is one line naming the file, and ``craft-train`` exits 2.
* :class:`TrainingDiverged`: the loss became NaN or Inf (exit 3).
* :class:`TrainingInterrupted`: Ctrl-C; a checkpoint was saved at a step boundary (exit 130).
* :class:`StopRequest`: while training, the first SIGINT only asks the loop to stop at the next
  optimizer-step boundary (so the checkpoint it saves is consistent); a second one raises
  ``KeyboardInterrupt`` at once.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

__all__ = [
    "RunError",
    "StopRequest",
    "TrainingDiverged",
    "TrainingInterrupted",
    "decode_error_text",
    "ignore_sigint",
    "one_line",
]


class RunError(RuntimeError):
    """An input problem found while training; the message is one line naming the file."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the run stopped without overwriting good checkpoints."""


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C at an optimizer-step boundary; ``position`` says where in
    the epochs, ``checkpoint`` holds that step (None when nothing was trained to save)."""

    def __init__(self, step: int, position: str, checkpoint: Path | None) -> None:
        self.step, self.position, self.checkpoint = step, position, checkpoint
        saved = f"saved {checkpoint}" if checkpoint else "no checkpoint saved"
        super().__init__(f"interrupted at step {step} ({position}); {saved}")


def one_line(exc: BaseException | str) -> str:
    """The message of ``exc`` on one line (torch and pickle messages can span several)."""
    return " ".join(str(exc).split())


def decode_error_text(exc: BaseException) -> str:
    """The original message of an image-decoding error, also when a DataLoader worker raised
    it (the main process then gets the worker's whole traceback as the message; the error's
    own line is its last)."""
    text = str(exc)
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        name = type(exc).__name__
        text = last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
    return one_line(text)


def ignore_sigint(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: workers ignore Ctrl-C (the terminal sends it to the
    whole process group) and keep serving batches until the main process stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRequest:
    """Context manager: while active (main thread only), the first SIGINT sets
    :attr:`requested`; a second raises ``KeyboardInterrupt``. The previous handler is
    restored on exit. Elsewhere (another thread) it is inert and Ctrl-C works as usual."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True  # no printing here: a handler may run inside a print

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
