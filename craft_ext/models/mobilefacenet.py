"""MobileFaceNet backbones (``mbf``, ``mbf_large``), checkpoint-compatible with arcface_torch.

The module tree (every ``state_dict`` key, its shape and the key order) follows insightface's
``recognition/arcface_torch/backbones/mobilefacenet.py`` (``get_mbf`` / ``get_mbf_large``), so a
``backbone.pth`` trained there with ``get_model("mbf")`` loads with ``strict=True`` into
``get_model("mbf")`` here and the other way round, and both compute the same function.

Layout (``c = 64 * scale``; ``scale`` is 2 for ``mbf``, 4 for ``mbf_large``, 1 for the classic
MobileFaceNet of Chen et al. 2018; ``blocks = (b0, b1, b2, b3)``)::

    layers.0  ConvBlock 3x3 stride 2, 3 -> c                      <- the stem (CRAFT watches it)
    layers.1  b0 == 1: ConvBlock 3x3, c -> c, groups 64
              b0 > 1:  Residual of b0 DepthWise(c -> c, hidden 128)
    layers.2  DepthWise stride 2, c -> c, hidden 128
    layers.3  Residual of b1 DepthWise(c -> c, hidden 128)
    layers.4  DepthWise stride 2, c -> 2c, hidden 256
    layers.5  Residual of b2 DepthWise(2c -> 2c, hidden 256)
    layers.6  DepthWise stride 2, 2c -> 2c, hidden 512
    layers.7  Residual of b3 DepthWise(2c -> 2c, hidden 256)
    conv_sep  ConvBlock 1x1, 2c -> 512
    features  GDC: layers.0 depthwise k x k conv (512 groups) + BatchNorm2d, layers.1 flatten,
              layers.2 Linear(512, num_features, bias=False), layers.3 BatchNorm1d

* ``ConvBlock``: ``layers = Sequential(Conv2d(bias=False), BatchNorm2d, PReLU(per channel))``;
  without the PReLU it is insightface's ``LinearBlock`` (``activation=False`` here).
* ``DepthWise``: ``layers = Sequential(ConvBlock 1x1 -> hidden, ConvBlock 3x3 depthwise
  (groups = hidden, the stride), LinearBlock 1x1 -> out)``; inside a ``Residual`` the input is
  added to the output. The hidden widths 128 / 256 / 512, the ``groups=64`` of ``layers.1``, the
  512 channels of ``conv_sep`` and of the GDC are fixed numbers in insightface, independent of
  ``scale``; they are kept so.
* BatchNorm layers use PyTorch's defaults (eps 1e-5, momentum 0.1), PReLU slopes start at 0.25,
  convolutions and the Linear are initialised Kaiming-normal (fan_out, ReLU gain) as in
  insightface. The BatchNorm1d of the head is affine and trainable (unlike iresnet's).

The stem: its convolution is ``model.layers[0].layers[0]`` (key ``layers.0.layers.0.weight``,
shape ``[64 * scale, 3, 3, 3]``; also ``model.stem_conv`` and :data:`STEM_CONV`), its
BatchNorm2d ``layers.0.layers.1`` and its PReLU ``layers.0.layers.2``. This convolution is what
CRAFT reactivates (``craft_ext.models.first_conv`` returns it).

Differences from insightface, none of which changes keys, shapes or the function computed with
default options:

* ``input_size`` (a multiple of 16): the GDC depthwise kernel is ``input_size // 16`` square
  (7 at 112 px, insightface's only size), so e.g. 48x48 inputs give a 3x3 kernel.
* ``fp16`` takes ``True``/``"fp16"`` or ``"bf16"`` (see :func:`resolve_amp_dtype`): the body
  ``layers`` runs under autocast on the input's device, ``conv_sep`` and ``features`` in float32
  as in insightface; with ``False`` no autocast region is entered.
* insightface's ``norm_output`` (never set by its ``get_model``) is not provided: the forward
  returns the unnormalised embedding only. There is no dropout (insightface has none).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .iresnet import resolve_amp_dtype

__all__ = [
    "MBF_PRESETS",
    "STEM_CONV",
    "ConvBlock",
    "DepthWise",
    "GDC",
    "MobileFaceNet",
    "Residual",
    "infer_mobilefacenet",
    "is_mobilefacenet_state_dict",
    "mobilefacenet",
]

#: ``(blocks, scale)`` of arcface_torch's ``get_mbf`` and ``get_mbf_large``.
MBF_PRESETS: dict[str, tuple[tuple[int, int, int, int], int]] = {
    "mbf": ((1, 4, 6, 2), 2),
    "mbf_large": ((2, 8, 12, 4), 4),
}

#: Attribute path of the stem convolution (its weight is ``STEM_CONV + ".weight"``).
STEM_CONV = "layers.0.layers.0"

_HEAD_CHANNELS = 512  # conv_sep output and GDC width, fixed in insightface


class ConvBlock(nn.Module):
    """``Conv2d(bias=False) -> BatchNorm2d -> PReLU`` under ``self.layers`` (insightface keys).

    Args:
        in_channels: input channels.
        out_channels: output channels (also the BatchNorm / PReLU size).
        kernel_size: square kernel size.
        stride: convolution stride.
        padding: convolution padding.
        groups: convolution groups.
        activation: append the per-channel PReLU; False gives insightface's ``LinearBlock``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int] = 1,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        *,
        activation: bool = True,
    ) -> None:
        super().__init__()
        parts: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
        ]
        if activation:
            parts.append(nn.PReLU(out_channels))
        self.layers = nn.Sequential(*parts)

    def forward(self, x: Tensor) -> Tensor:
        """Convolution, batch norm and (optionally) PReLU."""
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand, 3x3 depthwise (the stride), 1x1 linear projection.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        hidden: width of the depthwise part (insightface's ``groups`` argument).
        stride: stride of the depthwise convolution.
        residual: add the input to the output (requires ``stride == 1`` and equal widths).
    """

    def __init__(
        self, in_channels: int, out_channels: int, hidden: int, stride: int, residual: bool
    ) -> None:
        super().__init__()
        if residual and (stride != 1 or in_channels != out_channels):
            raise ValueError("a residual DepthWise needs stride 1 and in == out channels")
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_channels, hidden),
            ConvBlock(hidden, hidden, 3, stride=stride, padding=1, groups=hidden),
            ConvBlock(hidden, out_channels, activation=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Bottleneck output, plus the input when residual."""
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_blocks`` residual :class:`DepthWise` blocks of constant width under ``self.layers``.

    Args:
        channels: input = output channels.
        num_blocks: number of blocks.
        hidden: depthwise width of each block.
    """

    def __init__(self, channels: int, num_blocks: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            *(DepthWise(channels, channels, hidden, 1, True) for _ in range(num_blocks))
        )

    def forward(self, x: Tensor) -> Tensor:
        """The blocks in order."""
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise convolution head: ``[B, 512, kh, kw]`` -> ``[B, num_features]``.

    Args:
        num_features: embedding size.
        kernel_size: ``(kh, kw)``, the final feature-map size (7x7 at 112 px).
    """

    def __init__(self, num_features: int, kernel_size: tuple[int, int] = (7, 7)) -> None:
        super().__init__()
        c = _HEAD_CHANNELS
        self.layers = nn.Sequential(
            ConvBlock(c, c, kernel_size, groups=c, activation=False),
            nn.Flatten(1),
            nn.Linear(c, num_features, bias=False),
            nn.BatchNorm1d(num_features),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Depthwise conv + BN, flatten, linear, BatchNorm1d."""
        return self.layers(x)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(s) for s in size)
    return h, w


class MobileFaceNet(nn.Module):
    """arcface_torch MobileFaceNet producing face embeddings (see the module docstring).

    Args:
        num_features: embedding size.
        blocks: residual blocks of the four stages (``layers.1/3/5/7``); a first count of 1
            gives a grouped :class:`ConvBlock` instead of a :class:`Residual`, as in insightface.
        scale: main width multiplier: ``64 * scale`` stem filters, ``128 * scale`` in the last
            stages (2: ``mbf``, 4: ``mbf_large``, 1: the classic MobileFaceNet).
        fp16: run ``layers`` under autocast (``True``/``"fp16"`` or ``"bf16"``); ``conv_sep``
            and ``features`` then run in float32. ``False``: no autocast region is entered.
        input_size: input height/width (int or pair), multiples of 16; the GDC kernel is
            ``input_size // 16``.
    """

    def __init__(
        self,
        *,
        num_features: int = 512,
        blocks: Sequence[int] = MBF_PRESETS["mbf"][0],
        scale: int = MBF_PRESETS["mbf"][1],
        fp16: bool | str | torch.dtype = False,
        input_size: int | Sequence[int] = 112,
    ) -> None:
        super().__init__()
        blocks = tuple(int(b) for b in blocks)
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks must be four positive block counts, got {blocks!r}")
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale must be a positive int, got {scale!r}")
        size = _pair(input_size)
        if min(size) < 16 or any(s % 16 for s in size):
            raise ValueError(f"input_size must be a multiple of 16 (>= 16), got {input_size!r}")
        if int(num_features) < 1:
            raise ValueError(f"num_features must be positive, got {num_features!r}")
        self.blocks = blocks
        self.scale = scale
        self.input_size = size
        self.num_features = int(num_features)
        self.amp_dtype = resolve_amp_dtype(fp16)
        self.fp16 = self.amp_dtype is not None

        c = 64 * scale
        second: nn.Module
        if blocks[0] == 1:
            second = ConvBlock(c, c, 3, padding=1, groups=64)
        else:
            second = Residual(c, blocks[0], 128)
        self.layers = nn.Sequential(
            ConvBlock(3, c, 3, stride=2, padding=1),
            second,
            DepthWise(c, c, 128, 2, False),
            Residual(c, blocks[1], 128),
            DepthWise(c, 2 * c, 256, 2, False),
            Residual(2 * c, blocks[2], 256),
            DepthWise(2 * c, 2 * c, 512, 2, False),
            Residual(2 * c, blocks[3], 256),
        )
        self.conv_sep = ConvBlock(2 * c, _HEAD_CHANNELS)
        self.features = GDC(self.num_features, (size[0] // 16, size[1] // 16))

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def stem_conv(self) -> nn.Conv2d:
        """The first convolution (``layers.0.layers.0``), the layer CRAFT reactivates."""
        conv = self.get_submodule(STEM_CONV)
        assert isinstance(conv, nn.Conv2d)
        return conv

    def forward(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` -> embeddings ``[B, num_features]`` (not normalised)."""
        if self.amp_dtype is None:
            return self.features(self.conv_sep(self.layers(x)))
        with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype):
            x = self.layers(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.features(self.conv_sep(x.float()))

    def extra_repr(self) -> str:
        return (
            f"blocks={self.blocks}, scale={self.scale}, input_size={self.input_size}, "
            f"num_features={self.num_features}, amp_dtype={self.amp_dtype}"
        )


# Options craft_ext's trainer passes to every backbone: accepted at these (iresnet default)
# values and ignored, refused otherwise.
_IRESNET_ONLY: dict[str, Any] = {
    "widths": None,
    "dropout": 0.0,
    "activation": "prelu",
    "negative_slope": None,
    "residual_scale": None,
    "trsf_init": 0.1,
}


def _is_default(value: Any, default: Any) -> bool:
    if default is None:
        return value is None
    if isinstance(default, str):
        return isinstance(value, str) and value.lower() == default
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == default


def mobilefacenet(preset: str = "mbf", *, width: float = 1.0, **options: Any) -> MobileFaceNet:
    """Build ``"mbf"`` or ``"mbf_large"`` with craft_ext's common backbone options.

    Args:
        preset: a key of :data:`MBF_PRESETS` (its ``blocks`` and ``scale`` are the defaults).
        width: multiplier of ``scale`` (``scale * width`` must be a positive integer): with
            ``mbf`` (scale 2) ``width=0.5`` gives scale 1 (64 stem filters), ``width=2.0``
            scale 4. The fixed widths of insightface (hidden 128/256/512, the 512-channel head)
            do not change.
        **options: keyword arguments of :class:`MobileFaceNet` (``num_features``, ``blocks``,
            ``scale``, ``fp16``, ``input_size``). The iresnet options ``widths`` (None),
            ``dropout`` (0.0), ``activation`` ("prelu"), ``negative_slope`` (None),
            ``residual_scale`` (None) and ``trsf_init`` (0.1) are accepted at those values and
            ignored.

    Raises:
        ValueError: unknown preset, a non-default iresnet-only option, or a ``width`` that does
            not give an integer scale.
    """
    if preset not in MBF_PRESETS:
        raise ValueError(f"unknown MobileFaceNet preset {preset!r}; known: {list(MBF_PRESETS)}")
    for name, default in _IRESNET_ONLY.items():
        if name in options:
            value = options.pop(name)
            if not _is_default(value, default):
                raise ValueError(
                    f"{preset} does not support {name}={value!r} (arcface_torch's MobileFaceNet "
                    f"has no such option); leave it at {default!r}"
                )
    blocks, scale = MBF_PRESETS[preset]
    options.setdefault("blocks", blocks)
    scale = options.pop("scale", scale)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
        raise ValueError(f"{preset}: width must be a positive number, got {width!r}")
    if width != 1:
        scaled = scale * width
        if not math.isclose(scaled, round(scaled), abs_tol=1e-9) or round(scaled) < 1:
            raise ValueError(
                f"{preset}: width={width!r} times scale={scale!r} is {scaled:g}, not a positive "
                "integer scale"
            )
        scale = int(round(scaled))
    return MobileFaceNet(scale=scale, **options)


_STEM_KEY = STEM_CONV + ".weight"
_REQUIRED_KEYS = (
    _STEM_KEY,
    "conv_sep.layers.0.weight",
    "features.layers.0.layers.0.weight",
    "features.layers.2.weight",
)
_BLOCK_KEY = re.compile(r"^layers\.([1357])\.layers\.(\d+)\.layers\.0\.layers\.0\.weight$")


def is_mobilefacenet_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether ``state_dict`` (prefixes already stripped) has the MobileFaceNet key layout."""
    return all(k in state_dict for k in _REQUIRED_KEYS)


def infer_mobilefacenet(state_dict: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]]:
    """``(name, options)`` for :func:`mobilefacenet` from a MobileFaceNet ``state_dict``.

    ``scale`` comes from the stem width (``64 * scale``), ``blocks`` from the DepthWise blocks
    of ``layers.1/3/5/7`` (a plain ``layers.1`` ConvBlock counts as 1), ``num_features`` from
    ``features.layers.2.weight`` and ``input_size`` from the GDC kernel (omitted for 7x7, i.e.
    112 px). The insightface presets are named ``"mbf"`` / ``"mbf_large"`` and their own blocks
    and scale are left out of ``options``.

    Raises:
        ValueError: the keys are not a MobileFaceNet's or the shapes are inconsistent.
    """
    if not is_mobilefacenet_state_dict(state_dict):
        raise ValueError("state_dict lacks layers.0.layers.0 / conv_sep / features.layers keys")
    stem = int(state_dict[_STEM_KEY].shape[0])
    scale, rem = divmod(stem, 64)
    if rem or scale < 1:
        raise ValueError(f"stem width {stem} is not a multiple of 64")
    counts = dict.fromkeys((1, 3, 5, 7), 0)
    for k in state_dict:
        m = _BLOCK_KEY.match(k)
        if m:
            stage = int(m.group(1))
            counts[stage] = max(counts[stage], int(m.group(2)) + 1)
    if "layers.1.layers.0.weight" in state_dict:  # plain ConvBlock: blocks[0] == 1
        counts[1] = 1
    blocks = tuple(counts.values())
    if min(blocks) < 1:
        raise ValueError(f"blocks per stage {blocks} found: a stage without blocks")

    options: dict[str, Any] = {}
    name = next((n for n, preset in MBF_PRESETS.items() if preset == (blocks, scale)), "mbf")
    if name == "mbf":
        if blocks != MBF_PRESETS["mbf"][0]:
            options["blocks"] = blocks
        if scale != MBF_PRESETS["mbf"][1]:
            options["scale"] = scale
    options["num_features"] = int(state_dict["features.layers.2.weight"].shape[0])
    kh, kw = (int(s) for s in state_dict["features.layers.0.layers.0.weight"].shape[2:])
    if (kh, kw) != (7, 7):
        options["input_size"] = 16 * kh if kh == kw else (16 * kh, 16 * kw)
    return name, options
