"""Training / evaluation transforms on ``[3, H, W]`` uint8 tensors (no torchvision needed).

The normalisation is arcface_torch's: ``(x / 255 - 0.5) / 0.5`` as float32, i.e. values in
``[-1, 1]``. Random decisions use the global torch RNG; :func:`craft_ext.data.make_loader` seeds
it per sample, so augmentation is reproducible regardless of worker count or resume point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = [
    "Compose",
    "Normalize",
    "RandomHorizontalFlip",
    "eval_transform",
    "normalize",
    "train_transform",
]


def normalize(images: torch.Tensor) -> torch.Tensor:
    """arcface_torch normalisation: uint8 (any shape) -> float32 ``(x / 255 - 0.5) / 0.5``."""
    return images.to(torch.float32).div(127.5).sub(1.0)


class Normalize:
    """Callable form of :func:`normalize`."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return normalize(image)

    def __repr__(self) -> str:
        return "Normalize(mean=0.5, std=0.5)"


class RandomHorizontalFlip:
    """Mirror a ``[..., H, W]`` image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.p > 0 and float(torch.rand(())) < self.p:
            return image.flip(-1)
        return image

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            image = t(image)
        return image

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


def train_transform(flip_p: float = 0.5) -> Compose:
    """arcface_torch training transform: random horizontal flip, then normalisation."""
    return Compose([RandomHorizontalFlip(flip_p), Normalize()])


def eval_transform() -> Compose:
    """Evaluation transform: normalisation only."""
    return Compose([Normalize()])
