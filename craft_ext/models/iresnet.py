"""Improved ResNet (iresnet) backbones, checkpoint-compatible with insightface arcface_torch.

The module tree (and therefore every ``state_dict`` key and shape) matches insightface's
``recognition/arcface_torch/backbones/iresnet.py``, so a ``backbone.pth`` trained there loads
with ``load_state_dict(..., strict=True)`` into ``get_model("r50")`` etc.

Layout (``w`` = stage widths, 64/128/256/512 at ``width=1.0``)::

    conv1 (3x3, 3 -> w0, no bias) -> bn1 -> prelu
    layer1..layer4: IBasicBlock stacks, the first block of each stage has stride 2 and a
                    ``downsample = Sequential(conv1x1 stride 2, BatchNorm2d)``
    bn2 (BatchNorm2d w3) -> flatten -> dropout -> fc (Linear w3*7*7 -> num_features)
    features (BatchNorm1d, affine weight frozen at 1.0)

IBasicBlock: ``bn1 -> conv1 (3x3) -> bn2 -> prelu -> conv2 (3x3, stride) -> bn3`` plus the
identity (or downsample) shortcut.

Extensions over insightface, all off by default (defaults reproduce insightface exactly):

* ``residual_scale``: the residual branch is multiplied by a fixed float, or by a trainable
  scalar per block (``"trainable"``; TRSF of Peng et al., Neurocomputing 2020, initialised to
  ``trsf_init`` = 0.1). The trainable scalar adds a ``layerX.Y.residual_scale`` key.
* ``activation``: ``"prelu"`` (per-channel, initial slope ``negative_slope``, default 0.25;
  Peng et al. use 0.2), ``"leaky_relu"`` (slope ``negative_slope``, default 0.2) or ``"relu"``.
  The activation modules keep the attribute name ``prelu`` whatever their type, so checkpoint
  keys do not change.
* ``width`` / ``widths``: narrower networks for small CPU runs.
* ``input_size``: the ``fc`` input features follow the final feature-map size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "LAYERS",
    "IBasicBlock",
    "IResNet",
    "resolve_amp_dtype",
]

#: Blocks per stage for each supported depth.
LAYERS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
}

ACTIVATIONS = ("prelu", "leaky_relu", "relu")
BASE_WIDTHS = (64, 128, 256, 512)


def resolve_amp_dtype(fp16: bool | str | torch.dtype | None) -> torch.dtype | None:
    """Map the ``fp16`` option to an autocast dtype (None: no autocast region).

    ``False``/``None`` -> None; ``True``, ``"fp16"``, ``"float16"``, ``torch.float16`` ->
    ``torch.float16``; ``"bf16"``, ``"bfloat16"``, ``torch.bfloat16`` -> ``torch.bfloat16``.
    """
    if fp16 is None or fp16 is False:
        return None
    if fp16 is True:
        return torch.float16
    if isinstance(fp16, torch.dtype):
        if fp16 in (torch.float16, torch.bfloat16):
            return fp16
        if fp16 == torch.float32:
            return None
    elif isinstance(fp16, str):
        key = fp16.lower()
        if key in ("fp16", "float16", "half"):
            return torch.float16
        if key in ("bf16", "bfloat16"):
            return torch.bfloat16
        if key in ("fp32", "float32", "none", ""):
            return None
    raise ValueError(f"fp16 must be a bool, 'fp16', 'bf16' or a half dtype, got {fp16!r}")


def _make_activation(kind: str, channels: int, negative_slope: float | None) -> nn.Module:
    if kind == "prelu":
        slope = 0.25 if negative_slope is None else float(negative_slope)
        return nn.PReLU(channels, init=slope)
    if kind == "leaky_relu":
        slope = 0.2 if negative_slope is None else float(negative_slope)
        return nn.LeakyReLU(slope, inplace=True)
    if kind == "relu":
        return nn.ReLU(inplace=True)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation-style basic block of iresnet (insightface key layout).

    Args:
        inplanes: input channels.
        planes: output channels.
        stride: stride of ``conv2`` (and of the shortcut's 1x1 conv).
        downsample: shortcut module (``Sequential(conv1x1, BatchNorm2d)``) or None.
        activation: ``"prelu"``, ``"leaky_relu"`` or ``"relu"``.
        negative_slope: initial PReLU slope / LeakyReLU slope (None: 0.25 / 0.2).
        residual_scale: None (no scaling), a float (fixed factor) or ``"trainable"``.
        trsf_init: initial value of the trainable residual scale.
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        *,
        activation: str = "prelu",
        negative_slope: float | None = None,
        residual_scale: float | str | None = None,
        trsf_init: float = 0.1,
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = _make_activation(activation, planes, negative_slope)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample
        self.stride = stride
        self.fixed_scale: float | None = None
        if residual_scale == "trainable":
            self.residual_scale = nn.Parameter(torch.tensor(float(trsf_init)))
        elif residual_scale is None:
            self.residual_scale = None
        elif isinstance(residual_scale, (int, float)) and not isinstance(residual_scale, bool):
            self.residual_scale = None
            self.fixed_scale = float(residual_scale)
        else:
            raise ValueError(
                f"residual_scale must be None, a float or 'trainable', got {residual_scale!r}"
            )

    def forward(self, x: Tensor) -> Tensor:
        """Residual branch (optionally scaled) plus shortcut."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        if self.residual_scale is not None:
            out = out * self.residual_scale.to(out.dtype)
        elif self.fixed_scale is not None:
            out = out * self.fixed_scale
        return out + identity


def _out_size(n: int, stages: int = 4) -> int:
    # each stage: 3x3 conv, padding 1, stride 2 -> ceil(n / 2)
    for _ in range(stages):
        n = (n + 1) // 2
    return n


class IResNet(nn.Module):
    """iresnet backbone producing face embeddings.

    Args:
        layers: blocks per stage, e.g. ``(3, 4, 14, 3)`` for r50.
        num_features: embedding size (insightface's ``num_features``).
        width: multiplier of the stage widths 64/128/256/512 (1.0 keeps compatibility).
        widths: explicit stage widths, overriding ``width``.
        dropout: dropout probability before ``fc``.
        fp16: run the body under autocast (``True``/``"fp16"`` or ``"bf16"``); ``fc`` and
            ``features`` then run in float32. With ``False`` no autocast region is entered
            (an outer autocast, if any, applies).
        input_size: input height/width (int or pair); ``fc`` in-features follow it.
        activation: ``"prelu"`` (default), ``"leaky_relu"`` or ``"relu"``.
        negative_slope: initial PReLU slope (default 0.25) or LeakyReLU slope (default 0.2).
        residual_scale: None, a fixed float, or ``"trainable"`` (TRSF).
        trsf_init: initial TRSF value (0.1).
    """

    def __init__(
        self,
        layers: Sequence[int],
        *,
        num_features: int = 512,
        width: float = 1.0,
        widths: Sequence[int] | None = None,
        dropout: float = 0.0,
        fp16: bool | str | torch.dtype = False,
        input_size: int | Sequence[int] = 112,
        activation: str = "prelu",
        negative_slope: float | None = None,
        residual_scale: float | str | None = None,
        trsf_init: float = 0.1,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {layers!r}")
        if widths is None:
            if width <= 0:
                raise ValueError(f"width must be positive, got {width}")
            widths = tuple(max(1, int(round(b * width))) for b in BASE_WIDTHS)
        widths = tuple(int(c) for c in widths)
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"widths must be four positive ints, got {widths!r}")
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        h, w = (int(s) for s in input_size)
        self.layers = tuple(int(n) for n in layers)
        self.widths = widths
        self.input_size = (h, w)
        self.num_features = int(num_features)
        self.amp_dtype = resolve_amp_dtype(fp16)
        self.fp16 = self.amp_dtype is not None
        self.fc_scale = _out_size(h) * _out_size(w)

        block_opts = {
            "activation": activation,
            "negative_slope": negative_slope,
            "residual_scale": residual_scale,
            "trsf_init": trsf_init,
        }
        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = _make_activation(activation, widths[0], negative_slope)
        inplanes = widths[0]
        for i, (planes, blocks) in enumerate(zip(widths, self.layers, strict=True)):
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, kernel_size=1, stride=2, bias=False),
                nn.BatchNorm2d(planes, eps=1e-5),
            )
            stage = [IBasicBlock(inplanes, planes, 2, downsample, **block_opts)]
            stage += [IBasicBlock(planes, planes, 1, None, **block_opts) for _ in range(1, blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-5)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(widths[3] * self.fc_scale, self.num_features)
        self.features = nn.BatchNorm1d(self.num_features, eps=1e-5)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1.0)
                nn.init.constant_(m.bias, 0.0)

    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def _body(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.prelu(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.bn2(x)
        x = torch.flatten(x, 1)
        return self.dropout(x)

    def forward(self, x: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` -> embeddings ``[B, num_features]`` (not normalised)."""
        if self.amp_dtype is None:
            return self.features(self.fc(self._body(x)))
        with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype):
            x = self._body(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.features(self.fc(x.float()))

    def extra_repr(self) -> str:
        return (
            f"layers={self.layers}, widths={self.widths}, input_size={self.input_size}, "
            f"num_features={self.num_features}, amp_dtype={self.amp_dtype}"
        )
