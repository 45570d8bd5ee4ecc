"""The *channel*: a filter row plus the per-channel entries that follow it in the network.

A conv / linear weight ``W`` [N, ...] has N filters. What the network computes from filter i
also depends on entries that follow it, one per filter:

* the layer's own bias ``b_i`` (iresnet and MobileFaceNet convs have none);
* the BatchNorm after it: ``gamma_i`` (weight), ``beta_i`` (bias), running mean and variance;
* a per-channel PReLU slope ``a_i`` after that.

In eval mode BN_i(conv_i(x)) = s_i * conv_i(x) + const with s_i = gamma_i / sqrt(var_i + eps),
so the filter the network really applies is ``W[i] * s_i`` (the *folded* filter). A channel
whose gamma has decayed to ~0 is dead however large its raw weights are: a released ArcFace
MobileFaceNet has 0 first-layer filters with max |w| <= 1e-3 yet 30 of 64 channels dead
through BN. Detecting such channels needs the folded filter (criterion ``"folded"``), and
reviving them needs the whole channel rewritten (see :data:`craft_ext.reference.CHANNEL_RULES`):
a filter replaced under a gamma of ~0 stays dead.

:class:`Channel` holds those tensors; :func:`channel_of` builds one from modules (validated),
:func:`channels_of` finds the BatchNorm and PReLU after named layers of a model, and
:func:`channels_from_state_dict` does the same on a bare state dict (no module: by key order
and channel count). The Reactivator, the trainer and ``craft-analyze census`` all use them.

How the entries are found (:func:`channels_of`, :func:`channels_from_state_dict`): after the
layer, in registration (state-dict key) order and before the next conv / linear layer, the
first BatchNorm is the layer's when it has N channels and running statistics (otherwise the
layer has none); after that BatchNorm, the first PReLU with N slopes is the channel's. This is
execution order for sequential stems and blocks (iresnet's ``conv1 -> bn1 -> prelu``, an
IBasicBlock's ``conv1 -> bn2 -> prelu``, MobileFaceNet's ConvBlock ``conv -> bn -> prelu``);
for a model that registers modules in another order than it runs them, pass ``bn=`` /
``prelu=`` explicitly (:func:`channel_of`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

__all__ = [
    "CRITERIA",
    "Channel",
    "ChannelKeys",
    "channel_keys",
    "channel_of",
    "channels_from_state_dict",
    "channels_of",
    "check_criterion",
    "watched_channels",
]

#: Detection criteria: ``"weight"`` (the paper's: max |W[i]| <= threshold) and ``"folded"``
#: (max |W[i] * s_i| <= threshold, s_i = gamma_i / sqrt(running_var_i + eps)).
CRITERIA = ("weight", "folded")

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_criterion(criterion: object) -> str:
    """``criterion`` if it is one of :data:`CRITERIA`, else a ValueError naming them."""
    if not isinstance(criterion, str) or criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    return criterion


@dataclass(frozen=True, eq=False)
class Channel:
    """A watched weight [N, ...] and the per-channel [N] entries that follow its filters.

    ``bias`` (the layer's), ``bn_weight``/``bn_bias``/``running_mean``/``running_var`` (its
    BatchNorm; ``bn_weight`` None for a non-affine BN) and ``prelu`` (per-channel slopes) are
    the tensors themselves (Parameters / buffers, rewritten in place by a reactivation), or
    None. ``name``, ``bn_name``, ``prelu_name`` say where they came from (for reports).
    """

    weight: Tensor
    bias: Tensor | None = None
    bn_weight: Tensor | None = None
    bn_bias: Tensor | None = None
    running_mean: Tensor | None = None
    running_var: Tensor | None = None
    prelu: Tensor | None = None
    eps: float = 1e-5
    name: str | None = None
    bn_name: str | None = None
    prelu_name: str | None = None

    @property
    def filters(self) -> int:
        """N, the number of filters (channels)."""
        return int(self.weight.shape[0])

    @property
    def has_bn(self) -> bool:
        """Whether a BatchNorm (with running statistics) follows the filters."""
        return self.running_var is not None

    def entries(self) -> tuple[Tensor | None, ...]:
        """The [N] entries in operator-schema order
        (:data:`craft_ext.reference.CHANNEL_ENTRIES`)."""
        return (
            self.bias,
            self.bn_weight,
            self.bn_bias,
            self.running_mean,
            self.running_var,
            self.prelu,
        )

    def op_args(self, folded: bool) -> tuple[Any, ...]:
        """The channel arguments of the ``craft_ext::reactivate_*`` operators, in schema order:
        ``(bias, bn_weight, bn_bias, running_mean, running_var, prelu, eps, folded)``."""
        return (*self.entries(), float(self.eps), bool(folded))

    def params(self) -> list[Tensor]:
        """The tensors an optimizer trains here (weight, bias, gamma, beta, slope): their
        optimizer-state rows are reset with the filter's."""
        out = [self.weight]
        for t in (self.bias, self.bn_weight, self.bn_bias, self.prelu):
            if t is not None:
                out.append(t)
        return out

    def folded_scale(self) -> Tensor | None:
        """s = gamma / sqrt(running_var + eps), float32 [N] (None without a BatchNorm)."""
        if self.running_var is None:
            return None
        from .reference import folded_scale

        with torch.no_grad():
            return folded_scale(self.bn_weight, self.running_var, self.eps)

    def describe(self) -> str:
        """``"conv1 (64 filters) + bn1 + prelu"``."""
        parts = [f"{self.name or 'weight'} ({self.filters} filters)"]
        if self.has_bn:
            parts.append(self.bn_name or "bn")
        if self.prelu is not None:
            parts.append(self.prelu_name or "prelu")
        return " + ".join(parts)


def _weight_of(layer: object, what: str) -> Tensor:
    if isinstance(layer, nn.Module):
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, Tensor):
            raise TypeError(
                f"{what} is a {type(layer).__name__} without a .weight tensor; pass a "
                "conv/linear module or its weight"
            )
        return weight
    if isinstance(layer, Tensor):
        return layer
    raise TypeError(f"{what}: expected a conv/linear module or a weight tensor, got {layer!r}")


def _check_entry(t: Tensor, n: int, device: torch.device, what: str) -> None:
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{what} has shape {tuple(t.shape)}; the layer has {n} filters")
    if t.device != device:
        raise ValueError(f"{what} is on {t.device}, the layer's weight on {device}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def _bn_label(bn: nn.Module, name: str | None) -> str:
    return f"bn {name!r} ({type(bn).__name__}({getattr(bn, 'num_features', '?')}))"


def channel_of(
    layer: nn.Module | Tensor,
    bn: nn.Module | None = None,
    prelu: nn.Module | Tensor | None = None,
    *,
    name: str | None = None,
    bn_name: str | None = None,
    prelu_name: str | None = None,
    trainable: bool = True,
) -> Channel:
    """The :class:`Channel` of ``layer`` (a conv / linear module or its weight [N, ...]) with
    the BatchNorm ``bn`` and PReLU ``prelu`` that follow it, validated.

    The layer's own bias comes with a module. ``bn`` must be a BatchNorm (1d/2d/3d, or
    SyncBatchNorm) with N channels and running statistics; ``prelu`` an ``nn.PReLU`` with N
    slopes or a [N] tensor. With ``trainable`` (reactivation rewrites the entries, so the
    network must be able to train them) a frozen BN (no affine parameters, or parameters that
    do not require grad) is refused too. Raises TypeError / ValueError naming the argument and
    what was expected; nothing is modified.
    """
    weight = _weight_of(layer, "layer")
    if weight.dim() < 2 or weight.numel() == 0:
        raise ValueError(
            f"layer: weight of shape {tuple(weight.shape)} is not a conv/linear weight [N, ...]"
        )
    n, device = int(weight.shape[0]), weight.device
    label = name or "the layer"
    bias = getattr(layer, "bias", None) if isinstance(layer, nn.Module) else None
    if bias is not None:
        _check_entry(bias, n, device, f"{label}'s bias")
    fields: dict[str, Any] = {"weight": weight, "bias": bias, "name": name}
    if bn is not None:
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise TypeError(
                f"bn: expected a BatchNorm module (BatchNorm1d/2d/3d, SyncBatchNorm), got "
                f"{type(bn).__name__}"
            )
        what = _bn_label(bn, bn_name)
        if bn.num_features != n:
            raise ValueError(f"bn: {what} has {bn.num_features} channels, {label} has {n} filters")
        if bn.running_var is None or bn.running_mean is None:
            raise ValueError(
                f"bn: {what} keeps no running statistics (track_running_stats=False): there is "
                "no folded filter to detect or rewrite"
            )
        if trainable and (bn.weight is None or bn.bias is None):
            raise ValueError(
                f"bn: {what} is not affine (affine=False): a reactivation could not give the "
                "channel a trainable scale"
            )
        if trainable and not (bn.weight.requires_grad and bn.bias.requires_grad):
            raise ValueError(
                f"bn: {what} is frozen (its weight/bias do not require grad): a reactivated "
                "channel could never train its BN entries; unfreeze it or pass bn=None"
            )
        for entry, t in (
            ("weight", bn.weight),
            ("bias", bn.bias),
            ("running_mean", bn.running_mean),
            ("running_var", bn.running_var),
        ):
            if t is not None:
                _check_entry(t, n, device, f"bn: {what}'s {entry}")
        fields.update(
            bn_weight=bn.weight,
            bn_bias=bn.bias,
            running_mean=bn.running_mean,
            running_var=bn.running_var,
            eps=float(bn.eps),
            bn_name=bn_name,
        )
    if prelu is not None:
        if isinstance(prelu, nn.PReLU):
            slope = prelu.weight
            if slope.numel() != n:
                raise ValueError(
                    f"prelu: PReLU({slope.numel()}) has {slope.numel()} slope(s), {label} has "
                    f"{n} filters (a shared slope is not part of a channel: pass prelu=None)"
                )
        elif isinstance(prelu, Tensor):
            slope = prelu
        else:
            raise TypeError(
                f"prelu: expected an nn.PReLU or a [N] tensor, got {type(prelu).__name__}"
            )
        _check_entry(slope, n, device, "prelu")
        fields.update(prelu=slope, prelu_name=prelu_name)
    channel = Channel(**fields)
    _check_distinct(channel)
    return channel


def _check_distinct(channel: Channel) -> None:
    if torch.compiler.is_compiling():  # storage pointers cannot be traced; checked in eager
        return
    seen: set[int] = set()
    for t in (channel.weight, *channel.entries()):
        if t is None:
            continue
        if t.untyped_storage().data_ptr() in seen and t.numel():
            raise ValueError("channel entries must be distinct tensors (they share memory)")
        seen.add(t.untyped_storage().data_ptr())


# --------------------------------------------------------------------------------------------
# Finding the entries: models (registration order) and state dicts (key order)
# --------------------------------------------------------------------------------------------


class _Item(NamedTuple):
    """One layer-like thing in network order: ``kind`` is ``"layer"`` (conv / linear),
    ``"bn"``, ``"prelu"`` or ``"other"``; ``size`` its channel count (N, num_features, slopes)."""

    name: str
    kind: str
    size: int


class ChannelKeys(NamedTuple):
    """Where a layer's channel entries are: the BatchNorm and PReLU names (None if absent)."""

    bn: str | None
    prelu: str | None


def _match(items: Sequence[_Item]) -> dict[str, ChannelKeys]:
    """The module docs' rule, for every ``"layer"`` item."""
    out: dict[str, ChannelKeys] = {}
    for i, item in enumerate(items):
        if item.kind != "layer":
            continue
        bn = prelu = None
        for nxt in items[i + 1 :]:
            if nxt.kind == "layer":
                break
            if bn is None and nxt.kind == "bn":
                if nxt.size != item.size:
                    break  # a BatchNorm of another width: not this layer's
                bn = nxt.name
            elif bn is not None and nxt.kind == "prelu" and nxt.size == item.size:
                prelu = nxt.name
                break
        out[item.name] = ChannelKeys(bn, prelu)
    return out


def _module_items(model: nn.Module) -> list[_Item]:
    items = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            items.append(_Item(name, "layer", int(m.weight.shape[0])))
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            kind = "bn" if m.running_var is not None else "other"
            items.append(_Item(name, kind, int(m.num_features)))
        elif isinstance(m, nn.PReLU):
            items.append(_Item(name, "prelu", int(m.weight.numel())))
        elif not list(m.children()):
            items.append(_Item(name, "other", 0))
    return items


def channels_of(
    model: nn.Module, layers: str | Iterable[str] | None = None, *, trainable: bool = True
) -> list[Channel]:
    """The channels of ``layers`` of ``model``, with the BatchNorm and PReLU that follow each.

    Args:
        model: the network (DDP / ``torch.compile`` wrappers are unwrapped).
        layers: module names (``"conv1"``, ``"layers.0.layers.0"``) or parameter names
            (``"conv1.weight"``); default: the first conv layer
            (:func:`craft_ext.models.first_conv`), the layer CRAFT watches.
        trainable: as :func:`channel_of` (refuse frozen BatchNorms).

    Returns one :class:`Channel` per layer, ``name`` the parameter name of its weight. A layer
    followed by no BatchNorm gets a channel without one (the ``"folded"`` criterion then
    refuses it).
    """
    from .models import _unwrap

    model = _unwrap(model)
    modules = dict(model.named_modules())
    if layers is None:
        from .models import first_conv

        target = first_conv(model)
        layers = [next(n for n, m in modules.items() if m is target)]
    elif isinstance(layers, str):
        layers = [layers]
    keys = _match(_module_items(model))
    out = []
    for layer in layers:
        mod_name = layer[: -len(".weight")] if layer.endswith(".weight") else layer
        module = modules.get(mod_name)
        if mod_name not in keys or module is None:
            conv_names = [k for k in keys][:6]
            raise ValueError(
                f"layers: {layer!r} is not a conv / linear layer of {type(model).__name__} "
                f"(e.g. {conv_names})"
            )
        found = keys[mod_name]
        out.append(
            channel_of(
                module,
                modules[found.bn] if found.bn else None,
                modules[found.prelu] if found.prelu else None,
                name=f"{mod_name}.weight",
                bn_name=found.bn,
                prelu_name=found.prelu,
                trainable=trainable,
            )
        )
    return out


def _state_items(state_dict: Mapping[str, Any]) -> list[_Item]:
    """Group ``prefix.leaf`` keys by prefix, in first-seen order, and classify each group."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            continue
        prefix, _, leaf = key.rpartition(".")
        groups.setdefault(prefix, {})[leaf] = value
    items = []
    for prefix, leaves in groups.items():
        w = leaves.get("weight")
        if "running_var" in leaves and "running_mean" in leaves:
            items.append(_Item(prefix, "bn", int(leaves["running_var"].numel())))
        elif w is not None and w.dim() >= 2:
            items.append(_Item(prefix, "layer", int(w.shape[0])))
        elif w is not None and w.dim() == 1 and set(leaves) == {"weight"}:
            items.append(_Item(prefix, "prelu", int(w.numel())))
        else:
            items.append(_Item(prefix, "other", 0))
    return items


def channel_keys(state_dict: Mapping[str, Any]) -> dict[str, ChannelKeys]:
    """For every conv / linear weight ``P.weight`` of a state dict: the prefixes of its
    BatchNorm and PReLU (``ChannelKeys``), found by key order and channel count (module docs).
    Keys are the layers' prefixes ``P``."""
    return _match(_state_items(state_dict))


def channels_from_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Channel]:
    """A :class:`Channel` (of the state dict's tensors) for every conv / linear weight,
    keyed by the weight's key. ``eps`` is BatchNorm's default 1e-5 (a state dict does not
    record it); no module is needed."""
    out = {}
    for prefix, found in channel_keys(state_dict).items():
        key = f"{prefix}.weight" if prefix else "weight"
        fields: dict[str, Any] = {"weight": state_dict[key], "name": key}
        bias = state_dict.get(f"{prefix}.bias")
        if isinstance(bias, Tensor) and bias.shape == (fields["weight"].shape[0],):
            fields["bias"] = bias
        if found.bn is not None:
            fields.update(
                bn_weight=state_dict.get(f"{found.bn}.weight"),
                bn_bias=state_dict.get(f"{found.bn}.bias"),
                running_mean=state_dict[f"{found.bn}.running_mean"],
                running_var=state_dict[f"{found.bn}.running_var"],
                bn_name=found.bn,
            )
        if found.prelu is not None:
            fields.update(prelu=state_dict[f"{found.prelu}.weight"], prelu_name=found.prelu)
        out[key] = Channel(**fields)
    return out


# --------------------------------------------------------------------------------------------
# What a Reactivator watches
# --------------------------------------------------------------------------------------------


def _target_channel(obj: object, what: str) -> Channel:
    """A target as a channel: a :class:`Channel` as it is; a module or a tensor as its weight
    alone (the paper's conv-only reactivation; no bias, no BN)."""
    if isinstance(obj, Channel):
        return obj
    if isinstance(obj, (nn.Module, Tensor)):
        try:
            return Channel(weight=_weight_of(obj, what))
        except TypeError as exc:
            raise TypeError(f"targets: {exc}") from None
    raise TypeError(
        f"targets: {what} must be a module, a Parameter, a Channel or a (name, parameter) "
        f"pair, got {type(obj).__name__}"
    )


def watched_channels(
    targets: object, *, bn: nn.Module | None = None, prelu: nn.Module | Tensor | None = None
) -> list[tuple[str | None, Channel]]:
    """``targets`` (see :class:`craft_ext.Reactivator`) as ``(given name or None, Channel)``.

    A module or tensor watches its weight alone (the paper); a :class:`Channel` its whole
    channel. ``bn`` / ``prelu`` make a single target's channel (:func:`channel_of`, bias
    included).
    """
    if targets is None:
        out: list[tuple[str | None, Channel]] = []
    elif isinstance(targets, (nn.Module, Tensor, Channel)):
        out = [(None, _target_channel(targets, "the target"))]
    elif isinstance(targets, Mapping):
        out = []
        for key, value in targets.items():
            if not isinstance(key, str):
                raise TypeError(f"targets: dict keys must be names (str), got {key!r}")
            out.append((key, _target_channel(value, f"targets[{key!r}]")))
    elif isinstance(targets, (str, bytes)) or not isinstance(targets, Iterable):
        raise TypeError(
            "targets must be a module, a Parameter, a Channel, or a list/dict of them (or of "
            f"(name, parameter) pairs), got {type(targets).__name__}"
        )
    else:
        out = []
        for i, item in enumerate(targets):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                out.append((item[0], _target_channel(item[1], f"targets[{i}] ({item[0]!r})")))
            else:
                out.append((None, _target_channel(item, f"targets[{i}]")))
    if bn is not None or prelu is not None:
        if len(out) != 1:
            raise ValueError(
                f"bn= / prelu= name the channel of a single target; got {len(out)} targets "
                "(pass Channel objects, e.g. from craft_ext.channels_of, for several)"
            )
        if bn is None:
            raise ValueError("prelu= needs bn= too: the slope belongs to the channel after its BN")
        name, ch = out[0]
        if ch.has_bn or ch.prelu is not None:
            raise ValueError("bn= / prelu= given for a target that is already a Channel")
        layer = targets if isinstance(targets, nn.Module) else ch.weight
        out = [(name, channel_of(layer, bn, prelu, name=name))]
    return out
