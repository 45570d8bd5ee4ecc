"""craft_ext operators: the Python API, backend dispatch and fake (meta) kernels.

Every operator has one schema and several backends:

========== ======================================= =============================================
backend    where                                   operator
========== ======================================= =============================================
``cpp``    ``csrc/cpu/<op>.cpp`` (CPU tensors)     ``torch.ops.craft_ext.<op>``
``cuda``   ``csrc/cuda/<op>.cu`` (CUDA tensors)    ``torch.ops.craft_ext.<op>``
``triton`` ``kernels/<op>.py`` (CUDA; CPU only     ``torch.ops.craft_ext.<op>_triton``
           with ``TRITON_INTERPRET=1``)
``reference`` ``craft_ext/reference.py`` (any)     plain PyTorch
========== ======================================= =============================================

``"auto"`` (the default) picks ``cpp`` for CPU tensors and ``cuda`` then ``triton`` for CUDA
tensors, falling back to ``reference`` when the compiled extension or Triton is missing. Force
a backend per call (``backend="triton"``), for a block
(``with craft_ext.use_backend("reference"):``) or for a process (environment variable
``CRAFT_EXT_BACKEND=triton``, read once, when craft_ext is imported).

No op here synchronises with the host: no ``.item()``, ``.cpu()``, ``nonzero()``, boolean-mask
indexing or branching on tensor values, so they run under
``torch.cuda.set_sync_debug_mode("error")``, inside CUDA-graph capture and under
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import reference
from ._extension import KERNELS, TRITON_ERROR, extension_loaded, has_kernel
from .counter_rng import CounterGenerator

__all__ = [
    "BACKENDS",
    "METHODS",
    "FeatureMapStats",
    "FilterStats",
    "Reactivation",
    "available_backends",
    "feature_map_stats",
    "filter_stats",
    "reactivate_",
    "resolve_backend",
    "use_backend",
]

BACKENDS = ("auto", "cpp", "cuda", "triton", "reference")
METHODS = ("craft", "scaled_gaussian", "random")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class FilterStats(NamedTuple):
    """Per-filter statistics, each float32 [N] on the weight's device."""

    max_abs: Tensor
    l1: Tensor
    mean: Tensor
    std: Tensor


class Reactivation(NamedTuple):
    """What :func:`reactivate_` did: all on the weight's device, nothing copied to the host."""

    inactive: Tensor  #: bool [N], inactive before the call
    reactivated: Tensor  #: bool [N], overwritten by the call
    donor: Tensor  #: int64 [N], source filter (-1 where none)
    count: Tensor  #: int64 [], number reactivated


# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------

#: backends forced by the :func:`use_backend` blocks that are open, innermost last. A plain
#: module-level list (not a ContextVar, which Dynamo cannot trace): ``torch.compile`` reads it
#: and guards on it, so a default-backend op traces with ``fullgraph=True``. Blocks opened in
#: several threads at once share it (the innermost open block wins).
_BACKEND_STACK: list[str] = []
#: ``$CRAFT_EXT_BACKEND`` as it was at import: the process-wide default (read once, so that the
#: per-step calls of a Reactivator do not look the environment up every step)
_ENV_BACKEND: str | None = os.environ.get("CRAFT_EXT_BACKEND") or None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force ``name`` (one of :data:`BACKENDS`) for craft_ext ops called inside the block."""
    _check_backend_name(name, "name")
    _BACKEND_STACK.append(name)
    try:
        yield
    finally:
        _BACKEND_STACK.pop()


def _check_backend_name(name: object, arg: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"{arg} must be one of {BACKENDS}, got {name!r}")


def _triton_usable(device: torch.device, interpret: bool) -> bool:
    if KERNELS is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpret


def _triton_name(op: str) -> str:
    """Name of ``op``'s Triton operator: ``filter_stats_triton``, ``reactivate_triton_``."""
    return op[:-1] + "_triton_" if op.endswith("_") else op + "_triton"


def _impl(op: str, backend: str) -> Callable[..., tuple[Tensor, ...]]:
    """What runs ``op`` on ``backend``: the compiled operator (``cpp`` / ``cuda`` share one
    schema), the Triton operator, or the function of the same name in :mod:`.reference`."""
    if backend in ("cpp", "cuda"):
        return getattr(torch.ops.craft_ext, op).default
    if backend == "triton":
        return getattr(torch.ops.craft_ext, _triton_name(op)).default
    return getattr(reference, op)


def available_backends(device: torch.device | str, op: str = "filter_stats") -> list[str]:
    """Backends that can run ``op`` on ``device`` in this process (never includes ``auto``)."""
    device = torch.device(device)
    return list(_available(device.type, op, os.environ.get("TRITON_INTERPRET", "") == "1"))


@functools.cache
def _available(device_type: str, op: str, interpret: bool) -> tuple[str, ...]:
    """:func:`available_backends`, cached: kernels are registered once, at import (the answer
    depends only on the device type, the op and ``$TRITON_INTERPRET``)."""
    device = torch.device(device_type)
    out = []
    if device.type == "cpu" and has_kernel(op, "CPU"):
        out.append("cpp")
    if device.type == "cuda" and has_kernel(op, "CUDA"):
        out.append("cuda")
    if _triton_usable(device, interpret) and hasattr(torch.ops.craft_ext, _triton_name(op)):
        out.append("triton")
    out.append("reference")
    return tuple(out)


def resolve_backend(device: torch.device, op: str, backend: str | None = None) -> str:
    """The backend that runs ``op`` for a tensor on ``device``.

    ``backend`` (else :func:`use_backend`'s, else ``$CRAFT_EXT_BACKEND`` as it was when
    craft_ext was imported, else ``"auto"``).
    An explicitly requested backend that cannot run here raises ``RuntimeError``.
    """
    requested = _requested_backend(backend)
    if requested not in BACKENDS:
        _check_backend_name(requested, "backend")
    # under torch.compile the answer is a trace-time constant: skip the cache wrapper (Dynamo
    # would trace through it anyway, with a warning)
    available = _available.__wrapped__ if torch.compiler.is_compiling() else _available
    usable = available(device.type, op, os.environ.get("TRITON_INTERPRET", "") == "1")
    if requested == "auto":
        # interpreted Triton on CPU (TRITON_INTERPRET=1) is for testing, never chosen by auto
        return next(b for b in usable if not (b == "triton" and device.type == "cpu"))
    if requested not in usable:
        compiled = extension_loaded() and torch._C._dispatch_has_kernel(f"craft_ext::{op}")
        if requested in ("cpp", "cuda") and extension_loaded() and not compiled:
            raise RuntimeError(
                f"craft_ext: {op} has no compiled (C++ / CUDA) kernel; backends for it: "
                f"{list(usable)}"
            )
        why = {
            "cpp": "needs a CPU tensor and the compiled extension "
            f"(extension_loaded()={extension_loaded()})",
            "cuda": "needs a CUDA tensor and an extension compiled with CUDA",
            "triton": "needs triton and a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors)"
            + (f"; {TRITON_ERROR}" if TRITON_ERROR else ""),
        }[requested]
        raise RuntimeError(
            f"craft_ext: backend {requested!r} cannot run {op} on {device.type} here: {why}. "
            f"Available: {list(usable)}"
        )
    return requested


# --------------------------------------------------------------------------------------------
# Validation (runs before anything is modified)
# --------------------------------------------------------------------------------------------


def _check_weight(weight: object, arg: str = "weight") -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() < 2:
        raise ValueError(
            f"{arg} must have at least 2 dims [N, ...] (N filters), got shape {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0 or weight.numel() == 0:
        raise ValueError(
            f"{arg} must hold at least one filter with at least one element, got shape "
            f"{tuple(weight.shape)}"
        )
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{arg} must be float32, float16, bfloat16 or float64, got {weight.dtype}")


def _check_threshold(threshold: object) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"threshold must be a float, got {type(threshold).__name__}")
    threshold = float(threshold)
    if math.isnan(threshold) or threshold < 0:
        raise ValueError(f"threshold must be >= 0 (the paper uses 1e-3), got {threshold}")
    return threshold


def _check_used(used: object, weight: Tensor) -> None:
    if not isinstance(used, Tensor):
        raise TypeError(f"used must be a torch.Tensor or None, got {type(used).__name__}")
    n = weight.shape[0]
    if used.dtype != torch.bool or tuple(used.shape) != (n,) or used.device != weight.device:
        raise ValueError(
            f"used must be a bool tensor of shape ({n},) on {weight.device}, got "
            f"{used.dtype} of shape {tuple(used.shape)} on {used.device}"
        )


def _check_total(total: object, weight: Tensor) -> None:
    if not isinstance(total, Tensor):
        raise TypeError(f"total must be a torch.Tensor, got {type(total).__name__}")
    if total.dtype != torch.int64 or total.numel() != 1 or total.device != weight.device:
        raise ValueError(
            f"total must be an int64 tensor with one element on {weight.device}, got "
            f"{total.dtype} of shape {tuple(total.shape)} on {total.device}"
        )


def _check_generator(generator: object, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, (torch.Generator, CounterGenerator)):
        raise TypeError(
            "generator must be a torch.Generator, a craft_ext.CounterGenerator or None, "
            f"got {type(generator)}"
        )
    if isinstance(generator, CounterGenerator) and generator.state.device != device:
        raise ValueError(
            f"generator: a CounterGenerator on {generator.state.device} cannot draw for a "
            f"weight on {device} (its state must be on the weight's device)"
        )
    if generator.device.type != device.type:
        raise ValueError(
            f"generator must be on the weight's device type ({device.type}), "
            f"got a generator on {generator.device}"
        )


# --------------------------------------------------------------------------------------------
# filter_stats
# --------------------------------------------------------------------------------------------


def filter_stats(
    weight: Tensor, *, bn: nn.Module | None = None, backend: str | None = None
) -> FilterStats:
    """Per-filter max |w|, L1 norm, mean and std (correction 0) in one pass over ``weight``.

    Args:
        weight: [N, ...] floating tensor: a conv weight [N, C, kh, kw] or a linear weight
            [N, K]; any memory layout (channels_last, non-contiguous); float32, float16,
            bfloat16 or float64.
        bn: the BatchNorm that follows the layer (N channels, running statistics): then the
            statistics are those of the *folded* filters ``w_i * s_i``,
            ``s_i = gamma_i / sqrt(running_var_i + eps)``, the filters as the network applies
            them in eval mode (``max_abs`` finds channels dead through BN). Still one pass over
            the weight: the fold is a per-filter product in the kernel's epilogue.
        backend: force a backend (see module docs); default ``"auto"``.

    Returns:
        :class:`FilterStats` of four float32 [N] tensors on ``weight``'s device. A filter
        holding NaN gets NaN statistics; one holding Inf gets Inf ``max_abs`` and ``l1``.

    Used by CRAFT (Bhatta et al., arXiv 2312.00072) to find inactive filters
    (``max_abs <= 1e-3``) and rank donors (``l1``).
    """
    _check_weight(weight)
    impl = _impl("filter_stats", resolve_backend(weight.device, "filter_stats", backend))
    with torch.no_grad():
        if bn is None:
            return FilterStats(*impl(weight))
        return FilterStats(*impl(weight, *_bn_fold(weight, bn)))


def _bn_fold(weight: Tensor, bn: object) -> tuple[Tensor | None, Tensor, float]:
    """``(bn_weight, running_var, eps)`` of the BatchNorm ``bn`` after ``weight``, checked
    (the few checks a read needs: :func:`craft_ext.channel_of` validates a whole channel)."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(
            "bn: expected a BatchNorm module (BatchNorm1d/2d/3d, SyncBatchNorm), got "
            f"{type(bn).__name__}"
        )
    n = weight.shape[0]
    var = bn.running_var
    if bn.num_features != n:
        raise ValueError(
            f"bn: {type(bn).__name__}({bn.num_features}) has {bn.num_features} channels, the "
            f"layer has {n} filters"
        )
    if var is None:
        raise ValueError(
            f"bn: {type(bn).__name__}({n}) keeps no running statistics "
            "(track_running_stats=False): there is no folded filter"
        )
    if var.device != weight.device:
        raise ValueError(f"bn is on {var.device}, the layer's weight on {weight.device}")
    return bn.weight, var, float(bn.eps)


# --------------------------------------------------------------------------------------------
# reactivate_
# --------------------------------------------------------------------------------------------


def _requested_backend(backend: str | None) -> str:
    """The backend asked for: the argument, else :func:`use_backend`'s, else the environment."""
    return backend or (_BACKEND_STACK[-1] if _BACKEND_STACK else None) or _ENV_BACKEND or "auto"


@functools.cache
def _resolve_cached(device_type: str, op: str, requested: str, interpret: bool) -> str:
    """:func:`resolve_backend` for a device type, cached (fixed once the kernels are registered
    at import; ``interpret`` is ``$TRITON_INTERPRET == "1"``). Errors are raised, not cached.
    For the per-step calls of :class:`craft_ext.Reactivator`."""
    return resolve_backend(torch.device(device_type), op, requested)


def _resolve_fast(device: torch.device, op: str, backend: str | None) -> str:
    requested = _requested_backend(backend)
    # $TRITON_INTERPRET only decides whether Triton may run on CPU tensors, and only an
    # explicit request picks Triton there, so the common case skips reading it
    interpret = requested == "triton" and os.environ.get("TRITON_INTERPRET", "") == "1"
    if torch.compiler.is_compiling():  # a trace-time constant; no cache wrapper to trace
        return resolve_backend(torch.device(device.type), op, requested)
    return _resolve_cached(device.type, op, requested, interpret)


def reactivate_(
    weight: Tensor,
    *,
    method: str = "craft",
    threshold: float = 1e-3,
    used: Tensor | None = None,
    generator: torch.Generator | CounterGenerator | None = None,
    criterion: str = "weight",
    bn: nn.Module | None = None,
    prelu: nn.Module | Tensor | None = None,
    backend: str | None = None,
) -> Reactivation:
    """Find the inactive filters of ``weight`` and reactivate them in place (CRAFT).

    Filter i (``weight[i]``) is inactive when every ``|w|`` in it is ``<= threshold``
    (Bhatta et al., arXiv 2312.00072: theta = 1e-3; compared in float32); with
    ``criterion="folded"`` when every ``|w * s_i|`` is, ``s_i = gamma_i / sqrt(var_i + eps)`` of
    the BatchNorm ``bn`` that follows (the filter the network applies: a channel whose gamma
    decayed is dead however large its weights). Donors are then ranked by folded L1 too.

    With ``bn`` (and ``prelu``) the whole channel is reactivated, not only the filter: the
    BatchNorm entries and slope of each reactivated channel are rewritten
    (:data:`craft_ext.reference.CHANNEL_RULES`). ``craft``: gamma, running variance and slope
    copied from the donor, beta and running mean negated, so that
    ``BN_i(conv_i(x)) = -BN_d(conv_d(x))`` exactly; ``scaled_gaussian``: the source channel's
    gamma, running statistics and slope, beta 0; ``random``: BatchNorm's reset values
    (gamma 1, beta 0, mean 0, variance 1). A layer's own bias follows the same rules.

    Methods:
        ``"craft"`` (the paper's): active filters not yet spent as donors (``used``) are
        ranked by L1 norm; the inactive filters, in random order, take the top-ranked unspent
        donors, one each, and become their negatives (complements). A donor is spent once for
        the life of the ``used`` mask. Inactive filters beyond the unspent donors take the
        complement of a donor drawn at random from the spent active filters (this call's
        included).
        ``"scaled_gaussian"`` (the paper's "directed scaled random"): inactive filters are
        drawn from N(mean, std) of the active filter with the largest L1 norm.
        ``"random"``: inactive filters are re-drawn He/Kaiming-normal (fan-in), the baseline.

    ``craft`` and ``scaled_gaussian`` leave a layer without any active filter unchanged.
    Filters holding NaN or Inf are neither inactive nor donors; they are left as they are.

    Args:
        weight: [N, ...] floating tensor (conv or linear weight, any layout), modified in place.
        method: ``"craft"``, ``"scaled_gaussian"`` or ``"random"``.
        threshold: inactivity threshold, >= 0.
        used: bool [N] on ``weight``'s device: donors spent so far, updated in place
            (``craft`` only). None: a fresh all-False mask for this call.
        generator: torch.Generator on ``weight``'s device type for the random order, donor
            draws and noise; None uses that device's default generator. A
            :class:`craft_ext.CounterGenerator` (state on the device) keeps the call traceable
            by ``torch.compile`` and capturable without registering a generator.
        criterion: ``"weight"`` (the paper's) or ``"folded"`` (needs ``bn``).
        bn: the BatchNorm after the layer (N channels, affine, running statistics, trainable).
        prelu: the per-channel PReLU after the BatchNorm (``nn.PReLU(N)`` or its [N] slopes).
        backend: force a backend (see module docs).

    Returns:
        :class:`Reactivation` ``(inactive, reactivated, donor, count)``, all on the device.

    Nothing is read back to the host, so the call is safe in a training step, under
    ``torch.cuda.set_sync_debug_mode("error")``, CUDA-graph capture and ``torch.compile``.
    Invalid arguments raise before anything is modified.
    """
    threshold = _check_reactivate_args(weight, method, threshold, used, generator)
    channel_args = _channel_args(weight, criterion, bn, prelu)
    if used is None:
        used = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
    with torch.no_grad():
        impl = _impl("reactivate_", _resolve_fast(weight.device, "reactivate_", backend))
        order_key, fallback_u, noise = reference.reactivation_inputs(weight, generator, method)
        out = impl(weight, used, order_key, fallback_u, noise, threshold, method, *channel_args)
        return Reactivation(*out)


def _channel_args(
    weight: Tensor, criterion: object, bn: nn.Module | None, prelu: nn.Module | Tensor | None
) -> tuple[object, ...]:
    """The operators' channel arguments for ``weight`` with ``bn`` / ``prelu`` (validated;
    ``()`` for the plain filter and the weight criterion)."""
    from .channel import channel_of, check_criterion

    folded = check_criterion(criterion) == "folded"
    if folded and bn is None:
        raise ValueError(
            'criterion="folded" needs bn= (the BatchNorm after the layer): the folded filter '
            "is w_i * gamma_i / sqrt(running_var_i + eps)"
        )
    if bn is None and prelu is None:
        return ()
    if bn is None:
        raise ValueError("prelu= needs bn= too: the slope belongs to the channel after its BN")
    return channel_of(weight, bn, prelu).op_args(folded)


def _check_method(method: object) -> str:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def _check_in_place(weight: Tensor, what: str = "weight") -> None:
    """``weight`` can be written in place (no overlapping memory, e.g. from expand())."""
    if not torch.compiler.is_compiling() and torch._debug_has_internal_overlap(weight) == 1:
        raise ValueError(f"{what} has overlapping memory (e.g. expand()); cannot modify in place")


def _check_reactivate_args(
    weight: Tensor,
    method: object,
    threshold: object,
    used: Tensor | None,
    generator: torch.Generator | None,
) -> float:
    """The argument checks of :func:`reactivate_` (``used`` may be None); returns the
    threshold as a float. Nothing is modified when one fails."""
    _check_weight(weight)
    _check_method(method)
    threshold = _check_threshold(threshold)
    if used is not None:
        _check_used(used, weight)
    _check_generator(generator, weight.device)
    _check_in_place(weight)
    return threshold


def _reactivate_and_reset_checked(
    weight: Tensor,
    used: Tensor,
    total: Tensor,
    state: list[Tensor],
    generator: torch.Generator | None,
    method: str,
    threshold: float,
    backend: str | None,
    channel_args: tuple[object, ...] = (),
) -> Reactivation:
    """:func:`craft_ext.reference.reactivate_and_reset_` with the backend's ``reactivate_``
    (callers validate and disable grad; ``state`` holds tensors only; ``channel_args`` are
    :meth:`craft_ext.Channel.op_args`). On CPU with the compiled extension it is one C++ call
    (``craft_ext::reactivate_and_reset_``, same draws, same results):
    :meth:`craft_ext.Reactivator.reactivate`."""
    name = _resolve_fast(weight.device, "reactivate_", backend)
    # the fused C++ op draws from a torch.Generator; a CounterGenerator draws in Python
    if not isinstance(generator, CounterGenerator) and name == "cpp" and _fused_cpu():
        op = torch.ops.craft_ext.reactivate_and_reset_.default
        # eager calls skip OpOverload.__call__'s Python frame (a few us per step when cold);
        # Dynamo traces the OpOverload itself
        call = op if torch.compiler.is_compiling() else op._op
        # checked in C++
        out = call(weight, used, total, state, generator, threshold, method, *channel_args)
    else:
        _check_used(used, weight)
        _check_total(total, weight)
        _check_generator(generator, weight.device)
        out = reference.reactivate_and_reset_(
            weight,
            used,
            total,
            state,
            generator,
            threshold,
            method,
            *channel_args,
            reactivate=_impl("reactivate_", name),
        )
    return tuple.__new__(Reactivation, out)  # Reactivation._make(out) without its frame


@functools.cache
def _fused_cpu() -> bool:
    """Whether the C++ CPU kernels of reactivate_and_reset_ (both overloads, registered
    together) are compiled in."""
    return has_kernel("reactivate_and_reset_", "CPU")


def _reactivate_and_record_checked(
    weight: Tensor,
    used: Tensor,
    total: Tensor,
    state: list[Tensor],
    reactivated_log: Tensor,
    donor_log: Tensor,
    slot: int,
    generator: torch.Generator | None,
    method: str,
    threshold: float,
    backend: str | None,
    channel_args: tuple[object, ...] = (),
) -> None:
    """:func:`craft_ext.reference.reactivate_and_record_` with the backend's ``reactivate_``
    (callers validate, disable grad and own the logs): :class:`craft_ext.Reactivator`'s
    per-step hook (see :func:`_cpu_record_op` for its direct CPU call). On CPU with the
    compiled extension it is one C++ call returning nothing to Python; elsewhere ``used``,
    ``total``, the generator and the logs are checked here, before anything is drawn or
    written (the weight and method are the caller's to validate, as the Reactivator does at
    construction)."""
    name = _resolve_fast(weight.device, "reactivate_", backend)
    args = (weight, used, total, state, reactivated_log, donor_log, slot, generator, threshold)
    if not isinstance(generator, CounterGenerator) and name == "cpp" and _fused_cpu():
        op = torch.ops.craft_ext.reactivate_and_reset_.record
        # checked in C++
        (op if torch.compiler.is_compiling() else op._op)(*args, method, *channel_args)
        return
    _check_used(used, weight)
    _check_total(total, weight)
    _check_generator(generator, weight.device)
    _check_logs(reactivated_log, donor_log, slot, weight)
    reference.reactivate_and_record_(
        *args, method, *channel_args, reactivate=_impl("reactivate_", name)
    )


def _describe(t: object) -> str:
    """A tensor's dtype, shape, device and layout for error messages."""
    if not isinstance(t, Tensor):
        return type(t).__name__
    layout = "" if t.is_contiguous() else " (not contiguous)"
    return f"{t.dtype} of shape {tuple(t.shape)} on {t.device}{layout}"


def _check_logs(reactivated_log: Tensor, donor_log: Tensor, slot: int, weight: Tensor) -> None:
    """The C++ kernel's checks of reactivate_and_reset_.record's logs (host metadata only)."""
    n = weight.shape[0]
    if not (
        isinstance(reactivated_log, Tensor)
        and reactivated_log.dtype == torch.bool
        and reactivated_log.dim() == 2
        and reactivated_log.shape[1] == n
        and reactivated_log.is_contiguous()
        and reactivated_log.device == weight.device
    ):
        raise ValueError(
            f"reactivated_log must be a contiguous bool [R, {n}] tensor on {weight.device}, "
            f"got {_describe(reactivated_log)}"
        )
    if not (
        isinstance(donor_log, Tensor)
        and donor_log.dtype == torch.int64
        and donor_log.shape == reactivated_log.shape
        and donor_log.is_contiguous()
        and donor_log.device == weight.device
    ):
        raise ValueError(
            "donor_log must be a contiguous int64 tensor shaped like reactivated_log "
            f"{tuple(reactivated_log.shape)} on {weight.device}, got {_describe(donor_log)}"
        )
    if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < len(reactivated_log):
        raise ValueError(f"slot must be an int in [0, {len(reactivated_log)}), got {slot!r}")


def _cpu_record_op() -> Callable[..., None] | None:
    """The eager C++ ``reactivate_and_reset_.record`` when a CPU weight would use the ``cpp``
    backend right now (no ``use_backend`` / ``$CRAFT_EXT_BACKEND`` choosing another, not
    tracing), else None. :class:`craft_ext.Reactivator` asks once per step and then calls it
    directly for its CPU weights (same call as :func:`_reactivate_and_record_checked`, without
    its Python frames, which cost several us per step with cold caches)."""
    requested = _requested_backend(None)
    if (
        requested == "triton"  # resolved with $TRITON_INTERPRET by the general path
        or torch.compiler.is_compiling()
        or not _fused_cpu()
        or _resolve_cached("cpu", "reactivate_", requested, False) != "cpp"
    ):
        return None
    return torch.ops.craft_ext.reactivate_and_reset_.record._op


# --------------------------------------------------------------------------------------------
# feature_map_stats
# --------------------------------------------------------------------------------------------


class FeatureMapStats(NamedTuple):
    """What :func:`feature_map_stats` computed, all on the feature map's device."""

    sum: Tensor  #: float32 [B, C], sum of each map over H, W
    corr: Tensor | None  #: float32 [B, C, C] Pearson correlations, None unless requested
    empty: Tensor  #: bool [B, C], |sum| <= sum_threshold
    redundant: Tensor  #: bool [B, C], correlated (>= corr_threshold) with a lower-index map


def _check_fmap(fmap: object) -> None:
    if not isinstance(fmap, Tensor):
        raise TypeError(f"fmap must be a torch.Tensor, got {type(fmap).__name__}")
    if fmap.dim() != 4:
        raise ValueError(f"fmap must have 4 dims [B, C, H, W], got shape {tuple(fmap.shape)}")
    if fmap.numel() == 0:
        raise ValueError(f"fmap must not be empty, got shape {tuple(fmap.shape)}")
    if fmap.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"fmap must be float32, float16, bfloat16 or float64, got {fmap.dtype}")


def _check_float_arg(value: object, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not lo <= value <= hi:  # also rejects NaN
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def feature_map_stats(
    fmap: Tensor,
    *,
    sum_threshold: float = 0.02,
    corr_threshold: float = 0.95,
    return_corr: bool = False,
    backend: str | None = None,
) -> FeatureMapStats:
    """Sums, emptiness, correlations and redundancy of the feature maps of each sample.

    Diba & Khosravi (IASC 2023) prune filters whose output maps are empty or duplicate those
    of another filter. For ``fmap`` [B, C, H, W], map i of sample b (x_bi, n = H*W values)::

        sum[b, i]       = sum_p x_bip
        empty[b, i]     = |sum[b, i]| <= sum_threshold                        (Eq. 2)
        corr[b, i, k]   = Pearson(x_bi, x_bk)                                 (Eqs. 5-9)
        redundant[b, i] = any_{k < i} corr[b, i, k] >= corr_threshold         (Eq. 10)

    The paper correlates min-max normalised maps; Pearson correlation is unchanged by that, so
    no normalised copy is made. Correlations come from the Gram matrix of the centred maps
    (accurate with large map means). A constant map (min == max) has correlation 0 with every
    other map and 1 with itself. Of a correlated pair, the lower index is kept (not redundant).

    Args:
        fmap: [B, C, H, W] float32/float16/bfloat16/float64, any strides.
        sum_threshold: >= 0, the paper's emptiness threshold (compared in float32).
        corr_threshold: in [-1, 1], the paper's correlation threshold.
        return_corr: also return ``corr`` (float32 [B, C, C]); ``redundant`` is computed
            either way.
        backend: force a backend (see module docs). There is no CUDA C++ kernel for this op:
            ``"auto"`` picks Triton on CUDA tensors.

    Returns:
        :class:`FeatureMapStats` ``(sum, corr, empty, redundant)`` on ``fmap``'s device;
        float32 results are within 2e-4 (corr) of a float64 computation. Nothing is read back
        to the host.
    """
    _check_fmap(fmap)
    sum_threshold = _check_float_arg(sum_threshold, "sum_threshold", 0.0, math.inf)
    corr_threshold = _check_float_arg(corr_threshold, "corr_threshold", -1.0, 1.0)
    if not isinstance(return_corr, bool):
        raise TypeError(f"return_corr must be a bool, got {type(return_corr).__name__}")
    impl = _impl("feature_map_stats", resolve_backend(fmap.device, "feature_map_stats", backend))
    with torch.no_grad():
        total, corr, empty, redundant = impl(fmap, sum_threshold, corr_threshold, return_corr)
    return FeatureMapStats(total, corr if return_corr else None, empty, redundant)


# --------------------------------------------------------------------------------------------
# Fake (meta) kernels: shapes, dtypes and devices of the outputs, for FakeTensor / compile.
# --------------------------------------------------------------------------------------------


def _fake_filter_stats(
    weight: Tensor, *_: object, **__: object
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n = weight.shape[0]
    return tuple(weight.new_empty((n,), dtype=torch.float32) for _ in range(4))  # type: ignore[return-value]


def _fake_reactivate(
    weight: Tensor,
    used: Tensor,
    order_key: Tensor,
    fallback_u: Tensor,
    noise: Tensor | None,
    threshold: float,
    method: str,
    *_: object,
    **__: object,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n = weight.shape[0]
    return (
        weight.new_empty((n,), dtype=torch.bool),
        weight.new_empty((n,), dtype=torch.bool),
        weight.new_empty((n,), dtype=torch.int64),
        weight.new_empty((), dtype=torch.int64),
    )


def _fake_feature_map_stats(
    fmap: Tensor, sum_threshold: float, corr_threshold: float, return_corr: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b, c = fmap.shape[0], fmap.shape[1]
    corr_shape = (b, c, c) if return_corr else (b, 0, 0)
    return (
        fmap.new_empty((b, c), dtype=torch.float32),
        fmap.new_empty(corr_shape, dtype=torch.float32),
        fmap.new_empty((b, c), dtype=torch.bool),
        fmap.new_empty((b, c), dtype=torch.bool),
    )


def _fake_reactivate_and_reset(
    weight: Tensor, *_: object, **__: object
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Outputs of reactivate_and_reset_ (its other arguments do not shape them)."""
    return _fake_reactivate(weight, weight, weight, weight, None, 0.0, "craft")


def _fake_reactivate_and_record(*_: object, **__: object) -> None:
    """reactivate_and_reset_.record returns nothing (it writes its arguments)."""
    return None


_FAKES: dict[str, Callable[..., object]] = {
    "feature_map_stats": _fake_feature_map_stats,
    "reactivate_and_reset_.record": _fake_reactivate_and_record,
    "filter_stats": _fake_filter_stats,
    "reactivate_": _fake_reactivate,
    "reactivate_and_reset_": _fake_reactivate_and_reset,
}


def _register_fakes() -> None:
    for name, fake in _FAKES.items():
        qualnames = []
        if extension_loaded() and torch._C._dispatch_has_kernel(f"craft_ext::{name}"):
            qualnames.append(f"craft_ext::{name}")
        triton_name = _triton_name(name)
        if hasattr(torch.ops.craft_ext, triton_name):
            qualnames.append(f"craft_ext::{triton_name}")
        for qualname in qualnames:
            torch.library.register_fake(qualname)(fake)


_register_fakes()
