"""LFW-style pair lists (``pairs.txt``, ``pairsDevTest.txt``, ``pairsDevTrain.txt``)."""

from __future__ import annotations

import glob
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.image import ImageDecodeError, load_image, resize_center_crop, to_chw_tensor

__all__ = ["load_pairs", "read_pairs"]

Pair = tuple[str, int, str, int, bool]


def read_pairs(
    pairs_file: str | os.PathLike[str], num_folds: int = 10
) -> tuple[list[Pair], np.ndarray]:
    """Parse an LFW pairs file into ``[(name1, i1, name2, i2, issame)]`` and per-pair fold ids.

    Lines are ``Name i j`` (matched) or ``Name1 i Name2 j`` (mismatched), tab or space separated.
    The header decides the folds:

    * ``"S P"`` (``pairs.txt``: ``10 300``): S sets of P matched then P mismatched pairs; the
      set number is the fold (the official 10-fold View 2 protocol);
    * ``"P"`` (View 1 ``pairsDevTest.txt``: ``500``): P matched then P mismatched pairs (a file
      with just P pairs in all is accepted too). The file has no folds: pairs get ``num_folds``
      folds with matched and mismatched pairs each split in contiguous, equal chunks, so every
      fold holds both kinds.
    """
    pairs, folds, _ = _parse_pairs(pairs_file, num_folds)
    return pairs, folds


def _parse_pairs(
    pairs_file: str | os.PathLike[str], num_folds: int
) -> tuple[list[Pair], np.ndarray, list[int]]:
    """:func:`read_pairs` plus the line number of every pair."""
    path = os.fspath(pairs_file)
    with open(path, encoding="utf-8") as f:
        lines = [(n, ln.split()) for n, ln in enumerate(f, 1) if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: empty pairs file")
    head = lines[0][1]
    if not all(t.isdigit() for t in head) or len(head) not in (1, 2):
        raise ValueError(f"{path}: first line must be 'count' or 'sets count_per_set'")
    pairs: list[Pair] = []
    for lineno, tok in lines[1:]:
        if len(tok) == 3 and tok[1].isdigit() and tok[2].isdigit():
            pairs.append((tok[0], int(tok[1]), tok[0], int(tok[2]), True))
        elif len(tok) == 4 and tok[1].isdigit() and tok[3].isdigit():
            pairs.append((tok[0], int(tok[1]), tok[2], int(tok[3]), False))
        else:
            raise ValueError(f"{path}, line {lineno}: expected 'Name i j' or 'Name1 i Name2 j'")
    if len(head) == 2:
        sets, per = int(head[0]), int(head[1])
        if len(pairs) != 2 * sets * per:
            raise ValueError(f"{path}: header says {sets}x(2x{per}) pairs, found {len(pairs)}")
        folds = np.repeat(np.arange(sets), 2 * per)
    else:
        count = int(head[0])
        if len(pairs) not in (count, 2 * count):
            raise ValueError(
                f"{path}: header says {count} (matched + {count} mismatched) pairs, "
                f"found {len(pairs)}"
            )
        folds = np.zeros(len(pairs), dtype=np.int64)
        same = np.array([p[4] for p in pairs], dtype=bool)
        for mask in (same, ~same):
            n = int(mask.sum())
            folds[mask] = np.arange(n) * num_folds // max(n, 1)
    return pairs, folds.astype(np.int64), [n for n, _ in lines[1:]]


def _image_path(root: str, name: str, num: int) -> str | None:
    """The file of image ``num`` of ``name`` under ``root`` (any extension), or None."""
    stem = os.path.join(root, name, f"{name}_{num:04d}")
    for ext in (".jpg", ".png", ".jpeg"):
        if os.path.isfile(stem + ext):
            return stem + ext
    found = sorted(glob.glob(glob.escape(stem) + ".*"))
    return found[0] if found else None


def load_pairs(
    pairs_file: str | os.PathLike[str],
    images_root: str | os.PathLike[str],
    image_size: int | tuple[int, int] = 112,
    num_folds: int = 10,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Load the images of an LFW-style pairs file.

    Images are ``<images_root>/<Name>/<Name>_<NNNN>.jpg``; any other size than ``image_size`` is
    resized (shorter side) and centre-cropped. Returns ``(images, issame, folds)``: uint8
    ``[2N, 3, H, W]`` RGB (pair ``i`` = images ``2i``, ``2i+1``), bool ``[N]`` and int64 ``[N]``
    fold ids (see :func:`read_pairs`).
    """
    pairs, folds, linenos = _parse_pairs(pairs_file, num_folds)
    root = os.fspath(images_root)
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    refs = [(p[0], p[1]) if k == 0 else (p[2], p[3]) for p in pairs for k in (0, 1)]
    files: dict[tuple[str, int], str | None] = {}
    missing: list[str] = []
    for i, key in enumerate(refs):  # every file checked before any is decoded
        if key not in files:
            files[key] = _image_path(root, *key)
            if files[key] is None:
                missing.append(f"{key[0]}/{key[0]}_{key[1]:04d}.jpg (line {linenos[i // 2]})")
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(
            f"{os.fspath(pairs_file)} names {len(missing)} image(s) missing under {root}: "
            f"{', '.join(missing[:3])}{more}"
        )
    images = torch.empty((2 * len(pairs), 3, size[0], size[1]), dtype=torch.uint8)
    cache: dict[tuple[str, int], torch.Tensor] = {}
    for i, key in enumerate(
        tqdm(refs, desc=f"loading {os.path.basename(os.fspath(pairs_file))}", disable=not progress)
    ):
        if key not in cache:
            try:
                arr = load_image(files[key])  # type: ignore[arg-type]
            except ImageDecodeError as exc:
                raise ImageDecodeError(
                    f"{os.fspath(pairs_file)}, line {linenos[i // 2]}: {exc}"
                ) from None
            cache[key] = to_chw_tensor(resize_center_crop(arr, size))
        images[i] = cache[key]
    issame = torch.tensor([p[4] for p in pairs], dtype=torch.bool)
    return images, issame, torch.from_numpy(folds)
