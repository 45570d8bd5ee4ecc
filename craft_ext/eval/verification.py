"""Face-verification evaluation: embeddings, LFW 10-fold accuracy, TAR@FAR."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.transforms import normalize

__all__ = [
    "VerificationSet",
    "evaluate",
    "extract_embeddings",
    "load_verification_set",
    "verification_accuracy",
]


@dataclass
class VerificationSet:
    """A verification benchmark: ``2N`` images forming ``N`` pairs.

    Attributes:
        name: label for logs ("lfw", "cfp_fp", ...).
        images: uint8 ``[2N, 3, H, W]`` RGB; pair ``i`` is images ``2i`` and ``2i+1``.
        issame: bool ``[N]``.
        folds: int64 ``[N]`` fold ids, or an int k for k contiguous folds (insightface's
            convention for ``.bin`` files, whose pairs are stored fold by fold).
    """

    name: str
    images: torch.Tensor
    issame: torch.Tensor
    folds: torch.Tensor | int = 10

    def __post_init__(self) -> None:
        if self.images.shape[0] != 2 * self.issame.shape[0]:
            raise ValueError(
                f"{self.name}: {self.images.shape[0]} images for {self.issame.shape[0]} pairs"
            )

    @property
    def num_pairs(self) -> int:
        """Number of pairs ``N``."""
        return int(self.issame.shape[0])


@torch.no_grad()
def extract_embeddings(
    model: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    flip: bool = True,
    progress: bool = True,
) -> torch.Tensor:
    """Embed ``images`` with ``model``; returns L2-normalised float32 ``[M, D]`` on the CPU.

    ``images`` are uint8 ``[M, 3, H, W]`` RGB (normalised here with arcface_torch's
    ``(x/255 - 0.5)/0.5``) or float tensors taken as already normalised. With ``flip`` the
    embedding is the sum of the embeddings of the image and its mirror image, then normalised.
    The model runs in eval mode (its previous mode is restored) without gradients, on ``device``
    (default: the device of its first parameter).
    """
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        starts = range(0, images.shape[0], batch_size)
        for s in tqdm(starts, desc="embedding", disable=not progress, leave=False):
            batch = images[s : s + batch_size].to(device, non_blocking=True)
            batch = normalize(batch) if batch.dtype == torch.uint8 else batch.float()
            emb = model(batch).float()
            if flip:
                emb = emb + model(batch.flip(-1)).float()
            out.append(torch.nn.functional.normalize(emb, dim=1).cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.empty((0, 0), dtype=torch.float32)
    return torch.cat(out)


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _best_threshold(scores: np.ndarray, same: np.ndarray) -> float:
    """Threshold ``t`` maximising the accuracy of ``score > t`` (middle of the best gap)."""
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], same[order]
    m = len(s)
    # k = number of pairs predicted "different" (those with the k lowest scores)
    diff_below = np.concatenate([[0], np.cumsum(~y)])
    same_above = int(y.sum()) - np.concatenate([[0], np.cumsum(y)])
    correct = diff_below + same_above
    valid = np.ones(m + 1, dtype=bool)
    valid[1:m] = s[:-1] < s[1:]  # cannot split between equal scores
    correct = np.where(valid, correct, -1)
    ka = int(np.argmax(correct))
    kb = ka
    while kb + 1 <= m and (correct[kb + 1] == correct[ka] or not valid[kb + 1]):
        kb += 1
    while not valid[kb]:
        kb -= 1
    lo = s[ka - 1] if ka > 0 else s[0] - 1.0
    hi = s[kb] if kb < m else s[-1] + 1.0
    return float((lo + hi) / 2)


def _fold_ids(n: int, folds: Any) -> np.ndarray:
    if isinstance(folds, int | np.integer):
        k = int(folds)
        if not 2 <= k <= n:
            raise ValueError(f"need 2 <= folds <= number of pairs ({n}), got {k}")
        ids = np.empty(n, dtype=np.int64)
        for f, chunk in enumerate(np.array_split(np.arange(n), k)):
            ids[chunk] = f
        return ids
    ids = _as_numpy(folds).astype(np.int64).reshape(-1)
    if ids.shape[0] != n:
        raise ValueError(f"{ids.shape[0]} fold ids for {n} pairs")
    if len(np.unique(ids)) < 2:
        raise ValueError("need at least two folds")
    return ids


def verification_accuracy(
    emb1: torch.Tensor | np.ndarray,
    emb2: torch.Tensor | np.ndarray,
    issame: torch.Tensor | np.ndarray | Sequence[bool],
    folds: int | torch.Tensor | np.ndarray = 10,
    fars: Sequence[float] = (1e-3, 1e-2),
) -> dict[str, Any]:
    """LFW-protocol verification accuracy of cosine similarity between ``emb1[i]``, ``emb2[i]``.

    For each fold, the threshold on cosine similarity (``sim > t`` means "same") that maximises
    accuracy on the other folds is applied to the held-out fold. ``folds`` is an int k (k
    contiguous folds, as insightface's ``KFold(shuffle=False)``) or per-pair fold ids.

    Returns a dict: ``accuracy`` (mean over folds), ``std`` (population std over folds),
    ``best_threshold`` (mean of the fold thresholds, cosine), ``fold_accuracies``,
    ``thresholds``, ``tar_at_far`` (``{far: TAR}`` from the ROC over all pairs: the highest true
    accept rate whose false accept rate is <= far), ``auc`` (ROC AUC) and ``num_pairs``.
    """
    from sklearn.metrics import auc as _auc
    from sklearn.metrics import roc_curve

    e1 = _as_numpy(emb1).astype(np.float64)
    e2 = _as_numpy(emb2).astype(np.float64)
    same = _as_numpy(issame).astype(bool).reshape(-1)
    if e1.shape != e2.shape or e1.ndim != 2 or e1.shape[0] != same.shape[0]:
        raise ValueError(f"embedding shapes {e1.shape}, {e2.shape} do not match {same.shape[0]}")
    e1 = e1 / np.maximum(np.linalg.norm(e1, axis=1, keepdims=True), 1e-12)
    e2 = e2 / np.maximum(np.linalg.norm(e2, axis=1, keepdims=True), 1e-12)
    sims = np.sum(e1 * e2, axis=1)
    n = sims.shape[0]
    ids = _fold_ids(n, folds)
    accs, thresholds = [], []
    for f in np.unique(ids):
        test = ids == f
        thr = _best_threshold(sims[~test], same[~test])
        thresholds.append(thr)
        accs.append(float(np.mean((sims[test] > thr) == same[test])))
    result: dict[str, Any] = {
        "accuracy": float(np.mean(accs)),
        "std": float(np.std(accs)),
        "best_threshold": float(np.mean(thresholds)),
        "fold_accuracies": accs,
        "thresholds": thresholds,
        "num_pairs": n,
    }
    if same.all() or not same.any():
        result["tar_at_far"] = {float(f): float("nan") for f in fars}
        result["auc"] = float("nan")
        return result
    fpr, tpr, _ = roc_curve(same, sims)
    result["tar_at_far"] = {float(f): float(tpr[fpr <= f].max()) for f in fars}
    result["auc"] = float(_auc(fpr, tpr))
    return result


def evaluate(
    model: torch.nn.Module,
    val_set: VerificationSet,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    flip: bool = True,
    fars: Sequence[float] = (1e-3, 1e-2),
    progress: bool = True,
) -> dict[str, Any]:
    """Embed ``val_set`` with ``model`` and return :func:`verification_accuracy`'s dict
    (plus ``name``)."""
    emb = extract_embeddings(model, val_set.images, batch_size, device, flip, progress)
    result = verification_accuracy(emb[0::2], emb[1::2], val_set.issame, val_set.folds, fars)
    result["name"] = val_set.name
    return result


def _split_pairs_spec(spec: str) -> tuple[str, str] | None:
    for i, ch in enumerate(spec):
        if ch == ":" and os.path.isfile(spec[:i]) and os.path.isdir(spec[i + 1 :]):
            return spec[:i], spec[i + 1 :]
    return None


def load_verification_set(
    path_or_spec: str | os.PathLike[str],
    image_size: int | tuple[int, int] | None = None,
    name: str | None = None,
    progress: bool = True,
) -> VerificationSet:
    """Load a verification set from a ``--val``-style argument.

    Accepted forms (optionally prefixed ``name=``):

    * ``path/to/lfw.bin`` - insightface ``.bin`` (10 contiguous folds);
    * ``path/to/pairs.txt:path/to/images`` - LFW-style pairs file and image root (folds from the
      file, see :func:`craft_ext.eval.read_pairs`).

    ``image_size`` resizes / centre-crops (pairs default 112x112; ``.bin`` keeps its size).
    """
    from .binfile import load_bin
    from .pairs import load_pairs

    spec = os.fspath(path_or_spec)
    if "=" in spec and not os.path.exists(spec):
        label, rest = spec.split("=", 1)
        if label and os.sep not in label:
            name, spec = name or label, rest
    if os.path.isfile(spec):
        if spec.endswith(".txt"):
            raise ValueError(f"{spec}: a pairs file needs its image root: '{spec}:IMAGES_ROOT'")
        images, issame = load_bin(spec, image_size=image_size, progress=progress)
        stem = os.path.splitext(os.path.basename(spec))[0]
        return VerificationSet(name or stem, images, issame, 10)
    split = _split_pairs_spec(spec)
    if split is None:
        raise FileNotFoundError(
            f"verification set {spec!r}: expected an existing .bin file or "
            "'PAIRS_FILE:IMAGES_ROOT' (both existing)"
        )
    pairs_file, root = split
    images, issame, folds = load_pairs(
        pairs_file, root, image_size=image_size or 112, progress=progress
    )
    stem = os.path.splitext(os.path.basename(pairs_file))[0]
    return VerificationSet(name or stem, images, issame, folds)
