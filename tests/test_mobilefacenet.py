"""Tests of craft_ext.models.mobilefacenet: arcface_torch-compatible MobileFaceNet (mbf).

The expected keys, shapes, key order, conv geometry and parameter counts below are written from
insightface's ``recognition/arcface_torch/backbones/mobilefacenet.py`` (``ConvBlock``,
``LinearBlock``, ``DepthWise``, ``Residual``, ``GDC``, ``MobileFaceNet``, ``get_mbf`` with
blocks (1, 4, 6, 2) / scale 2 and ``get_mbf_large`` with blocks (2, 8, 12, 4) / scale 4),
independently of craft_ext's code.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from craft_ext.models import (
    STEM_CONV,
    MobileFaceNet,
    available_models,
    first_conv,
    get_model,
    infer_network,
)

Spec = list[tuple[str, tuple[int, ...]]]
# (key of the conv weight, in, out, kernel, stride, padding, groups)
Geometry = list[tuple[str, int, int, int, int, int, int]]


class InsightfaceLayout:
    """Ordered keys/shapes and conv geometry of arcface_torch's MobileFaceNet."""

    def __init__(
        self,
        blocks: tuple[int, int, int, int] = (1, 4, 6, 2),
        scale: int = 2,
        num_features: int = 512,
        gdc: int = 7,
    ) -> None:
        self.spec: Spec = []
        self.convs: Geometry = []
        c = 64 * scale
        self._block("layers.0", 3, c, 3, 2, 1, 1, prelu=True)
        if blocks[0] == 1:
            self._block("layers.1", c, c, 3, 1, 1, 64, prelu=True)
        else:
            self._residual("layers.1", c, blocks[0], 128)
        self._depthwise("layers.2", c, c, 128, 2)
        self._residual("layers.3", c, blocks[1], 128)
        self._depthwise("layers.4", c, 2 * c, 256, 2)
        self._residual("layers.5", 2 * c, blocks[2], 256)
        self._depthwise("layers.6", 2 * c, 2 * c, 512, 2)
        self._residual("layers.7", 2 * c, blocks[3], 256)
        self._block("conv_sep", 2 * c, 512, 1, 1, 0, 1, prelu=True)
        self._block("features.layers.0", 512, 512, gdc, 1, 0, 512, prelu=False)
        self.spec.append(("features.layers.2.weight", (num_features, 512)))  # Linear, no bias
        self._bn("features.layers.3", num_features)

    def _bn(self, prefix: str, n: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.spec.append((f"{prefix}.{name}", (n,)))
        self.spec.append((f"{prefix}.num_batches_tracked", ()))

    def _block(
        self, p: str, cin: int, cout: int, k: int, s: int, pad: int, g: int, *, prelu: bool
    ) -> None:
        """ConvBlock (conv, BN, PReLU) or LinearBlock (conv, BN)."""
        self.spec.append((f"{p}.layers.0.weight", (cout, cin // g, k, k)))
        self.convs.append((f"{p}.layers.0.weight", cin, cout, k, s, pad, g))
        self._bn(f"{p}.layers.1", cout)
        if prelu:
            self.spec.append((f"{p}.layers.2.weight", (cout,)))

    def _depthwise(self, p: str, cin: int, cout: int, hidden: int, stride: int) -> None:
        self._block(f"{p}.layers.0", cin, hidden, 1, 1, 0, 1, prelu=True)
        self._block(f"{p}.layers.1", hidden, hidden, 3, stride, 1, hidden, prelu=True)
        self._block(f"{p}.layers.2", hidden, cout, 1, 1, 0, 1, prelu=False)

    def _residual(self, p: str, c: int, n: int, hidden: int) -> None:
        for i in range(n):
            self._depthwise(f"{p}.layers.{i}", c, c, hidden, 1)


def _spec(model: nn.Module) -> Spec:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _meta(name: str, **options: object) -> MobileFaceNet:
    with torch.device("meta"):
        model = get_model(name, **options)
    assert isinstance(model, MobileFaceNet)
    return model


@pytest.mark.parametrize(
    ("name", "options", "layout"),
    [
        ("mbf", {}, {}),
        ("mbf_large", {}, {"blocks": (2, 8, 12, 4), "scale": 4}),
        ("mbf", {"scale": 1}, {"scale": 1}),
        ("mbf", {"num_features": 128, "input_size": 48}, {"num_features": 128, "gdc": 3}),
    ],
)
def test_keys_shapes_order_and_geometry_match_insightface(
    name: str, options: dict, layout: dict
) -> None:
    model = _meta(name, **options)
    expected = InsightfaceLayout(**layout)
    assert _spec(model) == expected.spec  # same keys, same shapes, same order
    convs = [
        (f"{n}.weight", m.in_channels, m.out_channels)
        + (m.kernel_size[0], m.stride[0], m.padding[0], m.groups)
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    assert convs == expected.convs
    for m in model.modules():
        if isinstance(m, nn.Conv2d):  # square kernels, strides and paddings; no bias
            assert m.kernel_size[0] == m.kernel_size[1] and m.stride[0] == m.stride[1]
            assert m.padding[0] == m.padding[1] and m.bias is None


def test_mbf_hardcoded_facts() -> None:
    """get_model("mbf") at 112 px / 512 features, as arcface_torch's get_mbf builds it."""
    model = get_model("mbf")
    shapes = dict(_spec(model))
    assert len(shapes) == 333
    expected = {
        "layers.0.layers.0.weight": (128, 3, 3, 3),  # stem conv: 64 * scale filters
        "layers.0.layers.1.weight": (128,),  # stem BatchNorm2d
        "layers.0.layers.1.running_var": (128,),
        "layers.0.layers.2.weight": (128,),  # stem PReLU, one slope per channel
        "layers.1.layers.0.weight": (128, 2, 3, 3),  # groups=64 on 128 channels
        "layers.2.layers.0.layers.0.weight": (128, 128, 1, 1),
        "layers.2.layers.1.layers.0.weight": (128, 1, 3, 3),
        "layers.3.layers.3.layers.2.layers.0.weight": (128, 128, 1, 1),
        "layers.4.layers.0.layers.0.weight": (256, 128, 1, 1),
        "layers.5.layers.5.layers.1.layers.2.weight": (256,),
        "layers.6.layers.0.layers.0.weight": (512, 256, 1, 1),
        "layers.6.layers.2.layers.0.weight": (256, 512, 1, 1),
        "layers.7.layers.1.layers.2.layers.1.bias": (256,),
        "conv_sep.layers.0.weight": (512, 256, 1, 1),
        "conv_sep.layers.2.weight": (512,),
        "features.layers.0.layers.0.weight": (512, 1, 7, 7),  # GDC depthwise 7x7
        "features.layers.0.layers.1.num_batches_tracked": (),
        "features.layers.2.weight": (512, 512),  # Linear(512, 512, bias=False)
        "features.layers.3.weight": (512,),  # BatchNorm1d
        "features.layers.3.num_batches_tracked": (),
    }
    for k, v in expected.items():
        assert shapes[k] == v, k
    assert "features.layers.2.bias" not in shapes and "layers.3.layers.4.layers.0" not in shapes
    assert not any(k.startswith("layers.8") or k.startswith("features.layers.1") for k in shapes)
    assert sum(p.numel() for p in model.parameters()) == 2_059_520
    assert sum(p.numel() for p in _meta("mbf_large").parameters()) == 6_314_880
    assert sum(p.numel() for p in _meta("mbf", scale=1).parameters()) == 1_200_512


def test_defaults_as_insightface() -> None:
    model = get_model("mbf", scale=1)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(m.eps == 1e-5 and m.momentum == 0.1 and m.affine for m in bns)
    assert all(m.weight.requires_grad for m in bns)
    prelus = [m for m in model.modules() if isinstance(m, nn.PReLU)]
    assert all(m.num_parameters > 1 and torch.all(m.weight == 0.25) for m in prelus)
    linear = model.features.layers[2]
    assert isinstance(linear, nn.Linear) and linear.bias is None
    assert isinstance(model.features.layers[3], nn.BatchNorm1d)
    w = model.layers[4].layers[0].layers[0].weight.detach()  # 1x1, 64 -> 256
    assert abs(float(w.std()) - (2 / 256) ** 0.5) < 0.01  # kaiming_normal_, fan_out, relu
    assert model.amp_dtype is None and not model.fp16
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


def test_strict_round_trip() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    sd = {}
    for k, shape in InsightfaceLayout(scale=1, gdc=3).spec:  # insightface names, 48 px
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(5)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[k] = 0.2 * torch.randn(shape, generator=g)
    model = get_model("mbf", scale=1, input_size=48)
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.stem_conv.weight, sd["layers.0.layers.0.weight"])
    again = get_model("mbf", scale=1, input_size=48)
    again.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again.eval()(x))


@pytest.mark.parametrize(("size", "kernel"), [(112, 7), (48, 3)])
def test_forward_shapes(size: int, kernel: int) -> None:
    torch.manual_seed(0)
    model = get_model("mbf", num_features=64, input_size=size, scale=1)
    assert model.features.layers[0].layers[0].kernel_size == (kernel, kernel)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 64) and out.dtype == torch.float32
    out.sum().backward()
    assert model.stem_conv.weight.grad is not None
    with torch.no_grad():
        model.eval()
        assert torch.isfinite(model(torch.randn(1, 3, size, size))).all()


@pytest.mark.parametrize(
    ("name", "options", "expected"),
    [
        ("mbf", {}, ("mbf", {"num_features": 512})),
        ("mbf", {"scale": 1}, ("mbf", {"scale": 1, "num_features": 512})),
        ("mbf_large", {}, ("mbf_large", {"num_features": 512})),
        ("mbf", {"num_features": 128, "input_size": 48}, None),
        ("mbf", {"blocks": (2, 1, 3, 1), "scale": 3, "input_size": (64, 48)}, None),
        (
            "mobilefacenet",
            {"width": 0.5, "num_features": 64},
            ("mbf", {"scale": 1, "num_features": 64}),
        ),
    ],
)
def test_infer_network_round_trip(name: str, options: dict, expected: tuple | None) -> None:
    with torch.device("meta"):
        sd = get_model(name, **options).state_dict()
    got = infer_network(sd)
    if expected is not None:
        assert got == expected
    assert infer_network({f"module.{k}": v for k, v in sd.items()}) == got
    with torch.device("meta"):
        rebuilt = get_model(got[0], **got[1])
    rebuilt.load_state_dict(sd, strict=True, assign=True)
    assert _spec(rebuilt) == [(k, tuple(v.shape)) for k, v in sd.items()]


def test_first_conv_and_stem_path() -> None:
    model = get_model("mbf", scale=1)
    stem = model.layers[0].layers[0]
    assert first_conv(model) is stem and model.stem_conv is stem
    assert model.get_submodule(STEM_CONV) is stem
    assert dict(model.named_parameters())[f"{STEM_CONV}.weight"] is stem.weight
    assert isinstance(model.layers[0].layers[1], nn.BatchNorm2d)
    assert isinstance(model.layers[0].layers[2], nn.PReLU)

    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    assert first_conv(Wrapper(model)) is stem


@pytest.mark.parametrize("dtype", ["bf16", torch.bfloat16])
def test_mixed_precision_head_float32(dtype: object) -> None:
    torch.manual_seed(0)
    ref = get_model("mbf", scale=1, input_size=48).eval()
    amp = get_model("mbf", scale=1, input_size=48, fp16=dtype).eval()
    amp.load_state_dict(ref.state_dict())
    assert amp.amp_dtype == torch.bfloat16 and amp.fp16
    seen: dict[str, torch.Tensor] = {}

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen["in"], seen["out"] = inp[0], out

    amp.conv_sep.register_forward_hook(hook)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        y, y_ref = amp(x), ref(x)
    assert seen["in"].dtype == torch.float32 and seen["out"].dtype == torch.float32
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert torch.all(nn.functional.cosine_similarity(y, y_ref, dim=1) > 0.95)


def test_fp16_option_values() -> None:
    assert get_model("mbf", scale=1, fp16=True).amp_dtype == torch.float16
    assert get_model("mbf", scale=1, fp16="fp16").amp_dtype == torch.float16
    assert get_model("mbf", scale=1, fp16=False).amp_dtype is None
    with pytest.raises(ValueError, match="fp16"):
        get_model("mbf", scale=1, fp16="int8")


def test_names_and_trainer_options() -> None:
    assert {"mbf", "mbf_large"} <= set(available_models())
    assert isinstance(_meta("MobileFaceNet"), MobileFaceNet)
    assert _meta("mobilefacenet_large").scale == 4
    trainer_defaults = {
        "widths": None,
        "dropout": 0.0,
        "activation": "prelu",
        "residual_scale": None,
    }
    model = _meta("mbf", width=1.0, num_features=256, input_size=64, **trainer_defaults)
    assert (model.scale, model.num_features, model.input_size) == (2, 256, (64, 64))
    assert _meta("mbf", width=0.5, **trainer_defaults).scale == 1
    assert _meta("mbf", width=2.0).scale == 4
    assert _meta("mbf_large", width=0.25).scale == 1
    assert _meta("mbf", width=1, scale=3).scale == 3


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dropout": 0.1}, "dropout"),
        ({"activation": "relu"}, "activation"),
        ({"widths": [16, 32, 64, 128]}, "widths"),
        ({"residual_scale": 0.5}, "residual_scale"),
        ({"residual_scale": "trainable"}, "residual_scale"),
        ({"negative_slope": 0.2}, "negative_slope"),
        ({"width": 0.25}, "width"),
        ({"width": 0.3}, "width"),
        ({"width": -1.0}, "width"),
        ({"input_size": 100}, "input_size"),
        ({"input_size": 8}, "input_size"),
        ({"blocks": (1, 0, 6, 2)}, "blocks"),
        ({"blocks": (1, 4, 6)}, "blocks"),
        ({"scale": 0}, "scale"),
        ({"scale": 1.5}, "scale"),
    ],
)
def test_bad_options(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        get_model("mbf", **options)
    assert "\n" not in str(err.value)


def test_infer_network_rejects_broken_mbf() -> None:
    with torch.device("meta"):
        sd = get_model("mbf").state_dict()
    bad = dict(sd)
    bad["layers.0.layers.0.weight"] = torch.empty(100, 3, 3, 3, device="meta")
    with pytest.raises(ValueError, match="multiple of 64"):
        infer_network(bad)
    missing = {k: v for k, v in sd.items() if not k.startswith("layers.7.")}
    with pytest.raises(ValueError, match="blocks"):
        infer_network(missing)
