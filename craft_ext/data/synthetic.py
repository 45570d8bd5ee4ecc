"""Deterministic random face-sized images for throughput runs and tests."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["SyntheticFaceDataset"]

_MIX = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


def _seed(*values: int) -> int:
    h = 0x2545F4914F6CDD1D
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * _MIX + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & _MASK


class SyntheticFaceDataset(Dataset):
    """``num_samples`` deterministic uint8 ``[3, size, size]`` images over ``num_classes`` labels.

    Sample ``i`` has label ``i % num_classes`` and an image made of a smooth per-class pattern
    plus per-sample noise, both drawn from generators seeded by ``(seed, class)`` and
    ``(seed, i)``: the same arguments always give the same data, in any process and order, and
    the classes are separable (a model can actually learn them).
    """

    def __init__(
        self,
        num_classes: int,
        num_samples: int,
        size: int = 112,
        seed: int = 0,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        noise: float = 24.0,
    ) -> None:
        if num_classes < 1 or num_samples < 1 or size < 1:
            raise ValueError("num_classes, num_samples and size must be positive")
        self.num_classes = int(num_classes)
        self.num_samples = int(num_samples)
        self.size = int(size)
        self.seed = int(seed)
        self.transform = transform
        self.noise = float(noise)

    def __len__(self) -> int:
        return self.num_samples

    @property
    def labels(self) -> list[int]:
        """Label of every sample (``i % num_classes``), without generating any image."""
        return [i % self.num_classes for i in range(self.num_samples)]

    def _pattern(self, label: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_seed(self.seed, 1, label))
        coarse = torch.rand(1, 3, 7, 7, generator=g) * 200.0 + 28.0
        return F.interpolate(
            coarse, size=(self.size, self.size), mode="bilinear", align_corners=False
        )[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        index %= self.num_samples
        label = index % self.num_classes
        g = torch.Generator().manual_seed(_seed(self.seed, 2, index))
        noise = torch.randn(3, self.size, self.size, generator=g) * self.noise
        image = (self._pattern(label) + noise).round_().clamp_(0, 255).to(torch.uint8)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def __repr__(self) -> str:
        return (
            f"SyntheticFaceDataset(num_classes={self.num_classes}, "
            f"num_samples={self.num_samples}, size={self.size}, seed={self.seed})"
        )
