"""One-folder-per-identity image datasets (``root/<identity>/<image>``)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .image import ImageDecodeError, load_image, to_chw_tensor

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset", "read_identity_list"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

Transform = Callable[[torch.Tensor], torch.Tensor]


def read_identity_list(path: str | os.PathLike[str]) -> list[str]:
    """Read identity names from a list file, keeping file order and dropping duplicates.

    Accepts LFW's ``people*.txt`` format (a first line with the count, lines
    ``Name<TAB>num_images``, and in ``people.txt`` per-fold count lines) and plain files with one
    name per line. Blank lines, ``#`` comments and lines that are a bare integer are ignored; a
    trailing integer column (tab- or space-separated) is dropped.
    """
    names: list[str] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith("#") or line.isdigit():
                continue
            if "\t" in line:
                name = line.split("\t")[0].strip()
            else:
                tokens = line.split()
                name = " ".join(tokens[:-1]) if len(tokens) > 1 and tokens[-1].isdigit() else line
            if name and name not in seen:
                seen.add(name)
                names.append(name)
    return names


class ImageFolderDataset(Dataset):
    """Face images stored one folder per identity: ``root/<identity>/<file>``.

    Labels are ``0..C-1`` in sorted identity-name order (after filtering). Items are
    ``(image, label)`` with ``image`` the ``transform`` of a ``[3, H, W]`` uint8 RGB tensor (the
    tensor itself when ``transform`` is None) and ``label`` an int.

    Args:
        root: dataset folder.
        identities: None (every sub-folder), a path to an identity-list file (see
            :func:`read_identity_list`) or an iterable of names. Listed identities that have no
            folder raise ``FileNotFoundError`` (``on_error="raise"``) or are warned about and
            recorded in ``missing_identities`` (``on_error="skip"``).
        transform: applied to each image tensor.
        on_error: ``"raise"``: an unreadable / corrupt image raises :class:`ImageDecodeError`
            naming the file. ``"skip"``: it is skipped with a warning and counted in
            ``skipped`` (at load time the next readable sample is returned in its place; counts
            made inside DataLoader worker processes stay in those processes, so use
            ``verify=True`` for an exact count up front).
        min_images: identities with fewer (listed, or readable when ``verify``) images are dropped.
        verify: decode every image once at construction (with a progress bar) so corrupt files are
            found up front; with ``on_error="skip"`` they are removed from the dataset.
        extensions: accepted file extensions (case-insensitive).
        progress: show progress bars.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        identities: None | str | os.PathLike[str] | Iterable[str] = None,
        transform: Transform | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        min_images: int = 1,
        verify: bool = False,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
        progress: bool = True,
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"image folder root {self.root} does not exist")
        self.transform = transform
        self.on_error = on_error
        self.skipped = 0
        self.skipped_files: list[str] = []
        self.missing_identities: list[str] = []
        exts = tuple(e.lower() for e in extensions)

        if identities is None:
            names = sorted(
                d.name for d in os.scandir(self.root) if d.is_dir() and not d.name.startswith(".")
            )
        else:
            if isinstance(identities, str | os.PathLike):
                wanted = read_identity_list(identities)
            else:
                wanted = list(dict.fromkeys(str(n) for n in identities))
            names = []
            for n in wanted:
                if os.path.isdir(os.path.join(self.root, n)):
                    names.append(n)
                else:
                    self.missing_identities.append(n)
            if self.missing_identities:
                shown = ", ".join(self.missing_identities[:5])
                more = len(self.missing_identities) - 5
                msg = (
                    f"{len(self.missing_identities)} listed identities have no folder under "
                    f"{self.root}: {shown}" + (f" (and {more} more)" if more > 0 else "")
                )
                if on_error == "raise":
                    raise FileNotFoundError(msg)
                warnings.warn(msg, stacklevel=2)
            names = sorted(names)

        per_identity: list[tuple[str, list[str]]] = []
        for name in names:
            folder = os.path.join(self.root, name)
            files = sorted(
                os.path.join(folder, e.name)
                for e in os.scandir(folder)
                if e.is_file() and e.name.lower().endswith(exts)
            )
            per_identity.append((name, files))

        if verify:
            total = sum(len(f) for _, f in per_identity)
            bar = tqdm(total=total, desc="verifying images", disable=not progress, leave=False)
            checked: list[tuple[str, list[str]]] = []
            for name, files in per_identity:
                good = []
                for path in files:
                    try:
                        load_image(path)
                        good.append(path)
                    except ImageDecodeError as exc:
                        if on_error == "raise":
                            raise
                        self._record_skip(path, exc)
                    bar.update(1)
                checked.append((name, good))
            bar.close()
            per_identity = checked

        kept = [(n, f) for n, f in per_identity if len(f) >= max(1, min_images)]
        self.classes: list[str] = [n for n, _ in kept]
        self.class_to_idx: dict[str, int] = {n: i for i, n in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = [
            (path, label) for label, (_, files) in enumerate(kept) for path in files
        ]
        self.labels: list[int] = [lbl for _, lbl in self.samples]
        if not self.samples:
            raise ValueError(f"no images found under {self.root} after filtering")

    @property
    def num_classes(self) -> int:
        """Number of identities (labels are ``0..num_classes-1``)."""
        return len(self.classes)

    def _record_skip(self, path: str, exc: Exception | str) -> None:
        self.skipped += 1
        self.skipped_files.append(path)
        warnings.warn(f"skipping unreadable image ({exc})", stacklevel=3)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label, skipped = self.load_item(index)
        for path, reason in skipped:
            self._record_skip(path, reason)
        return image, label

    def load_item(self, index: int) -> tuple[torch.Tensor, int, list[tuple[str, str]]]:
        """Item ``index`` as ``(image, label, skipped)`` without recording or warning:
        ``skipped`` lists ``(path, reason)`` of the unreadable files passed over
        (``on_error="skip"``) to reach it. Lets a caller count skips made in DataLoader
        worker processes, whose own counters stay there."""
        n = len(self.samples)
        skipped: list[tuple[str, str]] = []
        for attempt in range(n):
            path, label = self.samples[(index + attempt) % n]
            try:
                image = to_chw_tensor(load_image(path))
            except ImageDecodeError as exc:
                if self.on_error == "raise":
                    raise
                skipped.append((path, str(exc)))
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, label, skipped
        raise ImageDecodeError(f"no readable image in {self.root} ({n} files, all unreadable)")

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(root={self.root!r}, identities={self.num_classes}, "
            f"images={len(self)}, skipped={self.skipped})"
        )
