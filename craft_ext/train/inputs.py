"""The data of a ``craft-train`` run: training set, verification sets, batch order.

* :class:`EpochBatches`: the deterministic, resumable, rank-sharded micro-batches of an epoch.
* :func:`build_train_set`: ``--data`` (toy, synthetic, image folder, RecordIO).
* :func:`build_val_sets`: ``--val`` (toy pairs, ``.bin`` files, LFW-style pair lists), or
  :func:`craft_ext.train.config.default_val` when it is not given.
* :class:`SkipReporting`: an image-folder set whose items carry the unreadable files passed
  over to reach them (``--on-error skip``), so the trainer can count skips made in DataLoader
  worker processes.
* :class:`InputFeed`: a mixin of :class:`craft_ext.train.Trainer`, the DataLoader of the rest
  of the current epoch and the images a step takes from it (flips, scaling, layout).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from craft_ext.data.image import ImageDecodeError
from craft_ext.train.config import TrainConfig, default_val
from craft_ext.train.errors import ignore_sigint
from craft_ext.train.toy import ToyFaces, toy_pairs

__all__ = [
    "EpochBatches",
    "InputFeed",
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


class InputFeed:
    """The micro-batches of a :class:`craft_ext.train.Trainer`'s current epoch, and the
    images a step takes from them."""

    cfg: Any
    train_set: Any
    device: torch.device
    rank: int
    world: int
    epoch: int
    step: int
    batch_in_epoch: int

    def _images(self, images: Tensor, micro: int = 0) -> Tensor:
        g = torch.Generator().manual_seed(
            self.cfg.seed * 7_000_003 + self.step * self.cfg.grad_accum + micro
        )
        flip = torch.rand(images.shape[0], generator=g) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
        x = images.to(self.device, non_blocking=True)
        x = x.float().div_(127.5).sub_(1.0) if x.dtype == torch.uint8 else x.float()
        size = self.cfg.image_size
        if x.shape[-2:] != (size, size):  # only a data set not built by build_train_set
            x = torch.nn.functional.interpolate(
                x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _loader(self, skips: bool = False) -> DataLoader:
        """This epoch's remaining micro-batches ``(images, labels)``; with ``skips``
        ``(images, labels, skipped)``, ``skipped`` the ``(path, reason)`` of unreadable images
        passed over (``--on-error skip`` on an image folder)."""
        dataset: Any = self.train_set
        if skips and hasattr(dataset, "load_item"):
            dataset = SkipReporting(dataset)
        sampler = EpochBatches(
            len(self.train_set),
            self.cfg.batch_size,
            seed=self.cfg.seed,
            epoch=self.epoch,
            rank=self.rank,
            world=self.world,
            skip=self.batch_in_epoch * self.cfg.grad_accum,
            accumulate=self.cfg.grad_accum,
        )
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=self.cfg.workers,
            collate_fn=collate_with_skips if skips else collate,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=ignore_sigint if self.cfg.workers else None,
            # the loader's own seed source: creating an iterator must not draw from the global
            # RNG (dropout's), or a run resumed mid-epoch would diverge from an unbroken one
            generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.epoch),
        )
