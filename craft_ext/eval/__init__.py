"""Face-verification evaluation: insightface ``.bin`` sets, LFW pair lists, 10-fold accuracy.

* :func:`load_bin` / :func:`write_bin` - insightface verification files, read with a restricted
  unpickler that cannot run code.
* :func:`load_pairs` - LFW-style ``pairs.txt`` / ``pairsDevTest.txt`` with an image folder.
* :func:`extract_embeddings`, :func:`verification_accuracy`, :func:`evaluate` - flip-augmented
  embeddings, LFW 10-fold accuracy, TAR@FAR and AUC.
* :class:`VerificationSet`, :func:`load_verification_set` - ``--val`` arguments for trainers.
"""

from __future__ import annotations

from .binfile import SafeBinUnpickler, load_bin, safe_load_pickle, write_bin
from .pairs import load_pairs, read_pairs
from .verification import (
    VerificationSet,
    evaluate,
    extract_embeddings,
    load_verification_set,
    verification_accuracy,
)

__all__ = [
    "SafeBinUnpickler",
    "VerificationSet",
    "evaluate",
    "extract_embeddings",
    "load_bin",
    "load_pairs",
    "load_verification_set",
    "read_pairs",
    "safe_load_pickle",
    "verification_accuracy",
    "write_bin",
]
