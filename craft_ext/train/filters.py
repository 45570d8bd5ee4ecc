"""The watched layers of a ``craft-train`` run: their filter statistics, dead counts by both
criteria, reactivation events, and the demo's planted inactive filters.

:class:`FilterWatch` is a mixin of :class:`craft_ext.train.Trainer`; it reads the trainer's
``cfg``, ``backbone``, ``layers``, ``channels``, ``reactivator``, ``logger``, ``epoch`` and
``step``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import craft_ext

__all__ = ["FilterWatch"]


class FilterWatch:
    """Filter statistics, dead counts and reactivation events of the watched layers."""

    cfg: Any
    backbone: torch.nn.Module
    layers: list[str]
    channels: dict[str, Any]
    reactivator: Any
    logger: Any
    epoch: int
    step: int
    reactivated_total: int

    def _first_conv_name(self) -> str:
        """The parameter name of the first conv's weight (conv1.weight for an iresnet)."""
        from craft_ext.models import first_conv

        conv = first_conv(self.backbone)
        return next(f"{n}.weight" for n, m in self.backbone.named_modules() if m is conv)

    def _first_conv_weight(self, plant: int) -> Tensor:
        """The first conv's weight; raises if it has fewer than ``plant`` filters."""
        from craft_ext.models import first_conv

        w = first_conv(self.backbone).weight
        if plant > w.shape[0]:
            raise ValueError(
                f"--plant-inactive {plant} exceeds the {w.shape[0]} first-layer filters"
            )
        return w

    def _plant_inactive(self, count: int) -> None:
        """Kill ``count`` first-layer channels (demo / stress test), chosen by the seed:
        ``plant_through="weight"`` scales their filters by 1e-4 (dead by the paper's rule);
        ``"bn"`` sets their BatchNorm gamma to 1e-4 and scales their filters to max |w| = 5e-3
        (dead only through BN, as in released models: the weight rule misses them)."""
        w = self._first_conv_weight(count)
        g = torch.Generator().manual_seed(self.cfg.seed + 99)
        rows = torch.randperm(w.shape[0], generator=g)[:count].to(w.device)
        with torch.no_grad():
            if self.cfg.plant_through == "bn":
                ch = self.channels[self.layers[0]]
                peak = w[rows].abs().flatten(1).amax(1).clamp_min(1e-30)
                w[rows] *= (5e-3 / peak).view(-1, *[1] * (w.dim() - 1)).to(w.dtype)
                ch.bn_weight[rows] = 1e-4
            else:
                w[rows] *= 1e-4

    def _layer_stats(self, name: str) -> dict[str, Tensor]:
        """Filter statistics of layer ``name`` on the host: ``max_abs``, ``l1``, ``mean``,
        ``std`` of the raw filters, and with a BatchNorm after the layer ``folded_max_abs`` /
        ``folded_l1`` (times |gamma / sqrt(running_var + eps)|, the BN-folded filters, as
        ``craft_ext.filter_stats(w, bn=bn)``) and ``bn_weight``."""
        ch = self.channels[name]
        with torch.no_grad():
            stats = craft_ext.filter_stats(ch.weight.detach())
            out = dict(stats._asdict())
            scale = ch.folded_scale()
            if scale is not None:
                a = scale.abs()
                out["folded_max_abs"] = stats.max_abs * a
                out["folded_l1"] = stats.l1 * a
                out["bn_weight"] = ch.bn_weight.detach().float()
        return {k: v.cpu() for k, v in out.items()}  # one read-back per tensor: logging only

    def _dead(self, stats: dict[str, Tensor]) -> dict[str, int]:
        """Dead filters by each criterion (folded only with a BatchNorm)."""
        thr = self.cfg.threshold
        out = {"weight": int((stats["max_abs"] <= thr).sum())}
        if "folded_max_abs" in stats:
            out["folded"] = int((stats["folded_max_abs"] <= thr).sum())
        return out

    def dead_counts(self) -> dict[str, dict[str, int]]:
        """Per logged layer, dead filters by the weight and the folded criterion (host
        read-back: logging only)."""
        return {name: self._dead(self._layer_stats(name)) for name in self.layers}

    def inactive_counts(self) -> dict[str, int]:
        """Inactive filters per logged layer by the run's ``--criterion``."""
        key = self.cfg.criterion
        return {n: d.get(key, d["weight"]) for n, d in self.dead_counts().items()}

    def _record_filter_stats(self, when: str) -> dict[str, dict[str, int]]:
        """Log every logged layer's filter statistics; returns their dead counts (as
        :meth:`dead_counts`, from the same statistics)."""
        counts = {}
        for name in self.layers:
            stats = self._layer_stats(name)
            counts[name] = self._dead(stats)
            self.logger.log_filter_stats(
                {
                    "epoch": self.epoch,
                    "step": self.step,
                    "layer": name,
                    "when": when,
                    "threshold": self.cfg.threshold,
                    **{k: v.tolist() for k, v in stats.items()},
                }
            )
        return counts

    def _count(self, dead: dict[str, dict[str, int]], criterion: str | None = None) -> int:
        key = criterion or self.cfg.criterion
        return sum(d.get(key, d["weight"]) for d in dead.values())

    def _drain_events(self) -> int:
        """Log the reactivation events since the last call; returns how many filters."""
        count = 0
        for ev in self.reactivator.drain_events():
            filters = list(ev.filters)
            count += len(filters)
            self.logger.log_reactivation(
                {
                    "step": ev.step,
                    "epoch": self.epoch,
                    "param": ev.name,
                    "method": ev.method,
                    "filters": filters,
                    "donors": list(ev.donors),
                }
            )
        self.reactivated_total += count
        return count
