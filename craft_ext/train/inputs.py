"""The data of a ``craft-train`` run: training set, verification sets, batch order.

* :class:`EpochBatches`: the deterministic, resumable, rank-sharded micro-batches of an epoch.
* :func:`build_train_set`: ``--data`` (toy, synthetic, image folder, RecordIO).
* :func:`build_val_sets`: ``--val`` (toy pairs, ``.bin`` files, LFW-style pair lists), or
  :func:`craft_ext.train.config.default_val` when it is not given.
* :class:`SkipReporting`: an image-folder set whose items carry the unreadable files passed
  over to reach them (``--on-error skip``), so the trainer can count skips made in DataLoader
  worker processes.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from craft_ext.data.image import ImageDecodeError
from craft_ext.train.config import TrainConfig, default_val
from craft_ext.train.toy import ToyFaces, toy_pairs

__all__ = [
    "EpochBatches",
    "SkipReporting",
    "build_train_set",
    "build_val_sets",
    "collate",
    "collate_with_skips",
    "val_specs",
]


class EpochBatches(Sampler[list[int]]):
    """Deterministic, resumable, rank-sharded batches of one epoch.

    Epoch ``e``'s order is a permutation drawn from a generator seeded by ``(seed, e)``; the
    first ``len // (batch_size * world)`` global batches are kept (drop_last), rounded down to
    a multiple of ``accumulate`` (the micro-batches of one optimizer step), global batch b is
    split across ranks, and the first ``skip`` batches of this rank are left out (resume).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        rank: int = 0,
        world: int = 1,
        skip: int = 0,
        accumulate: int = 1,
    ) -> None:
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.rank, self.world, self.skip = rank, world, skip
        self.full_batches = n // (batch_size * world)
        self.batches_per_epoch = self.full_batches // accumulate * accumulate

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.skip)

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        usable = self.full_batches * self.batch_size * self.world
        grid = perm[:usable].view(self.full_batches, self.world, self.batch_size)
        for b in range(self.skip, self.batches_per_epoch):
            yield grid[b, self.rank].tolist()


def collate(items: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    """``(images [B, 3, H, W], labels int64 [B])`` of a list of ``(image, label)``."""
    images = torch.stack([torch.as_tensor(item[0]) for item in items])
    labels = torch.tensor([int(item[1]) for item in items], dtype=torch.int64)
    return images, labels


def collate_with_skips(items: list[tuple[Any, ...]]) -> tuple[Tensor, Tensor, list[Any]]:
    """:func:`collate` plus the ``(path, reason)`` skips the items carry (none for sets that
    do not report them)."""
    images, labels = collate(items)  # type: ignore[arg-type]
    return images, labels, [skip for item in items if len(item) > 2 for skip in item[2]]


class SkipReporting(Dataset):
    """Items ``(image, label, skipped)`` of a :class:`craft_ext.data.ImageFolderDataset`
    (its :meth:`~craft_ext.data.ImageFolderDataset.load_item`)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int, list[tuple[str, str]]]:
        return self.dataset.load_item(index)


def _parse_toy(spec: str) -> tuple[int, int]:
    parts = spec.split(":")
    try:
        classes = int(parts[1]) if len(parts) > 1 else 100
        per_class = int(parts[2]) if len(parts) > 2 else 24
    except ValueError:
        raise ValueError(f"--data {spec!r}: expected toy[:CLASSES[:IMAGES_PER_CLASS]]") from None
    return classes, per_class


def build_train_set(cfg: TrainConfig) -> tuple[Dataset, int]:
    """The training data set named by ``cfg.data`` and its number of identities."""
    spec = cfg.data
    if spec == "toy" or spec.startswith("toy:"):
        classes, per_class = _parse_toy(spec)
        return ToyFaces(classes, per_class, size=cfg.image_size, seed=cfg.seed), classes
    from craft_ext import data as cdata

    if spec == "synthetic" or spec.startswith("synthetic:"):
        classes, per_class = _parse_toy(spec)
        ds = cdata.SyntheticFaceDataset(
            num_classes=classes,
            num_samples=classes * per_class,
            size=cfg.image_size,
            seed=cfg.seed,
        )
        return ds, classes
    path = Path(spec)
    # resized in the loader workers as the verification sets are (PIL bilinear + centre crop)
    resize = cdata.Resize(cfg.image_size)
    if (path / "train.rec").is_file():
        ds = cdata.RecordIODataset(path, transform=resize)
        return ds, ds.num_classes
    if path.is_dir():
        ds = cdata.ImageFolderDataset(
            path,
            transform=resize,
            identities=cfg.identities,
            min_images=cfg.min_images,
            on_error=cfg.on_error,
            progress=cfg.progress,
        )
        return ds, ds.num_classes
    raise FileNotFoundError(
        f"--data {spec!r}: not 'toy', 'synthetic', an image folder or a RecordIO directory"
    )


def val_specs(cfg: TrainConfig) -> list[str]:
    """The run's verification sets: ``cfg.val``, or the data's default when it is None."""
    return list(cfg.val) if cfg.val is not None else default_val(cfg.data)


def build_val_sets(cfg: TrainConfig) -> list[Any]:
    """Verification sets named by :func:`val_specs` (:class:`craft_ext.eval.VerificationSet`).
    A file that cannot be used raises an error whose one-line message names it."""
    from craft_ext.eval import VerificationSet, load_verification_set

    out = []
    for spec in val_specs(cfg):
        if spec == "toy":
            images, issame = toy_pairs(600, size=cfg.image_size, seed=cfg.seed)
            out.append(VerificationSet("toy", images, issame, 10))
            continue
        try:
            out.append(load_verification_set(spec, image_size=cfg.image_size, progress=False))
        except (OSError, ValueError, pickle.UnpicklingError, ImageDecodeError) as exc:
            raise type(exc)(f"--val {exc}") from None  # the same error, said as --val's
    return out
