"""Training / evaluation transforms on ``[3, H, W]`` uint8 tensors (no torchvision needed).

The normalisation is arcface_torch's: ``(x / 255 - 0.5) / 0.5`` as float32, i.e. values in
``[-1, 1]``. Random decisions use the global torch RNG; :func:`craft_ext.data.make_loader` seeds
it per sample, so augmentation is reproducible regardless of worker count or resume point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .image import resize_center_crop, to_chw_tensor

__all__ = [
    "Compose",
    "Normalize",
    "RandomHorizontalFlip",
    "Resize",
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


class Resize:
    """Resize a ``[3, H, W]`` uint8 image to cover ``size`` and centre-crop it to exactly that
    (:func:`craft_ext.data.resize_center_crop`, PIL bilinear): the resampling the verification
    sets use, so training and evaluation see images prepared the same way. An image already of
    that size is returned as it is."""

    def __init__(self, size: int | tuple[int, int]) -> None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if len(hw) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in hw):
            raise ValueError(f"size must be a positive int or (H, W) pair of them, got {size!r}")
        self.size: tuple[int, int] = (int(hw[0]), int(hw[1]))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(
                f"Resize expects a [3, H, W] uint8 image, got {image.dtype} {tuple(image.shape)}"
            )
        if tuple(image.shape[1:]) == self.size:
            return image
        return to_chw_tensor(resize_center_crop(image.permute(1, 2, 0).numpy(), self.size))

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"


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
