"""Reactivation events kept on the device until read: the event logs of a
:class:`craft_ext.Reactivator`.

Every reactivation of a watched weight writes one event, ``(reactivated bool [N], donor int64
[N])``, into the next row of that weight's open log (a pair of [_LOG_ROWS, N] tensors, written
by the reactivation op itself, so a step creates no tensor). A full log becomes a pending record
as it is (no copy) and the weight's next event opens a new one. Reading the events copies the
pending records to the host once; a loop that never reads them keeps at most
:data:`_MAX_PENDING_BYTES` of them (the oldest are dropped, with a warning).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["EventLogs", "ReactivationEvent"]

#: rows of an event log: the events of one watched weight are written (on the device, by the
#: reactivation op itself) into rows of a [_LOG_ROWS, N] pair of tensors; a full log is kept as
#: it is and a new one started, so recording allocates once per _LOG_ROWS events
_LOG_ROWS = 256
#: unread records beyond this many bytes of device memory are dropped, oldest first (with a
#: warning): a loop that never reads events must not grow without bound (with ``interval=1``
#: each step records N bools + N int64 per watched weight)
_MAX_PENDING_BYTES = 64 << 20


class ReactivationEvent(NamedTuple):
    """One reactivation of one watched weight, on the host.

    ``filters`` are the reactivated filter (row) indices in increasing order and ``donors[j]``
    is the filter whose values ``filters[j]`` was built from (-1 where there is none, e.g. for
    ``method="random"``). ``step`` is the number of optimizer steps taken before it.
    """

    step: int
    name: str
    method: str
    filters: list[int]
    donors: list[int]


class _Pending(NamedTuple):
    """k events of one weight still on the device: ``reactivated`` bool and ``donor`` int64
    [k, N] ([N] for one event in states saved by older versions); ``seq`` (global order) and
    ``steps`` have k entries each."""

    seq: tuple[int, ...]
    steps: tuple[int, ...]
    name: str
    method: str
    reactivated: Tensor
    donor: Tensor


class _Log:
    """The open event log of one watched weight: rows [0, len(seq)) of ``reactivated`` bool
    [R, N] and ``donor`` int64 [R, N] hold events not yet read; ``seq`` / ``steps`` (host) their
    global order and optimizer step."""

    __slots__ = ("reactivated", "donor", "seq", "steps")

    def __init__(self, weight: Tensor) -> None:
        n = weight.shape[0]
        # rows are read only once written (up to len(seq))
        self.reactivated = torch.empty(_LOG_ROWS, n, dtype=torch.bool, device=weight.device)
        self.donor = torch.empty(_LOG_ROWS, n, dtype=torch.int64, device=weight.device)
        self.seq: list[int] = []
        self.steps: list[int] = []

    def pending(self, name: str, method: str, copy: bool = False) -> _Pending:
        k = len(self.seq)
        mask, donor = self.reactivated[:k], self.donor[:k]
        if copy:
            mask, donor = mask.clone(), donor.clone()
        return _Pending(tuple(self.seq), tuple(self.steps), name, method, mask, donor)


class EventLogs:
    """The unread reactivation events of the watched weights ``weights`` (named ``names``, a
    list the owner may rename in place), recorded with ``method``.

    The owner writes event rows itself (the hot path): ``log, slot = open(i)``, the op writes
    row ``slot``, then :meth:`close_slot` (or the same inline: ``seq += 1``,
    ``log.seq.append(seq)``, ``log.steps.append(step)``, :meth:`close` when full).
    """

    def __init__(self, weights: Sequence[Tensor], names: list[str], method: str) -> None:
        self.weights = list(weights)
        self.names = names
        self.method = method
        self.pending: list[_Pending] = []  #: full logs (and records loaded from a state)
        self.logs: list[_Log | None] = [None] * len(self.weights)  #: open logs, per weight
        self.seq = 0  #: events recorded so far (global order)
        self.host: list[ReactivationEvent] = []  #: read to the host, not drained yet
        #: records dropped unread to bound device memory
        self.dropped_records = 0

    def open(self, i: int) -> tuple[_Log, int]:
        """Weight ``i``'s open log (created when needed) and the row its next event goes to."""
        log = self.logs[i]
        if log is None:
            log = self.logs[i] = _Log(self.weights[i])
        return log, len(log.seq)

    def close_slot(self, i: int, log: _Log, step: int) -> None:
        """Account for the event just written to the next row of ``log`` (taken after
        ``step`` optimizer steps); a full log becomes a pending record (kept as it is: no
        copy) and the weight's next event opens a new one."""
        self.seq += 1
        log.seq.append(self.seq)
        log.steps.append(step)
        if len(log.seq) == _LOG_ROWS:
            self.close(i)

    def close(self, i: int) -> None:
        """Weight ``i``'s open log becomes a pending record."""
        self.pending.append(self.logs[i].pending(self.names[i], self.method))  # type: ignore[union-attr]
        self.logs[i] = None
        self._bound()

    def rename(self, i: int, name: str) -> None:
        """Weight ``i`` is called ``name`` from now on; its events so far keep the old name."""
        log = self.logs[i]
        if log is not None and log.seq:
            self.pending.append(log.pending(self.names[i], self.method, copy=True))
            self.logs[i] = None
            self._bound()
        self.names[i] = name

    def _bound(self) -> None:
        """Drop the oldest full logs past :data:`_MAX_PENDING_BYTES` (host-side sizes,
        no sync); their count is kept in :attr:`dropped_records`."""
        sizes = [
            p.reactivated.numel() * p.reactivated.element_size()
            + p.donor.numel() * p.donor.element_size()
            for p in self.pending
        ]
        total, first = sum(sizes), 0
        while total > _MAX_PENDING_BYTES and first < len(sizes) - 1:
            total -= sizes[first]
            self.dropped_records += len(self.pending[first].seq)
            first += 1
        if first:
            self.pending = self.pending[first:]
            warnings.warn(
                f"craft_ext.Reactivator: {self.dropped_records} reactivation records were "
                f"dropped unread (more than {_MAX_PENDING_BYTES >> 20} MiB pending); read "
                "`events` or call `drain_events()` now and then to keep them",
                stacklevel=4,
            )

    def all_pending(self, copy: bool = False) -> list[_Pending]:
        """Every record not yet read: full logs first, then the open ones (their filled rows;
        views of the logs unless ``copy``)."""
        return self.pending + [
            log.pending(name, self.method, copy)
            for name, log in zip(self.names, self.logs, strict=True)
            if log is not None and log.seq
        ]

    def flush(self) -> None:
        """Copy every pending record to the host (one copy per tensor) as events."""
        pending = self.all_pending()
        if not pending:
            return
        self.pending = []
        for log in self.logs:  # the copies below are made before any later step writes a row
            if log is not None:
                log.seq, log.steps = [], []
        masks = torch.cat([p.reactivated.reshape(-1).cpu() for p in pending])
        donors = torch.cat([p.donor.reshape(-1).to(torch.int64).cpu() for p in pending])
        found: list[tuple[int, ReactivationEvent]] = []
        start = 0
        for p in pending:
            k = len(p.seq)
            n = p.reactivated.numel() // k
            rows = masks[start : start + k * n].view(k, n)
            donor = donors[start : start + k * n].view(k, n)
            start += k * n
            for j in range(k):
                filters = torch.arange(n)[rows[j]]
                if filters.numel():
                    event = ReactivationEvent(
                        p.steps[j], p.name, p.method, filters.tolist(), donor[j][filters].tolist()
                    )
                    found.append((p.seq[j], event))
        found.sort(key=lambda item: item[0])
        self.host.extend(event for _, event in found)

    def state(self) -> dict[str, Any]:
        """The ``seq``, ``pending``, ``events`` and ``dropped_records`` entries of a
        Reactivator state dict (pending tensors cloned)."""
        return {
            "seq": self.seq,
            "pending": [tuple(p) for p in self.all_pending(copy=True)],
            "events": [tuple(e) for e in self.host],
            "dropped_records": self.dropped_records,
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state` (pending records moved to their weight's device)."""
        by_name = {n: w for n, w in zip(self.names, self.weights, strict=True)}
        self.pending = []
        for seq, steps, name, method, mask, donor in state["pending"]:
            dev = by_name[name].device if name in by_name else mask.device
            self.pending.append(
                _Pending(tuple(seq), tuple(steps), name, method, mask.to(dev), donor.to(dev))
            )
        self.logs = [None] * len(self.weights)
        self.seq = int(state["seq"])
        self.host = [
            ReactivationEvent(int(s), n, m, list(f), list(d)) for s, n, m, f, d in state["events"]
        ]
        self.dropped_records = int(state.get("dropped_records", 0))
