"""CRAFT reactivation as a hook on any torch optimizer (Bhatta et al., arXiv 2312.00072).

:class:`Reactivator` watches conv / linear weights ``W`` [N, ...] (N filters; the paper watches
the first conv layer). Each reactivation calls :func:`craft_ext.reactivate_` on every watched
weight: filter i is inactive when ``max_k |W[i, k]| <= threshold`` (the paper's 1e-3) and is
overwritten in place (``craft``: ``W[i] <- -W[d(i)]`` for a strong, not yet spent donor d(i)).
Then every per-parameter optimizer state tensor shaped like ``W`` (SGD ``momentum_buffer``,
Adam/AdamW ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ...) gets the rows of the
reactivated filters set to zero, so a new filter does not inherit the momentum of the dead
filter it replaces::

    state[i, ...] <- 0   for every reactivated i,   state[j, ...] unchanged otherwise

Scalar state is left as it is. In particular Adam's ``step`` keeps counting, so the bias
corrections ``1 - beta^step`` of a reset row are those of the whole tensor, not of a fresh
start: once ``step`` is large (``beta^step`` ~ 0), the first update of a reactivated filter is
``lr * (1 - beta1) / sqrt(1 - beta2) * sign(grad)`` (about ``3.2 * lr`` with the default
betas) instead of the ``lr * sign(grad)`` of a fresh Adam; it settles as the moments refill.

State: per watched weight a donor mask ``used`` bool [N] (a donor is spent once for the life
of the mask), one ``torch.Generator`` per device, step / call counters and the pending events.
It is kept by the :class:`Reactivator` and saved under the key ``"craft_reactivator"`` of the
attached optimizer's ``state_dict()`` (not in ``optimizer.state``, whose per-parameter entries
torch optimizers such as Adam initialise lazily when they are empty).

Nothing in a reactivation reads a tensor back to the host (no ``.item()``, ``.cpu()``,
``nonzero()``, boolean-mask indexing or branching on tensor values): events are kept on the
device and copied to the host only when :attr:`Reactivator.events` is read.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import _events
from ._events import EventLogs, ReactivationEvent
from ._reactivator_state import ReactivatorState
from .channel import Channel, channels_of, check_criterion, watched_channels
from .counter_rng import CounterGenerator
from .ops import (
    _FLOAT_DTYPES,
    Reactivation,
    _check_in_place,
    _check_method,
    _check_reactivate_args,
    _check_threshold,
    _check_total,
    _cpu_record_op,
    _reactivate_and_record_checked,
    _reactivate_and_reset_checked,
)

__all__ = ["ReactivationEvent", "Reactivator"]


def _check_interval(interval: object) -> int | None:
    if interval is None:
        return None
    if isinstance(interval, bool) or not isinstance(interval, int):
        raise TypeError(f"interval must be a positive int or None, got {type(interval).__name__}")
    if interval <= 0:
        raise ValueError(f"interval must be a positive number of optimizer steps, got {interval}")
    return interval


def _check_targets(targets: list[tuple[str | None, Channel]], criterion: str) -> None:
    seen: dict[int, int] = {}
    names: dict[str, int] = {}
    for i, (name, ch) in enumerate(targets):
        w = ch.weight
        label = f"targets[{i}]" + (f" ({name or ch.name!r})" if name or ch.name else "")
        if id(w) in seen:
            raise ValueError(f"targets: {label} duplicates targets[{seen[id(w)]}] (same tensor)")
        seen[id(w)] = i
        if name is not None:
            if name in names:
                raise ValueError(f"targets: name {name!r} is used twice (targets[{names[name]}])")
            names[name] = i
        if w.dim() < 2 or w.numel() == 0:
            raise ValueError(
                f"targets: {label} has shape {tuple(w.shape)}; a watched weight needs at least "
                "2 dims [N filters, ...] and one element (conv or linear weights, not biases)"
            )
        if w.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"targets: {label} must be float32, float16, bfloat16 or float64, got {w.dtype}"
            )
        _check_in_place(w, f"targets: {label}")
        if criterion == "folded" and not ch.has_bn:
            raise ValueError(
                f"targets: {label} has no BatchNorm after it; criterion='folded' detects on the "
                "filter folded with its BN: pass bn=, a Channel, or use Reactivator.from_model"
            )


def _shared_default_seed() -> int:
    """A seed equal on every rank: this process's, broadcast from rank 0 when distributed.

    Derived from ``torch.initial_seed()`` (so ``torch.manual_seed`` makes it reproducible)
    without drawing from any generator. The broadcast (a host sync) happens once, here.
    """
    seed = (torch.initial_seed() * 0x9E3779B97F4A7C15 + 0x5DEECE66D) % (1 << 63)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        on = torch.device("cuda", torch.cuda.current_device()) if _nccl() else torch.device("cpu")
        buf = torch.tensor([seed], dtype=torch.int64, device=on)
        dist.broadcast(buf, src=0)
        seed = int(buf.item())
    return seed


def _nccl() -> bool:
    return torch.distributed.get_backend() == "nccl"


class Reactivator(ReactivatorState):
    """Reactivates inactive filters of watched weights, alone or hooked to an optimizer.

    Args:
        targets: what to watch: a conv/linear module (its ``.weight``), a Parameter, a
            :class:`craft_ext.Channel` (a weight with its BatchNorm / PReLU entries, e.g. from
            :func:`craft_ext.channels_of`), or a list / dict of them, or a list of
            ``(name, target)`` pairs. Each weight is [N, ...] with N filters (rows). Names
            default to the parameter names the attached optimizer knows
            (``named_parameters()`` passed to it), else the channel's name, else
            ``"target{i}"``.
        threshold: filter i is inactive when ``max |W[i]| <= threshold`` (paper: 1e-3).
        method: ``"craft"`` (the paper's), ``"scaled_gaussian"`` or ``"random"``; see
            :func:`craft_ext.reactivate_`.
        criterion: ``"weight"`` (the paper's rule, above) or ``"folded"``: inactive when
            ``max |W[i] * s_i| <= threshold``, s_i = gamma_i / sqrt(running_var_i + eps) of the
            BatchNorm after the layer (every target needs one).
        bn, prelu: the BatchNorm (and per-channel PReLU) after a single target: its whole
            channel is then reactivated (BN entries rewritten, see
            :data:`craft_ext.reference.CHANNEL_RULES`), their optimizer-state rows reset too.
            For models, :meth:`from_model` finds them.
        seed: seed of the reactivation generator (one per device of the watched weights).
            None: a seed derived from ``torch.initial_seed()``, broadcast from rank 0 when
            ``torch.distributed`` is initialised, so that every DDP rank (holding identical
            weights) makes identical reactivations.
        rng: ``"torch"`` (default): a ``torch.Generator`` per device (on CPU the step hook is
            one fused C++ call); ``"counter"``: a :class:`craft_ext.CounterGenerator` per device
            (state on the device), so that the hook traces into a ``torch.compile`` graph
            without a break and CUDA graphs capture it without registering generators; the
            reactivations are then a composition of tensor ops (slower eager, same rules).

    Use :meth:`attach` to run on an optimizer (``interval=N``: after every N steps; the state
    rows of reactivated filters are reset, see the module docs), :meth:`reactivate` to run now
    (the paper: at every epoch end). ``state_dict()`` of an attached optimizer carries this
    object's state (donor ``used`` masks, generator states, counters and pending events).
    """

    def __init__(
        self,
        targets: object,
        *,
        threshold: float = 1e-3,
        method: str = "craft",
        criterion: str = "weight",
        bn: nn.Module | None = None,
        prelu: nn.Module | Tensor | None = None,
        seed: int | None = None,
        rng: str = "torch",
    ) -> None:
        if rng not in ("torch", "counter"):
            raise ValueError(f"rng must be 'torch' or 'counter', got {rng!r}")
        self.rng = rng
        self.method = _check_method(method)
        self.threshold = _check_threshold(threshold)
        self.criterion = check_criterion(criterion)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        pairs = watched_channels(targets, bn=bn, prelu=prelu)
        _check_targets(pairs, self.criterion)
        self._given_names = [name or ch.name for name, ch in pairs]
        self.names: list[str] = [name or f"target{i}" for i, name in enumerate(self._given_names)]
        #: the watched channels (weight, and BN / PReLU entries where given)
        self.channels: list[Channel] = [ch for _, ch in pairs]
        self.weights: list[Tensor] = [ch.weight for ch in self.channels]
        self._has_cuda = any(w.is_cuda for w in self.weights)
        self._has_bn = any(ch.running_var is not None for ch in self.channels)
        folded = self.criterion == "folded"
        #: operator arguments of each channel (empty for a weight alone, the paper's case)
        self._channel_args = [
            ch.op_args(folded) if ch.has_bn or ch.bias is not None or ch.prelu is not None else ()
            for ch in self.channels
        ]
        self._used = [
            torch.zeros(w.shape[0], dtype=torch.bool, device=w.device) for w in self.weights
        ]
        self._total = [torch.zeros((), dtype=torch.int64, device=w.device) for w in self.weights]
        devices = sorted({str(w.device) for w in self.weights})
        if seed is None and devices:
            seed = _shared_default_seed()
        self.seed = seed
        self._generators: dict[str, torch.Generator | CounterGenerator] = {}
        for dev in devices:
            if rng == "counter":
                self._generators[dev] = CounterGenerator(int(seed), dev)  # type: ignore[arg-type]
                continue
            gen = torch.Generator(device=torch.device(dev))
            gen.manual_seed(int(seed))  # type: ignore[arg-type]
            self._generators[dev] = gen
        self._weight_gens = [self._generators[str(w.device)] for w in self.weights]
        self.steps = 0  #: optimizer steps seen (host counter: no sync)
        self.calls = 0  #: reactivations run
        self.interval: int | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        #: pending events, on the device until read (craft_ext._events)
        self._events = EventLogs(self.weights, self.names, self.method)
        self._handles: list[Any] = []
        self._loaded: dict[str, Any] | None = None

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        layers: str | Iterable[str] | None = None,
        *,
        criterion: str = "folded",
        **kwargs: Any,
    ) -> Reactivator:
        """A Reactivator of whole channels of ``model``: each layer in ``layers`` (module or
        parameter names; default: the first conv, the paper's layer) with the BatchNorm and
        per-channel PReLU that follow it, found by :func:`craft_ext.channels_of` (registration
        order and channel count; iresnet and MobileFaceNet stems and blocks). ``criterion``
        defaults to ``"folded"``; other keyword arguments are the constructor's.
        """
        channels = channels_of(model, layers)
        return cls([(ch.name, ch) for ch in channels], criterion=criterion, **kwargs)

    # -- attaching --------------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer, interval: int | None = None) -> Reactivator:
        """Hook into ``optimizer``; with ``interval=N`` reactivate after every N of its steps.

        Registers a step post-hook (counts steps, reactivates every ``interval``), and
        state-dict hooks so that ``optimizer.state_dict()`` / ``load_state_dict()`` carry
        this object's state under the key ``"craft_reactivator"``. Every watched weight must
        be a parameter of ``optimizer``. Returns ``self``.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer)}")
        interval = _check_interval(interval)
        if self.optimizer is not None:
            raise RuntimeError("this Reactivator is already attached to an optimizer")
        known: dict[int, str | None] = {}
        for group in optimizer.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for p, n in zip(group["params"], names, strict=False):
                known[id(p)] = n
        for i, w in enumerate(self.weights):
            if id(w) not in known:
                raise ValueError(
                    f"targets: {self.names[i]!r} (shape {tuple(w.shape)}) is not a parameter of "
                    "the optimizer; pass the tensors the optimizer updates"
                )
            new_name = str(known[id(w)]) if known[id(w)] else None
            if self._given_names[i] is None and new_name and new_name != self.names[i]:
                self._events.rename(i, new_name)  # events so far keep the name they had
        self.optimizer = optimizer
        self.interval = interval
        self._handles = [
            optimizer.register_step_post_hook(self._after_step),
            optimizer.register_state_dict_post_hook(self._optimizer_state_dict),
            optimizer.register_load_state_dict_pre_hook(self._optimizer_load_pre),
            optimizer.register_load_state_dict_post_hook(self._optimizer_load_post),
        ]
        return self

    def detach(self) -> None:
        """Remove the hooks registered by :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.optimizer = None
        self.interval = None

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.steps += 1
        interval = self.interval
        if interval is None:
            return
        if interval > 1 and self._has_cuda and torch.cuda.is_current_stream_capturing():
            # the step counter and the interval test run on the host, once, at capture: a
            # captured step would then reactivate at every replay, or at none
            raise RuntimeError(
                f"craft_ext.Reactivator: a step with interval={interval} cannot be captured in "
                "a CUDA graph (the interval is counted on the host, which replays skip); "
                "attach with interval=1 (every replay reactivates) or None and call "
                "reactivate() outside the graph, e.g. at epoch ends"
            )
        if self.steps % interval == 0:
            self._reactivate_recorded()

    # -- reactivation -----------------------------------------------------------------------

    def reactivate(self) -> list[Reactivation]:
        """Reactivate the inactive filters of every watched weight now (in place).

        For each weight: :func:`craft_ext.reactivate_` with this object's ``used`` mask and
        generator, then the rows of reactivated filters are zeroed in the attached optimizer's
        state tensors shaped like the weight, and an event is recorded on the device.
        Returns one :class:`craft_ext.Reactivation` per watched weight (on the device).
        """
        out = []
        grad = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            if self._has_bn:
                self._sync_running_stats()
            for i, w in enumerate(self.weights):
                res = self._reset(i)
                if not self._capturing(w):
                    log, slot = self._events.open(i)
                    log.reactivated[slot] = res.reactivated
                    log.donor[slot] = res.donor
                    self._events.close_slot(i, log, self.steps)
                out.append(res)
        finally:
            torch._C._set_grad_enabled(grad)
        self.calls += 1
        return out

    def _reactivate_recorded(self) -> None:
        """:meth:`reactivate` as the step hook runs it: the op writes each event straight into
        the weight's open log and returns nothing (on CPU: one C++ call per weight)."""
        # The hot path with interval=1, written flat (no helper frames: with cold caches each
        # Python frame here costs about a us per step). The weights were validated at
        # construction, so this goes straight to the backend (the kernels check that used /
        # total / the logs still match a weight that may have been moved since).
        fast = _cpu_record_op() if self.rng == "torch" else None  # the C++ op draws itself
        events = self._events
        state = self.optimizer.state if self.optimizer is not None else {}
        grad = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # torch.no_grad() without its Python overhead
        try:
            if self._has_bn:
                self._sync_running_stats()
            for i, w in enumerate(self.weights):
                if w.is_cuda and torch.cuda.is_current_stream_capturing():
                    self._reset(i)  # no event inside capture (replays would overwrite it)
                    continue
                log = events.logs[i]
                if log is None:
                    log, _ = events.open(i)
                bufs = []  # as _state_tensors
                for p in self.channels[i].params():
                    st = state.get(p)
                    if st:
                        for v in st.values():
                            if isinstance(v, Tensor):
                                bufs.append(v)
                args = (
                    w,
                    self._used[i],
                    self._total[i],
                    bufs,
                    log.reactivated,
                    log.donor,
                    len(log.seq),
                    self._weight_gens[i],
                )
                extra = self._channel_args[i]
                if fast is not None and w.is_cpu:
                    fast(*args, self.threshold, self.method, *extra)
                else:
                    _reactivate_and_record_checked(*args, self.method, self.threshold, None, extra)
                # as EventLogs.close_slot
                events.seq += 1
                log.seq.append(events.seq)
                log.steps.append(self.steps)
                if len(log.seq) == _events._LOG_ROWS:
                    events.close(i)
        finally:
            torch._C._set_grad_enabled(grad)
        self.calls += 1

    def _sync_running_stats(self) -> None:
        """Make every rank's BatchNorm running statistics rank 0's before a reactivation.

        Under DDP each rank updates its BN running statistics from its own batches (DDP
        broadcasts rank 0's buffers only at the start of the next forward), while folded
        detection and the channel rewrite read them: without this, ranks could pick different
        channels and their parameters would drift apart. A broadcast per buffer, a collective
        that every rank reaches because every rank reactivates at the same step; nothing is
        read back to the host. Not distributed: nothing to do."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return
        for ch in self.channels:
            for t in (ch.running_mean, ch.running_var):
                if t is not None:
                    dist.broadcast(t, src=0)

    def _reset(self, i: int) -> Reactivation:
        """Reactivate watched weight ``i`` and reset its state rows, without recording."""
        w = self.weights[i]
        return _reactivate_and_reset_checked(
            w,
            self._used[i],
            self._total[i],
            self._state_tensors(i),
            self._weight_gens[i],
            self.method,
            self.threshold,
            None,
            self._channel_args[i],
        )

    def _state_tensors(self, i: int) -> list[Tensor]:
        """The attached optimizer's state tensors of channel ``i``'s trainable tensors (weight,
        bias, gamma, beta, slope; any shape: the ops reset those shaped like the weight or
        [N] and skip the rest)."""
        bufs: list[Tensor] = []
        if self.optimizer is not None:
            for p in self.channels[i].params():
                state = self.optimizer.state.get(p)
                if state:
                    for v in state.values():  # a loop: no comprehension frame on the hot path
                        if isinstance(v, Tensor):
                            bufs.append(v)
        return bufs

    @staticmethod
    def _capturing(weight: Tensor) -> bool:
        return weight.is_cuda and torch.cuda.is_current_stream_capturing()

    @property
    def generators(self) -> list[torch.Generator | CounterGenerator]:
        """The reactivation generators, one per device of the watched weights."""
        return list(self._generators.values())

    def register_cuda_graph(self, graph: torch.cuda.CUDAGraph) -> None:
        """Let ``graph`` capture reactivations: registers the CUDA generators with it.

        Call before capture (``graph.register_generator_state`` for each CUDA generator);
        without it, capturing the random draws of a reactivation fails. Each replay then
        draws fresh numbers, as an uncaptured step would. Only ``interval=1`` (every replay
        reactivates) or ``interval=None`` can be captured: the interval is counted on the host,
        so a captured step with ``interval > 1`` raises at capture time.
        """
        for gen in self._generators.values():  # a CounterGenerator needs no registration
            if isinstance(gen, torch.Generator) and gen.device.type == "cuda":
                graph.register_generator_state(gen)

    # -- events -----------------------------------------------------------------------------

    @property
    def events(self) -> list[ReactivationEvent]:
        """Events not yet drained, oldest first (reading copies pending records to the host).

        Reactivations that reactivated no filter are not listed. Reactivations run inside
        CUDA-graph capture (and so their replays) record no event: a replay would overwrite
        the captured outputs; :attr:`total_reactivated` still counts them.
        """
        self._events.flush()
        return list(self._events.host)

    def drain_events(self) -> list[ReactivationEvent]:
        """Return the events not yet drained and forget them."""
        self._events.flush()
        out, self._events.host = self._events.host, []
        return out

    @property
    def dropped_records(self) -> int:
        """Records dropped unread to bound device memory (see :meth:`drain_events`)."""
        return self._events.dropped_records

    @property
    def total_reactivated(self) -> int:
        """Filters reactivated so far, over all watched weights (reads the device counters)."""
        return sum(int(t) for t in self._total)


def reactivate_and_reset(
    weight: Tensor,
    used: Tensor,
    total: Tensor,
    state: list[object],
    *,
    method: str,
    threshold: float,
    generator: torch.Generator | None,
    backend: str | None = None,
) -> Reactivation:
    """One reactivation of ``weight`` [N, ...]: the body :class:`Reactivator` runs per weight.

    ``craft_ext.reactivate_(weight, used=used, generator=generator, ...)`` (in place; ``used``
    bool [N] updated), then rows i with ``reactivated[i]`` are zeroed in every tensor of
    ``state`` shaped like ``weight`` (the optimizer's per-parameter state values; others are
    skipped), and ``total`` (int64 []) += the number reactivated (see
    :func:`craft_ext.reference.reactivate_and_reset_`; on CPU one C++ call). Device-side only:
    it traces under ``torch.compile(fullgraph=True)`` with ``generator=None`` and
    ``backend="auto"`` (Dynamo cannot trace an explicit ``torch.Generator`` argument).
    """
    threshold = _check_reactivate_args(weight, method, threshold, used, generator)
    _check_total(total, weight)
    bufs = [v for v in state if isinstance(v, Tensor)]
    with torch.no_grad():
        return _reactivate_and_reset_checked(
            weight, used, total, bufs, generator, method, threshold, backend
        )
