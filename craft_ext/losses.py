"""Margin-based softmax losses for face recognition (ArcFace, CosFace and combinations).

:class:`CombinedMarginLoss` follows insightface's combined margin: for the target class the
cosine ``cos(theta)`` becomes ``cos(m1 * theta + m2) - m3``, every logit is then scaled by
``s`` and the result goes through softmax cross-entropy.

* ArcFace: ``(s, 1.0, 0.5, 0.0)``; CosFace: ``(s, 1.0, 0.0, 0.4)`` (the CRAFT paper's
  setting with ``s = 64``); SphereFace-like ``m1 > 1`` and mixtures also work.
* No "easy margin": where the angle ``m1 * theta + m2`` would pass pi (so the target logit
  would stop decreasing with theta), the usual ArcFace fallback
  ``cos(theta) - delta * sin(delta)`` is used, ``delta = pi - theta_t`` being the additive
  angle at the threshold ``theta_t = (pi - m2) / m1`` (``delta = m2`` for plain ArcFace).
* Numerics: the margin is always computed in float32 with autocast disabled, and cosines are
  clamped to ``[-1 + eps, 1 - eps]`` before ``acos`` so fp16/bf16 cosines that round to
  exactly +-1 give neither NaN values nor infinite gradients.
* Labels equal to ``-1`` (``ignore_index``) are ignored: no margin and no loss. Under
  partial FC these are samples whose class lives on another rank.

No method synchronises with the host (no ``.item()``, no boolean-mask indexing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CombinedMarginLoss", "IGNORE_INDEX"]

#: Label value meaning "no target class here".
IGNORE_INDEX = -1


class CombinedMarginLoss(nn.Module):
    """Combined-margin softmax cross-entropy on cosine logits.

    Args:
        s: scale applied to every logit.
        m1: multiplicative angular margin (1.0 for ArcFace/CosFace).
        m2: additive angular margin (ArcFace: 0.5).
        m3: additive cosine margin (CosFace: 0.4).
        interclass_filtering_threshold: if > 0, non-target cosines above it are zeroed before
            the margin (insightface's inter-class filtering of noisy/duplicate identities).
        eps: cosines are clamped to ``[-1 + eps, 1 - eps]`` before ``acos``.

    ``forward(cosines, labels)`` returns the mean cross-entropy over samples whose label is not
    ``-1`` (0 when there are none). :meth:`margin_logits` returns the scaled logits instead, for
    callers that compute the softmax themselves (e.g. a distributed softmax).
    """

    def __init__(
        self,
        s: float,
        m1: float,
        m2: float,
        m3: float,
        interclass_filtering_threshold: float = 0.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if s <= 0:
            raise ValueError(f"s must be positive, got {s}")
        if m1 <= 0:
            raise ValueError(f"m1 must be positive, got {m1}")
        self.s = float(s)
        self.m1 = float(m1)
        self.m2 = float(m2)
        self.m3 = float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.eps = float(eps)
        # threshold angle past which m1 * theta + m2 > pi, and the ArcFace-style fallback
        theta_t = (math.pi - self.m2) / self.m1
        delta = math.pi - theta_t
        self._theta_t = theta_t
        self._mm = delta * math.sin(delta)

    @property
    def has_angular_margin(self) -> bool:
        """Whether the target logit needs ``acos`` (``m1 != 1`` or ``m2 != 0``)."""
        return self.m1 != 1.0 or self.m2 != 0.0

    def target_logit(self, cos_theta: Tensor) -> Tensor:
        """Margin applied to target cosines (float32, unscaled): ``cos(m1*theta+m2) - m3``."""
        c = cos_theta.float().clamp(-1.0 + self.eps, 1.0 - self.eps)
        if not self.has_angular_margin:
            return c - self.m3
        theta = torch.acos(c)
        angle = self.m1 * theta + self.m2
        phi = torch.where(angle <= math.pi, torch.cos(angle), c - self._mm)
        return phi - self.m3

    def margin_logits(self, cosines: Tensor, labels: Tensor) -> Tensor:
        """Scaled float32 logits ``[N, C]`` with the margin on each row's target column.

        Args:
            cosines: ``[N, C]`` cosines between normalised embeddings and class centres.
            labels: ``[N]`` int class indices in ``[0, C)``, or ``-1`` for rows without a
                target column (left unchanged apart from scaling).
        """
        if cosines.dim() != 2 or labels.dim() != 1 or labels.shape[0] != cosines.shape[0]:
            raise ValueError(
                f"expected cosines [N, C] and labels [N], got {tuple(cosines.shape)} and "
                f"{tuple(labels.shape)}"
            )
        with torch.autocast(device_type=cosines.device.type, enabled=False):
            cos = cosines.float()
            labels = labels.long()
            valid = labels != IGNORE_INDEX
            safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
            if self.interclass_filtering_threshold > 0:
                with torch.no_grad():
                    dirty = cos > self.interclass_filtering_threshold
                    is_target = torch.zeros_like(dirty).scatter_(1, safe, valid.unsqueeze(1))
                    keep = (~dirty | is_target).to(cos.dtype)
                cos = cos * keep
            target = cos.gather(1, safe)
            phi = self.target_logit(target)
            new = torch.where(valid.unsqueeze(1), phi, target)
            logits = cos.scatter(1, safe, new)
            return logits * self.s

    def forward(self, cosines: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy of :meth:`margin_logits` over rows with ``labels != -1``."""
        logits = self.margin_logits(cosines, labels)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            labels = labels.long()
            total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
            count = (labels != IGNORE_INDEX).sum().clamp_min(1)
            return total / count

    def extra_repr(self) -> str:
        return (
            f"s={self.s}, m1={self.m1}, m2={self.m2}, m3={self.m3}, "
            f"interclass_filtering_threshold={self.interclass_filtering_threshold}"
        )
