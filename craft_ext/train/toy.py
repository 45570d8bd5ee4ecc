"""A built-in synthetic face-identity data set, so ``craft-train`` runs with no download.

Each identity is a smooth random colour pattern (a low-resolution random field, upsampled);
each image of it is that pattern shifted by a few pixels, with brightness and contrast jitter
and pixel noise. Telling identities apart therefore takes learning, and verification accuracy
on held-out identities means something, unlike pure-noise throughput data. Images are
generated from (seed, identity, index) on the fly: nothing is stored, and any index gives the
same image in any process or worker.

Not faces: use it to exercise training, CRAFT and the tooling, and real data for results.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset

__all__ = ["ToyFaces", "toy_pairs"]

_LOW_RES = 6


def _identity_pattern(seed: int, identity: int, size: int) -> Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + identity * 7919 + 17)
    low = torch.rand(1, 3, _LOW_RES, _LOW_RES, generator=g)
    pattern = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)[0]
    return pattern.clamp(0.0, 1.0)


def _render(seed: int, identity: int, index: int, size: int, pattern: Tensor) -> Tensor:
    g = torch.Generator().manual_seed((seed * 31 + identity) * 100_003 + index * 13 + 5)
    max_shift = max(1, size // 16)
    dx, dy = torch.randint(-max_shift, max_shift + 1, (2,), generator=g).tolist()
    img = torch.roll(pattern, shifts=(dy, dx), dims=(1, 2))
    contrast = 0.7 + 0.6 * torch.rand((), generator=g)
    brightness = 0.25 * (torch.rand((), generator=g) - 0.5)
    img = (img - 0.5) * contrast + 0.5 + brightness
    img = img + 0.06 * torch.randn(img.shape, generator=g)
    return (img.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


class ToyFaces(Dataset):
    """``num_classes`` synthetic identities with ``per_class`` images each.

    Items are ``(image uint8 [3, size, size], label int)``; identities start at
    ``first_identity`` (so held-out verification identities can be disjoint from training).
    """

    def __init__(
        self,
        num_classes: int = 200,
        per_class: int = 20,
        *,
        size: int = 112,
        seed: int = 0,
        first_identity: int = 0,
    ) -> None:
        if num_classes < 1 or per_class < 1:
            raise ValueError(
                f"num_classes and per_class must be >= 1, got {num_classes} and {per_class}"
            )
        if size < 16:
            raise ValueError(f"size must be >= 16 pixels, got {size}")
        self.num_classes = int(num_classes)
        self.per_class = int(per_class)
        self.size = int(size)
        self.seed = int(seed)
        self.first_identity = int(first_identity)
        self._patterns: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return self.num_classes * self.per_class

    @property
    def labels(self) -> list[int]:
        """Label of every item (``i // per_class``), without rendering any image."""
        return [i // self.per_class for i in range(len(self))]

    def image(self, identity: int, index: int) -> Tensor:
        """Image ``index`` of absolute identity ``identity`` (uint8 [3, size, size])."""
        if identity not in self._patterns:
            self._patterns[identity] = _identity_pattern(self.seed, identity, self.size)
        return _render(self.seed, identity, index, self.size, self._patterns[identity])

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} images")
        label, index = divmod(i, self.per_class)
        return self.image(self.first_identity + label, index), label


def toy_pairs(
    num_pairs: int = 600,
    *,
    size: int = 112,
    seed: int = 0,
    first_identity: int = 1_000_000,
    num_identities: int = 300,
) -> tuple[Tensor, Tensor]:
    """Verification pairs over held-out toy identities, half matched and half not.

    Returns ``(images uint8 [2 * num_pairs, 3, size, size], issame bool [num_pairs])`` in the
    insightface ``.bin`` layout (pair p is images ``2p`` and ``2p + 1``), matched and
    mismatched pairs interleaved so each of 10 folds holds both.
    """
    if num_pairs < 2:
        raise ValueError(f"num_pairs must be >= 2, got {num_pairs}")
    ds = ToyFaces(num_identities, 1, size=size, seed=seed, first_identity=first_identity)
    g = torch.Generator().manual_seed(seed + 4242)
    images = torch.empty(2 * num_pairs, 3, size, size, dtype=torch.uint8)
    issame = torch.zeros(num_pairs, dtype=torch.bool)
    for p in range(num_pairs):
        a = first_identity + int(torch.randint(num_identities, (), generator=g))
        same = p % 2 == 0
        b = a
        while not same and b == a:
            b = first_identity + int(torch.randint(num_identities, (), generator=g))
        images[2 * p] = ds.image(a, 1000 + 2 * p)
        images[2 * p + 1] = ds.image(b, 1001 + 2 * p)
        issame[p] = same
    return images, issame
