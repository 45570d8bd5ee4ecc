"""Building the parts of a ``craft-train`` run: the device, the backbone and its partial-FC
margin head, the layers whose filters are logged and watched, what the reactivation watches,
the optimizers with CRAFT attached, and the LR schedule's shape.

:class:`Construction` is a mixin of :class:`craft_ext.train.Trainer`; it reads the trainer's
``cfg``, ``device`` and ``num_classes``, and sets ``backbone``, ``head``, ``layers``,
``channels``, ``watched``, ``optimizer``, ``reactivator`` and ``head_optimizer``.
"""

from __future__ import annotations

from typing import Any

import torch

import craft_ext
from craft_ext.channel import channels_of

__all__ = ["Construction"]


def _poly_lambda(total: int, warmup: int, power: float):
    def fn(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        return max(0.0, 1.0 - (step - warmup) / span) ** power

    return fn


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


class Construction:
    """Building the model, head and optimizers of a :class:`craft_ext.train.Trainer`."""

    cfg: Any
    device: torch.device
    num_classes: int
    backbone: torch.nn.Module
    head: Any
    layers: list[str]
    channels: dict[str, Any]
    watched: list[str]

    def _build_model(self) -> None:
        from craft_ext.heads import PartialFC
        from craft_ext.losses import CombinedMarginLoss
        from craft_ext.models import get_model

        cfg = self.cfg
        residual_scale: Any = cfg.residual_scale
        if residual_scale not in (None, "trainable"):
            try:
                residual_scale = float(residual_scale)
            except ValueError:
                raise ValueError(
                    f"--residual-scale must be a number or 'trainable', got {residual_scale!r}"
                ) from None
        self.backbone = get_model(
            cfg.network,
            width=cfg.width,
            widths=cfg.widths,
            num_features=cfg.embedding_size,
            dropout=cfg.dropout,
            input_size=cfg.image_size,
            activation=cfg.activation,
            residual_scale=residual_scale,
        ).to(self.device)
        if cfg.channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.head = PartialFC(
            cfg.embedding_size,
            self.num_classes,
            sample_rate=cfg.sample_rate,
            margin_loss=CombinedMarginLoss(cfg.scale, *cfg.margin),
        ).to(self.device)
        params = dict(self.backbone.named_parameters())
        #: the layers whose filters are logged (and watched, unless --reactivation none)
        self.layers = list(cfg.reactivate_layers) or [self._first_conv_name()]
        unknown = [n for n in self.layers if n not in params]
        if unknown:
            raise ValueError(
                f"--reactivate-layers: {unknown} are not parameters of {cfg.network}; e.g. "
                f"{list(params)[:4]}"
            )
        #: each layer's channel (its BatchNorm / PReLU, found by craft_ext.channels_of)
        self.channels = {
            ch.name: ch for ch in channels_of(self.backbone, self.layers, trainable=False)
        }
        self.watched = list(self.layers) if cfg.reactivation != "none" else []

    def _targets(self) -> list[Any]:
        """What the reactivation watches: ``(name, weight)`` pairs, or with ``--criterion
        folded`` ``(name, Channel)`` pairs (detected on the BN-folded filter, reactivated as a
        whole channel)."""
        if self.cfg.criterion != "folded":
            params = dict(self.backbone.named_parameters())
            return [(n, params[n]) for n in self.watched]
        no_bn = [n for n in self.layers if not self.channels[n].has_bn]
        if no_bn:
            raise ValueError(
                f"--criterion folded: {no_bn} {'is' if len(no_bn) == 1 else 'are'} followed "
                "by no BatchNorm with running statistics; use --criterion weight"
            )
        return [(ch.name, ch) for ch in channels_of(self.backbone, self.watched)]

    def _build_optimizers(self) -> None:
        """The backbone's optimizer with CRAFT (``self.reactivator``) and the head's."""
        cfg = self.cfg
        craft: dict[str, Any] = {
            "method": cfg.reactivation if cfg.reactivation != "none" else "craft",
            "criterion": cfg.criterion,
            "threshold": cfg.threshold,
            "seed": cfg.seed,
        }
        if cfg.optimizer == "adamw":
            hyper: dict[str, Any] = {
                "lr": cfg.lr,
                "betas": (cfg.momentum, 0.999),
                "weight_decay": cfg.weight_decay,
            }
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                self.backbone.parameters(), **hyper
            )
            self.reactivator = craft_ext.Reactivator(self._targets(), **craft).attach(
                self.optimizer, interval=cfg.reactivate_every
            )
            self.head_optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                self.head.parameters(), **hyper
            )
            return
        hyper = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
        sgd = craft_ext.ReactivatingSGD(
            self.backbone.parameters(),
            reactivate=self._targets(),
            interval=cfg.reactivate_every,
            **hyper,
            **craft,
        )
        self.optimizer, self.reactivator = sgd, sgd.reactivator
        self.head_optimizer = torch.optim.SGD(self.head.parameters(), **hyper)
