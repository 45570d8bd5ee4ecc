"""Saving and restoring a :class:`craft_ext.Reactivator`: its own ``state_dict`` and the hooks
that carry it in the attached optimizer's ``state_dict()`` under ``"craft_reactivator"``.

The state (per watched weight the donor mask ``used`` and the reactivation counter, one
generator state per device, the step / call counters and the pending events) is everything a
resumed run needs to reactivate bit-identically to an uninterrupted one.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import Tensor

    from ._events import EventLogs
    from .counter_rng import CounterGenerator

_STATE_KEY = "craft_reactivator"
_FORMAT_VERSION = 1


class ReactivatorState:
    """The persistence half of :class:`craft_ext.Reactivator` (a mixin: it reads the
    attributes the Reactivator's constructor sets)."""

    names: list[str]
    method: str
    threshold: float
    criterion: str
    rng: str
    steps: int
    calls: int
    weights: list[Tensor]
    _used: list[Tensor]
    _total: list[Tensor]
    _generators: dict[str, torch.Generator | CounterGenerator]
    _events: EventLogs
    _loaded: dict[str, Any] | None

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-identically: masks, generators, counters, events.

        Tensors stay on their devices (clones), generator states are CPU byte tensors.
        """
        return {
            "version": _FORMAT_VERSION,
            "names": list(self.names),
            "method": self.method,
            "threshold": self.threshold,
            "criterion": self.criterion,
            "rng": self.rng,
            "steps": self.steps,
            "calls": self.calls,
            "used": [u.clone() for u in self._used],
            "total": [t.clone() for t in self._total],
            "generators": {dev: g.get_state() for dev, g in self._generators.items()},
            **self._events.state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (masks are copied into the existing tensors)."""
        if not isinstance(state, Mapping) or state.get("version") != _FORMAT_VERSION:
            raise ValueError("state is not a Reactivator state_dict (missing or unknown version)")
        used, total = list(state["used"]), list(state["total"])
        if len(used) != len(self.weights) or len(total) != len(self.weights):
            raise ValueError(
                f"state holds {len(used)} watched weights, this Reactivator watches "
                f"{len(self.weights)}"
            )
        for i, (u, w) in enumerate(zip(used, self.weights, strict=True)):
            if tuple(u.shape) != (w.shape[0],):
                raise ValueError(
                    f"state: used mask {i} has shape {tuple(u.shape)}, weight {self.names[i]!r} "
                    f"has {w.shape[0]} filters"
                )
        if state.get("rng", "torch") != self.rng:
            raise ValueError(
                f"state was saved with rng={state.get('rng', 'torch')!r}, this Reactivator has "
                f"rng={self.rng!r}"
            )
        gens = dict(state["generators"])
        if [d.split(":")[0] for d in gens] != [d.split(":")[0] for d in self._generators]:
            raise ValueError(
                f"state has generators for devices {list(gens)}, expected "
                f"{list(self._generators)} (device indices may differ)"
            )
        for i, w in enumerate(self.weights):
            self._used[i].copy_(used[i].to(w.device, torch.bool))
            self._total[i].copy_(total[i].to(w.device, torch.int64))
        # matched by position: a checkpoint of cuda:0 resumes on cuda:1 (another DDP rank)
        for g, saved in zip(self._generators.values(), gens.values(), strict=True):
            g.set_state(saved.cpu())
        self.steps = int(state["steps"])
        self.calls = int(state["calls"])
        self._events.load_state(state)

    def _optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
    ) -> dict[str, Any]:
        state_dict[_STATE_KEY] = self.state_dict()
        return state_dict

    def _optimizer_load_pre(
        self, optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]
    ) -> dict[str, Any]:
        self._loaded = state_dict.pop(_STATE_KEY, None)
        if self._loaded is None and self.weights:
            warnings.warn(
                "optimizer state_dict has no 'craft_reactivator' entry; the reactivation state "
                "(donor masks, generator, counters) is left as it is",
                stacklevel=3,
            )
        return state_dict

    def _optimizer_load_post(self, optimizer: torch.optim.Optimizer) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            self.load_state_dict(loaded)
