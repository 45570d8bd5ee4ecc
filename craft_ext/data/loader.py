"""Reproducible, resumable data loading (single process or torch.distributed).

The order of samples in an epoch depends only on ``(seed, epoch)`` (and rank / world size under
torch.distributed, via :class:`~torch.utils.data.DistributedSampler`), and every sample's random
augmentation is drawn from a torch RNG seeded by ``(seed, epoch, index)``. So an epoch is the
same whatever the number of workers, and a resumed run that skips the batches it already
consumed (:meth:`FaceLoader.set_epoch` with ``skip_batches``, or :meth:`FaceLoader.state_dict` /
:meth:`FaceLoader.load_state_dict`) sees exactly the batches the interrupted run would have seen.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sized
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from .synthetic import _seed

__all__ = ["FaceLoader", "ResumableSampler", "make_loader"]


class _IndexOnly(Dataset):
    """Stand-in dataset that only has a length (for DistributedSampler)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:  # pragma: no cover - never read
        return index


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, sample_seed)`` for one epoch, optionally skipping its first samples.

    ``distributed=True`` partitions with :class:`~torch.utils.data.DistributedSampler`
    (``seed + epoch`` shuffling, ``drop_last`` as given); otherwise the permutation is
    ``torch.randperm`` under a generator seeded with ``seed + epoch`` (or identity order when
    ``shuffle`` is False).
    """

    def __init__(
        self,
        num_samples: int,
        shuffle: bool = True,
        seed: int = 0,
        distributed: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        self.num_samples = int(num_samples)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.skip = 0
        self.dist_sampler: DistributedSampler | None = None
        if distributed:
            self.dist_sampler = DistributedSampler(
                _IndexOnly(self.num_samples),
                num_replicas=num_replicas,
                rank=rank,
                shuffle=shuffle,
                seed=self.seed,
                drop_last=drop_last,
            )

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch and the number of leading samples (of this rank) to skip."""
        self.epoch = int(epoch)
        self.skip = max(0, int(skip))

    def epoch_indices(self) -> list[int]:
        """The full index order of the current epoch for this rank (before skipping)."""
        if self.dist_sampler is not None:
            self.dist_sampler.set_epoch(self.epoch)
            return list(self.dist_sampler)
        if not self.shuffle:
            return list(range(self.num_samples))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for idx in self.epoch_indices()[self.skip :]:
            yield idx, _seed(self.seed, self.epoch, idx)

    def full_length(self) -> int:
        """Samples per epoch for this rank, ignoring ``skip``."""
        if self.dist_sampler is not None:
            return len(self.dist_sampler)
        return self.num_samples

    def __len__(self) -> int:
        return max(0, self.full_length() - self.skip)


class _SeededDataset(Dataset):
    """Runs ``dataset[index]`` under a torch RNG seeded with the sampler's per-sample seed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def _worker_init(worker_id: int) -> None:
    """Seed python's and numpy's RNGs from the (deterministic) torch worker seed."""
    s = torch.initial_seed() % (2**32)
    random.seed(s)
    np.random.seed(s)  # noqa: NPY002 - user transforms may use the legacy global RNG


class FaceLoader:
    """Iterable of ``(images, labels)`` batches with epoch control and resumption.

    Build it with :func:`make_loader`. Typical use::

        loader = make_loader(ds, 128, workers=4, seed=0)
        loader.load_state_dict(ckpt["loader"])       # optional: resume mid-epoch
        for epoch in range(loader.epoch, epochs):
            if epoch != loader.epoch:
                loader.set_epoch(epoch)
            for images, labels in loader:
                ...
                ckpt["loader"] = loader.state_dict()
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        distributed: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = True,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.drop_last = drop_last
        self.seed = int(seed)
        self.sampler = ResumableSampler(
            len(dataset),  # type: ignore[arg-type]
            shuffle=shuffle,
            seed=seed,
            distributed=distributed,
            num_replicas=num_replicas,
            rank=rank,
            drop_last=drop_last,
        )
        self._generator = torch.Generator()
        kwargs: dict[str, Any] = {}
        if workers > 0:
            kwargs["persistent_workers"] = persistent_workers
            if prefetch_factor is not None:
                kwargs["prefetch_factor"] = prefetch_factor
        self.loader = DataLoader(
            _SeededDataset(dataset),
            batch_size=self.batch_size,
            sampler=self.sampler,
            num_workers=int(workers),
            drop_last=drop_last,
            pin_memory=pin_memory,
            worker_init_fn=_worker_init,
            generator=self._generator,
            **kwargs,
        )
        self.batch_in_epoch = 0
        self.set_epoch(0)

    @property
    def epoch(self) -> int:
        """The current epoch."""
        return self.sampler.epoch

    @property
    def batches_per_epoch(self) -> int:
        """Batches in a full epoch on this rank."""
        n = self.sampler.full_length()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select ``epoch``; the next iteration starts after its first ``skip_batches`` batches."""
        skip_batches = max(0, int(skip_batches))
        self.sampler.set_epoch(epoch, skip=skip_batches * self.batch_size)
        self._generator.manual_seed(_seed(self.seed, epoch, 0x5EED))
        self.batch_in_epoch = min(skip_batches, self.batches_per_epoch)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.loader:
            self.batch_in_epoch += 1
            yield batch

    def __len__(self) -> int:
        """Batches the next iteration yields (the epoch minus skipped batches)."""
        return max(0, self.batches_per_epoch - self.sampler.skip // self.batch_size)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batch", "seed"}``: where to resume (``batch`` = batches consumed)."""
        return {"epoch": self.epoch, "batch": self.batch_in_epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state["epoch"]`` after ``state["batch"]`` consumed batches.

        A finished epoch (``batch == batches_per_epoch``) resumes at the start of the next one.
        """
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"loader state was saved with seed {state['seed']}, this loader uses {self.seed}"
            )
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if batch >= self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        self.set_epoch(epoch, batch)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    distributed: bool | None = None,
    drop_last: bool = True,
    pin_memory: bool = False,
    num_replicas: int | None = None,
    rank: int | None = None,
    persistent_workers: bool = False,
) -> FaceLoader:
    """Build a reproducible, resumable :class:`FaceLoader` over ``dataset``.

    Args:
        dataset: any map-style dataset (``__len__`` + ``__getitem__``).
        batch_size: per-process batch size.
        workers: DataLoader worker processes (0 = load in the main process).
        shuffle: shuffle each epoch (order from ``seed + epoch``).
        seed: seeds the order and the per-sample augmentation RNG.
        distributed: partition across ranks with DistributedSampler. None (default) = use it
            when torch.distributed is initialised.
        drop_last: drop the last incomplete batch (the default, for training).
        pin_memory: pin batches (for GPU training).
        num_replicas, rank: override the world size / rank (default: from torch.distributed).
        persistent_workers: keep workers alive between epochs.
    """
    if not isinstance(dataset, Sized):
        raise TypeError("make_loader needs a map-style dataset with __len__")
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    if num_replicas is not None or rank is not None:
        distributed = True
    return FaceLoader(
        dataset,
        batch_size,
        workers=workers,
        shuffle=shuffle,
        seed=seed,
        distributed=distributed,
        num_replicas=num_replicas,
        rank=rank,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers,
    )
