"""Filter pruning from feature-map statistics (Diba & Khosravi, IASC 2023).

The paper feeds a few face images (100, from the identities with the most images) through a
trained network and, for every convolution, flags in each image the output maps that are
*empty* (``|sum| <= 0.02``, Eq. 2) or *redundant* (Pearson correlation >= 0.95 with a map of
lower index, Eqs. 5-10). A filter flagged in at least 80% of the images is pruned; the smaller
network is then fine-tuned.

* :func:`find_prunable` collects the statistics with forward hooks and
  :func:`craft_ext.feature_map_stats`, counting votes on the device, and returns a plan
  ``{conv name: [channel indices]}``.
* :func:`prune` returns a new, physically smaller copy of the model (the original is not
  modified). Only channels that do not meet a residual addition are removed: in an iresnet
  block the internal channels ``conv1 (out) -> bn2 -> prelu -> conv2 (in)``; in any
  ``nn.Sequential`` a ``Conv2d -> [BatchNorm2d] -> [activation] -> Conv2d`` chain.
* :func:`profile` counts parameters and FLOPs (forward hooks on Conv2d / Linear).
* :func:`save_pruned` / :func:`load_pruned` store a pruned iresnet as network name, options,
  plan and weights, so it can be rebuilt and reloaded.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import atomic_save
from .data.transforms import normalize
from .models import IBasicBlock, get_model
from .ops import feature_map_stats

__all__ = [
    "PRUNED_FORMAT",
    "PruneChain",
    "find_prunable",
    "load_pruned",
    "profile",
    "prunable_layers",
    "prune",
    "save_pruned",
    "select_samples",
]

PRUNED_FORMAT = "craft_ext.pruned.v1"
_ACTIVATIONS = (nn.PReLU, nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Tanh, nn.ELU)


@dataclass(frozen=True)
class PruneChain:
    """Modules whose channels are removed together when filters of ``conv`` are pruned.

    ``conv`` output channel c feeds channel c of ``bn`` (if any), of ``act`` (if per-channel)
    and input channel c of ``consumer``; nothing else reads it. Values are module names.
    """

    conv: str
    bn: str | None
    act: str | None
    consumer: str


def _is_plain_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == 1


def prunable_layers(model: nn.Module) -> dict[str, PruneChain]:
    """Convolutions of ``model`` whose output channels can be removed, with their chains.

    * iresnet blocks (:class:`craft_ext.models.IBasicBlock`): ``<block>.conv1`` with
      ``bn2``, ``prelu`` and ``conv2``; the block output (``conv2``/``bn3``) meets the residual
      addition and is never pruned.
    * ``nn.Sequential`` children ``Conv2d, [BatchNorm2d], [activation], Conv2d`` (groups 1).
    """
    chains: dict[str, PruneChain] = {}
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, IBasicBlock):
            if _is_plain_conv(mod.conv1) and _is_plain_conv(mod.conv2):
                chains[f"{prefix}conv1"] = PruneChain(
                    f"{prefix}conv1", f"{prefix}bn2", f"{prefix}prelu", f"{prefix}conv2"
                )
        elif isinstance(mod, nn.Sequential):
            items = list(mod.named_children())
            for i, (cname, child) in enumerate(items):
                if not _is_plain_conv(child):
                    continue
                j, bn, act = i + 1, None, None
                if j < len(items) and isinstance(items[j][1], nn.BatchNorm2d):
                    bn, j = f"{prefix}{items[j][0]}", j + 1
                if j < len(items) and isinstance(items[j][1], _ACTIVATIONS):
                    act, j = f"{prefix}{items[j][0]}", j + 1
                if j < len(items) and _is_plain_conv(items[j][1]):
                    chains[f"{prefix}{cname}"] = PruneChain(
                        f"{prefix}{cname}", bn, act, f"{prefix}{items[j][0]}"
                    )
    return chains


# --------------------------------------------------------------------------------------------
# Sample selection
# --------------------------------------------------------------------------------------------


def select_samples(labels: Sequence[int] | Tensor, samples: int) -> list[int]:
    """Indices of ``samples`` items from the most populous identities (the paper's choice).

    Identities are taken by decreasing image count (ties: lower label first), all images of
    one before the next, until ``samples`` indices are chosen (fewer if there are fewer items).
    """
    labels = [int(v) for v in (labels.tolist() if isinstance(labels, Tensor) else labels)]
    by_label: dict[int, list[int]] = {}
    for idx, lbl in enumerate(labels):
        by_label.setdefault(lbl, []).append(idx)
    order = sorted(by_label, key=lambda lbl: (-len(by_label[lbl]), lbl))
    chosen: list[int] = []
    for lbl in order:
        chosen.extend(by_label[lbl][: samples - len(chosen)])
        if len(chosen) >= samples:
            break
    return sorted(chosen)


def _as_float_images(images: Tensor) -> Tensor:
    if images.dtype == torch.uint8:
        return normalize(images)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating, got {images.dtype}")
    return images


def _dataset_labels(data: Any) -> list[int] | None:
    labels = getattr(data, "labels", None)
    if labels is None:
        return None
    if isinstance(labels, Tensor):
        labels = labels.tolist()
    return [int(v) for v in labels]


def _collect_images(data: Any, samples: int, pool: int) -> Tensor:
    """[samples, 3, H, W] float images chosen from ``data`` (see :func:`find_prunable`)."""
    if isinstance(data, Tensor):
        if data.dim() != 4:
            raise ValueError(f"images must be [N, 3, H, W], got shape {tuple(data.shape)}")
        return _as_float_images(data[:samples])
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        labels = _dataset_labels(data)
        if labels is None:
            labels = [int(data[i][1]) for i in range(min(len(data), pool))]
        idx = select_samples(labels, samples)
        return _as_float_images(torch.stack([torch.as_tensor(data[i][0]) for i in idx]))
    images: list[Tensor] = []
    labels_seen: list[int] = []
    for item in data:
        if isinstance(item, Tensor):
            batch, lbl = item, None
        elif isinstance(item, (tuple, list)) and len(item) >= 2:
            batch, lbl = item[0], item[1]
        else:
            raise TypeError("data must yield image batches or (images, labels) pairs")
        batch = torch.as_tensor(batch)
        if batch.dim() == 3:
            batch = batch[None]
        images.extend(batch.unbind(0))
        if lbl is None:
            labels_seen.extend(range(len(labels_seen), len(labels_seen) + batch.shape[0]))
        else:
            labels_seen.extend(int(v) for v in torch.as_tensor(lbl).reshape(-1).tolist())
        if len(images) >= pool:
            break
    if not images:
        raise ValueError("data yielded no images")
    idx = select_samples(labels_seen[: len(images)], samples)
    return _as_float_images(torch.stack([images[i] for i in idx]))


# --------------------------------------------------------------------------------------------
# find_prunable
# --------------------------------------------------------------------------------------------


def find_prunable(
    model: nn.Module,
    data: Tensor | Iterable[Any],
    *,
    layers: Sequence[str] | None = None,
    samples: int = 100,
    vote: float = 0.8,
    sum_threshold: float = 0.02,
    corr_threshold: float = 0.95,
    batch_size: int = 25,
    pool: int | None = None,
    device: torch.device | str | None = None,
    backend: str | None = None,
) -> dict[str, list[int]]:
    """Channels to prune by the voting rule of Diba & Khosravi (IASC 2023).

    For each of the ``samples`` images and each watched convolution, a filter is flagged when
    its output map is empty (``|sum| <= sum_threshold``) or redundant (correlation
    ``>= corr_threshold`` with a lower-index map of the same image); see
    :func:`craft_ext.feature_map_stats`. Filter c of layer L is pruned when
    ``votes[L][c] >= vote * n_images``, compared exactly in integers (``vote`` is read as the
    fraction it denotes, the nearest one with a denominator <= 10**6, so 0.55 of 100 images is
    55, not 55.00000000000001). Votes are
    counted and compared on the device (int64 [C] per layer); the flags of all layers are read
    back once at the end. At least one filter of each layer is always kept (the lowest-index
    one when every filter is flagged).

    Args:
        model: the trained network (put in eval mode for the pass, then restored).
        data: a tensor of images [N, 3, H, W] (the first ``samples`` are used), a dataset of
            ``(image, label)`` items (``samples`` images of the most populous identities, by
            its ``labels`` when it has them), or an iterable / DataLoader of
            ``(images, labels)`` batches (the first ``pool`` images are read and the most
            populous identities among them chosen). uint8 images get arcface normalisation.
        layers: conv names to examine, each at most once (default: every layer of
            :func:`prunable_layers`; a name outside it raises ``ValueError``).
        samples: number of images (the paper: 100).
        vote: fraction of images in which a filter must be flagged (the paper: 0.8), in (0, 1].
        sum_threshold, corr_threshold: the paper's 0.02 and 0.95.
        batch_size: images per forward pass.
        pool: images read from an iterable before choosing (default ``20 * samples``).
        device: where to run (default: the model's device).
        backend: backend of :func:`craft_ext.feature_map_stats`.

    Returns:
        ``{layer name: sorted channel indices}`` for every examined layer (possibly empty).
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(vote, (int, float)) or isinstance(vote, bool) or not 0.0 < vote <= 1.0:
        raise ValueError(f"vote must be in (0, 1], got {vote!r}")
    if isinstance(layers, str):
        raise TypeError(f"layers must be a sequence of layer names, not the str {layers!r}")
    chains = prunable_layers(model)
    names = list(chains) if layers is None else list(layers)
    modules = dict(model.named_modules())
    seen: set[str] = set()
    for name in names:
        if name not in modules:
            raise ValueError(f"layer {name!r} is not a module of the model")
        if not isinstance(modules[name], nn.Conv2d):
            raise ValueError(f"layer {name!r} is a {type(modules[name]).__name__}, not a Conv2d")
        if name not in chains:
            raise ValueError(
                f"layer {name!r} cannot be pruned (its output meets a residual addition or "
                f"does not feed a BN/activation/conv chain); prunable layers: "
                f"{_preview(list(chains))}"
            )
        if name in seen:
            raise ValueError(f"layer {name!r} is listed more than once in layers")
        seen.add(name)
    if not names:
        raise ValueError("no layers to examine (the model has no prunable conv chains)")

    images = _collect_images(data, samples, pool or 20 * samples)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)
    votes = {
        n: torch.zeros(modules[n].out_channels, dtype=torch.int64, device=device) for n in names
    }

    def make_hook(name: str):
        def hook(_mod: nn.Module, _inp: Any, out: Tensor) -> None:
            st = feature_map_stats(
                out,
                sum_threshold=sum_threshold,
                corr_threshold=corr_threshold,
                backend=backend,
            )
            votes[name] += (st.empty | st.redundant).sum(dim=0)

        return hook

    handles = [modules[n].register_forward_hook(make_hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, images.shape[0], batch_size):
                model(images[start : start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    need = _vote_threshold(vote, images.shape[0])
    # compared on the device; the one read-back, after all forward passes
    flags = torch.cat([votes[name] >= need for name in names]).cpu().tolist()
    plan: dict[str, list[int]] = {}
    start = 0
    for name in names:
        layer_flags = flags[start : start + votes[name].numel()]
        start += len(layer_flags)
        flagged = [c for c, f in enumerate(layer_flags) if f]
        if len(flagged) == len(layer_flags):
            flagged = flagged[1:]
        plan[name] = flagged
    return plan


def _vote_threshold(vote: float, n_images: int) -> int:
    """The least vote count ``k`` with ``k >= vote * n_images``, computed exactly.

    ``vote`` is taken as the fraction it stands for (the nearest one with a denominator of at
    most 10**6: 0.55 is 11/20, ``5 / 6`` is 5/6), not as its binary float value, whose product
    with ``n_images`` can land just above an integer (``0.55 * 100 == 55.00000000000001``).
    """
    frac = Fraction(vote).limit_denominator(10**6) * int(n_images)
    return -(-frac.numerator // frac.denominator)


def _preview(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}, ... ({len(names)} in all)]" if len(names) > limit else f"[{shown}]"


# --------------------------------------------------------------------------------------------
# prune
# --------------------------------------------------------------------------------------------


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _param(src: Tensor, data: Tensor) -> nn.Parameter:
    return nn.Parameter(data.clone(), requires_grad=src.requires_grad)


def _conv_like(conv: nn.Conv2d, weight: Tensor, bias: Tensor | None) -> nn.Conv2d:
    new = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=1,
        bias=bias is not None,
        padding_mode=conv.padding_mode,
        device=weight.device,
        dtype=weight.dtype,
    )
    new.weight = _param(conv.weight, weight)
    if bias is not None:  # sliced from conv.bias by the callers, so conv has a bias
        new.bias = _param(conv.bias, bias)  # type: ignore[arg-type]
    return new


def _prune_chain(model: nn.Module, chain: PruneChain, keep: Tensor) -> None:
    conv = model.get_submodule(chain.conv)
    assert isinstance(conv, nn.Conv2d)
    bias = None if conv.bias is None else conv.bias.detach()[keep]
    _set_module(model, chain.conv, _conv_like(conv, conv.weight.detach()[keep], bias))
    if chain.bn is not None:
        bn = model.get_submodule(chain.bn)
        assert isinstance(bn, nn.BatchNorm2d)
        new_bn = copy.deepcopy(bn)
        new_bn.num_features = int(keep.numel())
        if bn.affine:
            new_bn.weight = _param(bn.weight, bn.weight.detach()[keep])
            new_bn.bias = _param(bn.bias, bn.bias.detach()[keep])
        if bn.running_mean is not None and bn.running_var is not None:
            new_bn.running_mean = bn.running_mean[keep].clone()
            new_bn.running_var = bn.running_var[keep].clone()
        _set_module(model, chain.bn, new_bn)
    if chain.act is not None:
        act = model.get_submodule(chain.act)
        if isinstance(act, nn.PReLU) and act.num_parameters > 1:
            new_act = copy.deepcopy(act)
            new_act.num_parameters = int(keep.numel())
            new_act.weight = _param(act.weight, act.weight.detach()[keep])
            _set_module(model, chain.act, new_act)
    consumer = model.get_submodule(chain.consumer)
    assert isinstance(consumer, nn.Conv2d)
    cbias = None if consumer.bias is None else consumer.bias.detach()
    _set_module(
        model, chain.consumer, _conv_like(consumer, consumer.weight.detach()[:, keep], cbias)
    )


def prune(model: nn.Module, plan: Mapping[str, Sequence[int]]) -> nn.Module:
    """A physically smaller copy of ``model`` without the planned filters (``model`` untouched).

    For each ``{conv name: channels}`` in ``plan`` the output channels of the conv are removed
    together with the matching BatchNorm2d entries, per-channel PReLU slopes and input
    channels of the consuming conv (see :func:`prunable_layers`). Channels meeting a residual
    addition are never pruned: asking for one raises ``ValueError``. Parameters keep their
    dtype, device and ``requires_grad``; build optimizers after pruning.
    """
    if not isinstance(plan, Mapping):
        raise TypeError(f"plan must be a mapping {{layer: [channels]}}, got {type(plan).__name__}")
    chains = prunable_layers(model)
    keeps: dict[str, Tensor] = {}
    for name, channels in plan.items():
        if name not in chains:
            raise ValueError(
                f"layer {name!r} cannot be pruned (not a conv whose output feeds only a "
                f"BN/activation/conv chain; prunable: {list(chains)[:6]}...)"
            )
        conv = model.get_submodule(name)
        assert isinstance(conv, nn.Conv2d)
        drop = [int(c) for c in channels]
        n = conv.out_channels
        if len(set(drop)) != len(drop) or any(not 0 <= c < n for c in drop):
            raise ValueError(f"{name}: channels must be distinct indices in [0, {n}), got {drop}")
        if len(drop) >= n:
            raise ValueError(f"{name}: cannot prune all {n} channels")
        if not drop:  # nothing to remove: the chain is left as it is
            continue
        mask = torch.ones(n, dtype=torch.bool)
        mask[drop] = False
        keeps[name] = torch.arange(n)[mask].to(conv.weight.device)
    new = copy.deepcopy(model)
    for name, keep in keeps.items():
        _prune_chain(new, chains[name], keep)
    return new


# --------------------------------------------------------------------------------------------
# profile
# --------------------------------------------------------------------------------------------


def profile(model: nn.Module, input_size: int | Sequence[int] = 112) -> dict[str, int]:
    """Parameter count and FLOPs of one forward pass on a single image.

    ``input_size``: H (square), (H, W) or (C, H, W) (C defaults to 3). FLOPs count a
    multiply-add as 2: Conv2d ``2 * H_out W_out C_out (C_in / groups) kh kw`` (+ bias) and
    Linear ``2 * in * out`` (+ bias), collected with forward hooks. Returns ``params``,
    ``trainable_params``, ``macs`` and ``flops``.
    """
    size = (input_size,) if isinstance(input_size, int) else tuple(int(s) for s in input_size)
    if len(size) == 1:
        size = (3, size[0], size[0])
    elif len(size) == 2:
        size = (3, *size)
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"input_size must be H, (H, W) or (C, H, W), got {input_size!r}")
    macs = [0]
    biases = [0]

    def hook(mod: nn.Module, _inp: Any, out: Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            per_out = (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
            macs[0] += out.numel() * per_out
        elif isinstance(mod, nn.Linear):
            macs[0] += out.numel() * mod.in_features
        if getattr(mod, "bias", None) is not None:
            biases[0] += out.numel()

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *size), device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "macs": macs[0],
        "flops": 2 * macs[0] + biases[0],
    }


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------


def save_pruned(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    network: str,
    options: Mapping[str, Any],
    plan: Mapping[str, Sequence[int]],
) -> None:
    """Save a pruned iresnet: ``get_model(network, **options)`` pruned by ``plan`` rebuilds it."""
    atomic_save(
        {
            "format": PRUNED_FORMAT,
            "network": network,
            "options": dict(options),
            "plan": {k: [int(c) for c in v] for k, v in plan.items()},
            "state_dict": model.state_dict(),
        },
        path,
    )


def load_pruned(path: str | os.PathLike[str], map_location: Any = "cpu") -> nn.Module:
    """Rebuild and load a model saved by :func:`save_pruned` (strict state_dict load)."""
    obj = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(obj, dict) or obj.get("format") != PRUNED_FORMAT:
        raise ValueError(f"{path} is not a pruned craft_ext backbone ({PRUNED_FORMAT})")
    model = prune(get_model(obj["network"], **obj["options"]), obj["plan"])
    model.load_state_dict(obj["state_dict"], strict=True)
    return model
