"""``ReactivatingSGD``: torch's SGD with CRAFT filter reactivation built in.

A drop-in replacement for :class:`torch.optim.SGD` (same update rule, param groups, LR
schedulers, ``foreach`` / ``fused``) that also runs CRAFT (Bhatta et al., arXiv 2312.00072) on
the watched weights through a :class:`craft_ext.Reactivator` attached to itself: after every
``interval`` steps, or when :meth:`ReactivatingSGD.reactivate` is called (the paper: at every
epoch end), each watched weight ``W`` [N, ...] has its inactive filters
(``max |W[i]| <= threshold``) rebuilt, and their ``momentum_buffer`` rows zeroed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .ops import Reactivation
from .reactivator import ReactivationEvent, Reactivator

__all__ = ["ReactivatingSGD"]


class ReactivatingSGD(torch.optim.SGD):
    """SGD (``torch.optim.SGD``'s update, bit for bit) plus CRAFT reactivation.

    The first arguments are :class:`torch.optim.SGD`'s. The keyword-only ones:

    Args:
        reactivate: the weights to watch, in any form :class:`craft_ext.Reactivator` accepts
            (a module, a Parameter, a :class:`craft_ext.Channel`, a list / dict of them, or
            ``(name, target)`` pairs); each weight must be a parameter given in ``params``.
            Empty: plain SGD.
        threshold: filter i of ``W`` [N, ...] is inactive when ``max |W[i]| <= threshold``.
        method: ``"craft"`` (paper), ``"scaled_gaussian"`` or ``"random"``.
        criterion: ``"weight"`` (paper) or ``"folded"`` (the filter times its BatchNorm scale
            gamma / sqrt(running_var + eps): finds channels dead through BN).
        bn, prelu: the BatchNorm / PReLU after a single watched layer: BN-aware reactivation
            of the whole channel (see :class:`craft_ext.Reactivator`).
        interval: reactivate after every ``interval`` steps; None: only on :meth:`reactivate`.
        seed: reactivation generator seed (None: shared across DDP ranks, see Reactivator).
        rng: ``"torch"`` or ``"counter"`` (traceable by ``torch.compile``; see Reactivator).

    ``state_dict()`` / ``load_state_dict()`` also carry the donor ``used`` masks, generator
    states, step counters and pending events, so a resumed run is bit-identical. A step never
    synchronises with the host; :attr:`events` / :meth:`drain_events` copy events on reading.
    To capture steps in a CUDA graph, call ``opt.reactivator.register_cuda_graph(graph)``
    before capture.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        reactivate: object = (),
        threshold: float = 1e-3,
        method: str = "craft",
        criterion: str = "weight",
        bn: torch.nn.Module | None = None,
        prelu: torch.nn.Module | Tensor | None = None,
        interval: int | None = None,
        seed: int | None = None,
        rng: str = "torch",
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
        )
        self.reactivator = Reactivator(
            reactivate,
            threshold=threshold,
            method=method,
            criterion=criterion,
            bn=bn,
            prelu=prelu,
            seed=seed,
            rng=rng,
        ).attach(self, interval=interval)

    def reactivate(self) -> list[Reactivation]:
        """Reactivate the watched weights now (see :meth:`craft_ext.Reactivator.reactivate`)."""
        return self.reactivator.reactivate()

    @property
    def events(self) -> list[ReactivationEvent]:
        """Reactivation events not yet drained (copied to the host on reading)."""
        return self.reactivator.events

    def drain_events(self) -> list[ReactivationEvent]:
        """Return the reactivation events not yet drained and forget them."""
        return self.reactivator.drain_events()

    @property
    def total_reactivated(self) -> int:
        """Filters reactivated so far (reads device counters: a sync)."""
        return self.reactivator.total_reactivated
