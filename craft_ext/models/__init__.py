"""Face-recognition backbones, insightface-compatible: iresnet r18/r34/r50/r100/r200 and
MobileFaceNet ``mbf`` / ``mbf_large`` (arcface_torch's ``get_mbf`` / ``get_mbf_large``).

Quick use::

    from craft_ext.models import get_model, first_conv, infer_network

    net = get_model("r50")                                    # insightface defaults
    net.load_state_dict(torch.load("backbone.pth"), strict=True)
    conv = first_conv(net)                                    # what CRAFT reactivates

    small = get_model("r18", width=0.25, num_features=128)    # quick CPU runs
    name, options = infer_network(torch.load("backbone.pth"))  # ("r100", {...})
    net = get_model(name, **options)

    mbf = get_model("mbf", num_features=512)                   # arcface_torch get_mbf
    first_conv(mbf)                                            # mbf.layers[0].layers[0]
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from .iresnet import ACTIVATIONS, BASE_WIDTHS, LAYERS, IBasicBlock, IResNet, resolve_amp_dtype
from .mobilefacenet import (
    MBF_PRESETS,
    STEM_CONV,
    MobileFaceNet,
    infer_mobilefacenet,
    is_mobilefacenet_state_dict,
    mobilefacenet,
)

__all__ = [
    "ACTIVATIONS",
    "LAYERS",
    "MBF_PRESETS",
    "STEM_CONV",
    "IBasicBlock",
    "IResNet",
    "MobileFaceNet",
    "available_models",
    "first_conv",
    "get_model",
    "infer_network",
    "resolve_amp_dtype",
]

_ALIASES = (
    {f"iresnet{k[1:]}": k for k in LAYERS}
    | {f"ir{k[1:]}": k for k in LAYERS}
    | {"mobilefacenet": "mbf", "mobilefacenet_large": "mbf_large", "mbf-large": "mbf_large"}
)


def available_models() -> list[str]:
    """Names accepted by :func:`get_model`: the iresnet depths, then ``mbf`` and ``mbf_large``
    (aliases ``iresnetNN`` / ``irNN`` / ``mobilefacenet`` / ``mobilefacenet_large`` also work)."""
    return list(LAYERS) + list(MBF_PRESETS)


def get_model(name: str, **options: Any) -> IResNet | MobileFaceNet:
    """Build a backbone by name.

    Args:
        name: ``"r18"``, ``"r34"``, ``"r50"``, ``"r100"`` or ``"r200"`` (or ``"iresnet50"``...),
            ``"mbf"`` or ``"mbf_large"`` (or ``"mobilefacenet"`` / ``"mobilefacenet_large"``).
        **options: for iresnet, keyword arguments of :class:`IResNet`: ``num_features`` (512),
            ``width`` (1.0), ``widths`` (None), ``dropout`` (0.0), ``fp16`` (False; True,
            ``"fp16"`` or ``"bf16"``), ``input_size`` (112), ``activation`` (``"prelu"``),
            ``negative_slope`` (None: 0.25 for PReLU, 0.2 for LeakyReLU), ``residual_scale``
            (None | float | ``"trainable"``), ``trsf_init`` (0.1). For MobileFaceNet those of
            :func:`~craft_ext.models.mobilefacenet.mobilefacenet`: ``num_features``,
            ``blocks``, ``scale``, ``fp16``, ``input_size`` (a multiple of 16) and ``width``
            (multiplies ``scale``); the other iresnet options are accepted at their defaults
            only (ValueError otherwise).

    Returns:
        The backbone; with default options its ``state_dict`` matches insightface's exactly.
    """
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key in MBF_PRESETS:
        return mobilefacenet(key, **options)
    if key not in LAYERS:
        raise ValueError(f"unknown model {name!r}; available: {available_models()}")
    return IResNet(LAYERS[key], **options)


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def first_conv(model: nn.Module) -> nn.Conv2d:
    """Return the first convolution of ``model`` (the layer CRAFT reactivates).

    Unwraps ``DistributedDataParallel``/``DataParallel`` (``.module``) and ``torch.compile``
    (``._orig_mod``) wrappers; for an :class:`IResNet` this is ``model.conv1``, for a
    :class:`MobileFaceNet` the stem conv ``model.layers[0].layers[0]`` (:data:`STEM_CONV`),
    otherwise the first ``nn.Conv2d`` in registration order.
    """
    model = _unwrap(model)
    if isinstance(model, IResNet):
        return model.conv1
    if isinstance(model, MobileFaceNet):
        return model.stem_conv
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d")


_BLOCK_KEY = re.compile(r"^layer([1-4])\.(\d+)\.conv1\.weight$")


def _strip_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    sd = dict(state_dict)
    for prefix in ("module.", "_orig_mod.", "backbone."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def infer_network(state_dict: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]]:
    """Guess ``(name, options)`` for :func:`get_model` from an insightface-style state_dict.

    Depth comes from the block count of each stage, widths from the conv shapes, the embedding
    size from ``fc.weight``, the input size from ``fc`` in-features (``16 * s`` for a final
    ``s x s`` map; 112 for the usual 7x7), the trainable residual scale from
    ``layerX.Y.residual_scale`` keys and PReLU from ``prelu.weight``. Parameter-free choices
    cannot be recovered: a fixed residual scale is reported as None and a missing
    ``prelu.weight`` as ``"relu"``. ``module.``/``_orig_mod.`` prefixes are ignored.

    A MobileFaceNet state dict (keys ``layers.0.layers.0.weight``, ``conv_sep.*``,
    ``features.layers.*``) gives ``("mbf" | "mbf_large", options)``: ``scale`` from the stem
    width, ``blocks`` from the block counts, ``num_features`` from the head and
    ``input_size`` from the GDC kernel when it is not 7x7 (see
    :func:`~craft_ext.models.mobilefacenet.infer_mobilefacenet`).

    Returns:
        ``(name, options)`` such that ``get_model(name, **options).load_state_dict(sd)`` works.
    """
    sd = _strip_prefix(state_dict)
    if is_mobilefacenet_state_dict(sd):
        return infer_mobilefacenet(sd)
    counts = [0, 0, 0, 0]
    for k in sd:
        m = _BLOCK_KEY.match(k)
        if m:
            stage, idx = int(m.group(1)) - 1, int(m.group(2))
            counts[stage] = max(counts[stage], idx + 1)
    layers = tuple(counts)
    names = [n for n, lay in LAYERS.items() if lay == layers]
    if not names:
        raise ValueError(f"blocks per stage {layers} match no iresnet depth in {dict(LAYERS)}")
    if "conv1.weight" not in sd or "fc.weight" not in sd:
        raise ValueError("state_dict lacks conv1.weight / fc.weight: not an iresnet backbone")

    widths = tuple(int(sd[f"layer{i + 1}.0.conv1.weight"].shape[0]) for i in range(4))
    stem = int(sd["conv1.weight"].shape[0])
    if stem != widths[0]:
        raise ValueError(f"stem width {stem} != layer1 width {widths[0]}")
    width = stem / BASE_WIDTHS[0]
    options: dict[str, Any] = {}
    if width != 1.0 or widths != BASE_WIDTHS:
        if tuple(max(1, int(round(b * width))) for b in BASE_WIDTHS) == widths:
            options["width"] = width
        else:
            options["widths"] = widths

    fc = sd["fc.weight"]
    options["num_features"] = int(fc.shape[0])
    area, rem = divmod(int(fc.shape[1]), widths[3])
    side = int(round(area**0.5))
    if rem or side * side != area:
        raise ValueError(f"fc in-features {fc.shape[1]} are not {widths[3]} * s * s")
    if side != 7:
        options["input_size"] = 16 * side
    if "prelu.weight" not in sd:
        options["activation"] = "relu"
    if "layer1.0.residual_scale" in sd:
        options["residual_scale"] = "trainable"
    return names[0], options
