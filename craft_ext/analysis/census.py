"""Census of inactive filters (paper Table 1), by the weight and the BN-folded criterion.

A filter i of a conv weight W [N, ...] is *inactive* at threshold ``t``

* by the **weight** criterion (the paper's, :func:`craft_ext.reactivate_`'s default) when
  every weight satisfies ``|w| <= t``, i.e. ``max |W[i]| <= t``;
* by the **folded** criterion when ``max |W[i]| * |s_i| <= t``, ``s_i = gamma_i /
  sqrt(running_var_i + eps)`` of the BatchNorm after the conv: the filter the network really
  applies in eval mode. A channel whose BN scale has decayed to ~0 is dead however large its raw
  weights are (a released ArcFace MobileFaceNet: 0 of 64 first-layer filters dead by weight,
  30 by fold).

The BatchNorm (and PReLU) of a conv is found in the state dict itself, by key order and
channel count (:func:`craft_ext.channel.channels_from_state_dict`), so any checkpoint layout
works without building the network. A conv with no BatchNorm after it applies its raw filter:
its folded statistics *are* the raw ones (scale 1), so its ``*_folded_*`` entries equal the
weight ones and its ``bn`` is null.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..channel import Channel, channels_from_state_dict
from ..ops import filter_stats
from .io import Source, conv_weights, first_conv, load_state_dict

__all__ = [
    "DEFAULT_THRESHOLDS",
    "LayerStats",
    "census",
    "format_census",
    "inactive_mask",
    "layer_stats",
    "threshold_key",
]

DEFAULT_THRESHOLDS: tuple[float, ...] = (1e-3, 1e-6)


def threshold_key(t: float) -> str:
    """Compact spelling of a threshold used in result keys: ``1e-3``, ``2.5e-4``, ``0``."""
    if t == 0:
        return "0"
    mantissa, exponent = f"{t:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def inactive_mask(weight: Tensor, threshold: float = 1e-3) -> Tensor:
    """Bool [N] on CPU: filters of ``weight`` [N, ...] whose max |w| is ``<= threshold``."""
    return filter_stats(weight.detach()).max_abs.cpu() <= threshold


class LayerStats(NamedTuple):
    """Per-filter statistics of one conv, float32 [N] on CPU.

    ``max_abs`` / ``l1``: of the raw filters; ``folded_max_abs`` / ``folded_l1``: of the
    filters times ``|s|`` (the raw ones when ``bn`` is None); ``bn`` / ``prelu``: state-dict
    prefixes of the BatchNorm folded in and of the channel's PReLU, or None."""

    name: str
    weight: Tensor
    max_abs: Tensor
    l1: Tensor
    folded_max_abs: Tensor
    folded_l1: Tensor
    bn: str | None
    prelu: str | None

    def dead(self, threshold: float, folded: bool = False) -> Tensor:
        """Bool [N]: inactive by the weight (or folded) criterion at ``threshold``."""
        return (self.folded_max_abs if folded else self.max_abs) <= threshold


def _stats_of(channel: Channel) -> LayerStats:
    stats = filter_stats(channel.weight.detach())
    max_abs, l1 = stats.max_abs.cpu(), stats.l1.cpu()
    scale = channel.folded_scale()
    a = scale.abs().cpu() if scale is not None else None
    return LayerStats(
        name=channel.name or "weight",
        weight=channel.weight,
        max_abs=max_abs,
        l1=l1,
        folded_max_abs=max_abs * a if a is not None else max_abs,  # the kernels' product
        folded_l1=l1 * a if a is not None else l1,
        bn=channel.bn_name if channel.has_bn else None,
        prelu=channel.prelu_name,
    )


def _channel(sd: Mapping[str, Tensor], name: str, channels: Mapping[str, Channel]) -> Channel:
    return channels.get(name) or Channel(weight=sd[name], name=name)


def layer_stats(sd: Mapping[str, Tensor], layer: str | None = None) -> LayerStats:
    """:class:`LayerStats` of conv ``layer`` of the state dict ``sd`` (default: the first conv,
    :func:`craft_ext.analysis.io.first_conv`), its BatchNorm found by key order and channel
    count."""
    name, _ = first_conv(sd, layer)
    return _stats_of(_channel(sd, name, channels_from_state_dict(sd)))


def _layer_census(ls: LayerStats, thresholds: Sequence[float]) -> dict[str, Any]:
    n = int(ls.weight.shape[0])
    entry: dict[str, Any] = {
        "layer": ls.name,
        "shape": list(ls.weight.shape),
        "filters": n,
        "bn": ls.bn,
        "prelu": ls.prelu,
    }
    for folded, tag in ((False, ""), (True, "folded_")):
        for t in thresholds:
            key = threshold_key(t)
            idx = torch.nonzero(ls.dead(t, folded)).flatten().tolist()
            entry[f"inactive_{tag}{key}"] = len(idx)
            entry[f"fraction_{tag}{key}"] = len(idx) / max(n, 1)
            entry[f"indices_{tag}{key}"] = idx
    nan = float("nan")
    entry["max_abs_min"] = float(ls.max_abs.min()) if n else nan
    entry["folded_max_abs_min"] = float(ls.folded_max_abs.min()) if n else nan
    entry["l1_total"] = float(ls.l1.sum())
    return entry


def census(
    source: Source,
    *,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    all_layers: bool = False,
    layer: str | None = None,
) -> dict[str, Any]:
    """Count the inactive filters of the first conv layer (and optionally of every conv layer)
    by the weight and the folded criterion (module docs).

    Args:
        source: module, state dict (any key prefix), checkpoint dict, checkpoint file or run
            directory (:mod:`craft_ext.analysis.io`).
        thresholds: thresholds ``t``.
        all_layers: also report every 4-D conv weight under ``"layers"``.
        layer: state-dict name of the layer to report at top level (default: first conv).

    Returns:
        A JSON-serialisable dict: ``layer`` (the conv's weight key), ``shape``, ``filters``,
        ``bn`` (prefix of the BatchNorm folded in, or None), ``prelu`` (prefix of the
        channel's PReLU, or None); per threshold key ``k`` (:func:`threshold_key`, e.g.
        ``1e-3``) ``inactive_k`` (count by weight), ``fraction_k``, ``indices_k`` and the same
        by the folded criterion ``inactive_folded_k``, ``fraction_folded_k``,
        ``indices_folded_k`` (equal to the weight ones when ``bn`` is None); ``max_abs_min``,
        ``folded_max_abs_min``, ``l1_total``, ``thresholds``. With ``all_layers``: ``layers``
        (the same record for every conv), ``total_filters``, ``total_inactive_k`` and
        ``total_inactive_folded_k``.
    """
    thresholds = tuple(float(t) for t in thresholds)
    sd = load_state_dict(source)
    channels = channels_from_state_dict(sd)
    name, _ = first_conv(sd, layer)
    result = _layer_census(_stats_of(_channel(sd, name, channels)), thresholds)
    result["thresholds"] = list(thresholds)
    if all_layers:
        layers = [
            _layer_census(_stats_of(_channel(sd, k, channels)), thresholds)
            for k in conv_weights(sd)
        ]
        result["layers"] = layers
        result["total_filters"] = sum(e["filters"] for e in layers)
        for tag in ("", "folded_"):
            for t in thresholds:
                key = f"inactive_{tag}{threshold_key(t)}"
                result[f"total_{key}"] = sum(e[key] for e in layers)
    return result


def _pct(n: int, total: int) -> str:
    return f"{n:4d} / {total} ({100.0 * n / max(total, 1):5.1f}%)"


def format_census(result: dict[str, Any]) -> str:
    """Human-readable report of a :func:`census` result: both criteria and the BatchNorm
    folded in, and with ``layers`` a per-conv table (``w``: by weight, ``f``: folded)."""
    keys = [threshold_key(t) for t in result["thresholds"]]
    bn, prelu = result.get("bn"), result.get("prelu")
    head = f"first layer {result['layer']} {tuple(result['shape'])}: {result['filters']} filters"
    if bn:
        head += f", BatchNorm {bn} folded in" + (f", PReLU {prelu}" if prelu else "")
    else:
        head += ", no BatchNorm after it (folded filters = raw filters)"
    lines = [head]
    for k in keys:
        rows = [("weight", f"max|w| <= {k}", "")]
        if bn:
            rows.append(("folded", f"max|w*s| <= {k}", "folded_"))
        for crit, rule, tag in rows:
            lines.append(
                f"  inactive by {crit} ({rule}):".ljust(42)
                + f"{_pct(result[f'inactive_{tag}{k}'], result['filters'])}  "
                f"{result[f'indices_{tag}{k}']}"
            )
    if bn:
        lines.append(f"  (s = gamma / sqrt(running_var + eps) of {bn})")
    if "layers" in result:
        width = max([len(e["layer"]) for e in result["layers"]] + [5])
        bn_w = max([len(e["bn"] or "-") for e in result["layers"]] + [2])
        cols = [f"{c}<={k}" for k in keys for c in ("w", "f")]
        header = f"{'layer':<{width}} {'bn':<{bn_w}} {'filters':>7} " + " ".join(
            f"{c:>9}" for c in cols
        )
        lines += ["", header, "-" * len(header)]
        for e in result["layers"]:
            cells = " ".join(
                f"{e[f'inactive_{tag}{k}']:>9d}" for k in keys for tag in ("", "folded_")
            )
            lines.append(
                f"{e['layer']:<{width}} {e['bn'] or '-':<{bn_w}} {e['filters']:>7d} {cells}"
            )
        total = " ".join(
            f"{result[f'total_inactive_{tag}{k}']:>9d}" for k in keys for tag in ("", "folded_")
        )
        lines.append(f"{'total':<{width}} {'':<{bn_w}} {result['total_filters']:>7d} {total}")
        lines.append("w: inactive by weight, f: by the BN-folded filter (= w where bn is -)")
    return "\n".join(lines)
