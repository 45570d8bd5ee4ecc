"""Tests of craft_ext.models: insightface-compatible iresnet backbones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from craft_ext.models import (
    IBasicBlock,
    IResNet,
    available_models,
    first_conv,
    get_model,
    infer_network,
)

DEPTHS = {
    "r18": [2, 2, 2, 2],
    "r34": [3, 4, 6, 3],
    "r50": [3, 4, 14, 3],
    "r100": [3, 13, 30, 3],
    "r200": [6, 26, 60, 6],
}


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {
        f"{prefix}.weight": (c,),
        f"{prefix}.bias": (c,),
        f"{prefix}.running_mean": (c,),
        f"{prefix}.running_var": (c,),
        f"{prefix}.num_batches_tracked": (),
    }


def insightface_shapes(
    layers: list[int], num_features: int = 512, fc_side: int = 7
) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of insightface arcface_torch ``backbones/iresnet.py`` (written from its
    module layout, independently of craft_ext)."""
    out: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 3, 3)}
    out |= _bn("bn1", 64)
    out["prelu.weight"] = (64,)
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip([64, 128, 256, 512], layers, strict=True), 1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            cin = inplanes if b == 0 else planes
            out |= _bn(f"{p}.bn1", cin)
            out[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
            out |= _bn(f"{p}.bn2", planes)
            out[f"{p}.prelu.weight"] = (planes,)
            out[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            out |= _bn(f"{p}.bn3", planes)
            if b == 0:  # every stage starts with stride 2 -> downsample
                out[f"{p}.downsample.0.weight"] = (planes, cin, 1, 1)
                out |= _bn(f"{p}.downsample.1", planes)
        inplanes = planes
    out |= _bn("bn2", 512)
    out["fc.weight"] = (num_features, 512 * fc_side * fc_side)
    out["fc.bias"] = (num_features,)
    out |= _bn("features", num_features)
    return out


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(DEPTHS))
def test_each_depth_builds(name: str) -> None:
    model = get_model(name, width=0.125, num_features=32)
    assert isinstance(model, IResNet)
    counts = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
    assert counts == DEPTHS[name]
    assert all(isinstance(b, IBasicBlock) for b in model.layer3)
    assert model.widths == (8, 16, 32, 64)


def test_available_models_and_aliases() -> None:
    assert available_models()[:5] == list(DEPTHS)
    assert get_model("iresnet18", width=0.125).layers == (2, 2, 2, 2)
    with pytest.raises(ValueError):
        get_model("r42")


@pytest.mark.parametrize("name", ["r18", "r50", "r100"])
def test_state_dict_matches_insightface(name: str) -> None:
    with torch.device("meta"):
        model = get_model(name)
    assert _shapes(model) == insightface_shapes(DEPTHS[name])


def test_r50_hardcoded_shapes() -> None:
    with torch.device("meta"):
        shapes = _shapes(get_model("r50"))
    assert len(shapes) == 475
    expected = {
        "conv1.weight": (64, 3, 3, 3),
        "bn1.running_var": (64,),
        "prelu.weight": (64,),
        "layer1.0.downsample.0.weight": (64, 64, 1, 1),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.weight": (128,),
        "layer2.0.bn1.weight": (64,),
        "layer2.1.conv1.weight": (128, 128, 3, 3),
        "layer3.13.conv2.weight": (256, 256, 3, 3),
        "layer3.13.prelu.weight": (256,),
        "layer4.0.conv1.weight": (512, 256, 3, 3),
        "layer4.2.bn3.bias": (512,),
        "bn2.weight": (512,),
        "fc.weight": (512, 25088),
        "fc.bias": (512,),
        "features.weight": (512,),
        "features.bias": (512,),
        "features.num_batches_tracked": (),
    }
    for k, v in expected.items():
        assert shapes[k] == v, k
    assert "layer3.14.conv1.weight" not in shapes
    assert "layer2.1.downsample.0.weight" not in shapes
    n_params = sum(p.numel() for p in get_model("r50", width=1.0).parameters())
    assert n_params == 43_590_848  # insightface r50


def test_load_strict_from_insightface_names() -> None:
    shapes = insightface_shapes(DEPTHS["r18"])
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, s in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        else:
            sd[k] = torch.randn(s, generator=g) if s else torch.tensor(0.0)
    model = get_model("r18")
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.layer2[0].downsample[0].weight, sd["layer2.0.downsample.0.weight"])
    # r50 through the meta device (no memory), assign=True
    sd50 = {k: torch.empty(s, device="meta") for k, s in insightface_shapes(DEPTHS["r50"]).items()}
    with torch.device("meta"):
        m50 = get_model("r50")
    m50.load_state_dict(sd50, strict=True, assign=True)


def test_forward_shapes_r18_quarter_width() -> None:
    torch.manual_seed(0)
    model = get_model("r18", width=0.25).eval()
    assert model.fc.in_features == 128 * 7 * 7
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    model.train()
    out = model(torch.randn(3, 3, 112, 112))
    out.sum().backward()
    assert model.conv1.weight.grad is not None


def test_input_size_and_num_features() -> None:
    model = get_model("r18", width=0.125, num_features=64, input_size=96).eval()
    assert model.fc.in_features == 64 * 6 * 6
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, 64)
    rect = get_model("r18", width=0.125, input_size=(112, 96))
    assert rect.fc.in_features == 64 * 7 * 6


def test_insightface_defaults() -> None:
    model = get_model("r18", width=0.25)
    assert isinstance(model.prelu, nn.PReLU)
    assert torch.all(model.prelu.weight == 0.25)
    assert torch.all(model.layer1[0].prelu.weight == 0.25)
    assert model.features.eps == 1e-5 and model.bn2.eps == 1e-5
    assert torch.all(model.features.weight == 1.0)
    assert not model.features.weight.requires_grad
    assert model.dropout.p == 0.0
    assert not any("residual_scale" in k for k in model.state_dict())
    assert all(b.residual_scale is None and b.fixed_scale is None for b in model.layer1)
    w = get_model("r18").layer3[1].conv1.weight.detach()
    assert abs(float(w.std()) - 0.1) < 0.005
    assert model.amp_dtype is None


def test_activation_options() -> None:
    m = get_model("r18", width=0.125, negative_slope=0.2)
    assert torch.all(m.layer2[1].prelu.weight == 0.2)
    m = get_model("r18", width=0.125, activation="leaky_relu")
    assert isinstance(m.prelu, nn.LeakyReLU) and m.prelu.negative_slope == 0.2
    assert isinstance(m.layer4[0].prelu, nn.LeakyReLU)
    assert not any("prelu" in k for k in m.state_dict())
    m = get_model("r18", width=0.125, activation="relu")
    assert isinstance(m.layer1[0].prelu, nn.ReLU)
    with pytest.raises(ValueError):
        get_model("r18", width=0.125, activation="gelu")


def test_dropout_option() -> None:
    m = get_model("r18", width=0.125, dropout=0.4)
    assert m.dropout.p == 0.4


def test_trainable_residual_scale() -> None:
    m = get_model("r18", width=0.125, residual_scale="trainable")
    keys = [k for k in m.state_dict() if k.endswith("residual_scale")]
    assert len(keys) == 8 and "layer1.0.residual_scale" in keys
    for b in m.modules():
        if isinstance(b, IBasicBlock):
            assert isinstance(b.residual_scale, nn.Parameter)
            assert b.residual_scale.requires_grad
            assert b.residual_scale.item() == pytest.approx(0.1)
    m(torch.randn(2, 3, 112, 112)).sum().backward()
    assert m.layer2[1].residual_scale.grad is not None
    assert torch.isfinite(m.layer2[1].residual_scale.grad)
    m2 = get_model("r18", width=0.125, residual_scale="trainable", trsf_init=0.3)
    assert m2.layer1[1].residual_scale.item() == pytest.approx(0.3)


def test_block_residual_scaling() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 10, 10)
    plain = IBasicBlock(8, 8).eval()
    fixed = IBasicBlock(8, 8, residual_scale=0.5).eval()
    fixed.load_state_dict(plain.state_dict())
    with torch.no_grad():
        branch = plain.bn3(plain.conv2(plain.prelu(plain.bn2(plain.conv1(plain.bn1(x))))))
        assert torch.allclose(plain(x), x + branch, atol=1e-6)
        assert torch.allclose(fixed(x), x + 0.5 * branch, atol=1e-6)
    assert "residual_scale" not in fixed.state_dict()
    with pytest.raises(ValueError):
        IBasicBlock(8, 8, residual_scale="sometimes")


def test_fixed_residual_scale_keeps_keys() -> None:
    with torch.device("meta"):
        m = get_model("r50", residual_scale=0.2)
    assert _shapes(m) == insightface_shapes(DEPTHS["r50"])


@pytest.mark.parametrize("dtype", ["bf16", torch.bfloat16])
def test_mixed_precision_body_fc_float32(dtype: object) -> None:
    torch.manual_seed(0)
    ref = get_model("r18", width=0.125).eval()
    amp = get_model("r18", width=0.125, fp16=dtype).eval()
    amp.load_state_dict(ref.state_dict())
    assert amp.amp_dtype == torch.bfloat16 and amp.fp16
    x = torch.randn(2, 3, 112, 112)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen["fc"] = (inp[0], out)

    amp.fc.register_forward_hook(hook)
    with torch.no_grad():
        y, y_ref = amp(x), ref(x)
    assert seen["fc"][0].dtype == torch.float32 and seen["fc"][1].dtype == torch.float32
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    cos = torch.nn.functional.cosine_similarity(y, y_ref, dim=1)
    assert torch.all(cos > 0.95)


def test_fp16_option_values() -> None:
    assert get_model("r18", width=0.125, fp16=True).amp_dtype == torch.float16
    assert get_model("r18", width=0.125, fp16=False).amp_dtype is None
    with pytest.raises(ValueError):
        get_model("r18", width=0.125, fp16="int8")


def test_first_conv() -> None:
    m = get_model("r18", width=0.125)
    assert first_conv(m) is m.conv1

    class Wrapper(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

    assert first_conv(Wrapper(m)) is m.conv1
    seq = nn.Sequential(nn.Identity(), nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    assert first_conv(seq) is seq[1]
    with pytest.raises(ValueError):
        first_conv(nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("r18", {"width": 0.25}),
        ("r34", {"width": 0.125, "num_features": 128}),
        ("r18", {"width": 0.125, "residual_scale": "trainable"}),
        ("r18", {"width": 0.125, "input_size": 128}),
        ("r18", {"width": 0.3}),
        ("r18", {"widths": (8, 24, 40, 72)}),
        ("r18", {"width": 0.125, "activation": "relu"}),
    ],
)
def test_infer_network_round_trip(name: str, options: dict) -> None:
    model = get_model(name, **options)
    sd = model.state_dict()
    got_name, got = infer_network(sd)
    assert got_name == name
    rebuilt = get_model(got_name, **got)
    rebuilt.load_state_dict(sd, strict=True)
    assert rebuilt.widths == model.widths and rebuilt.fc_scale == model.fc_scale
    if "residual_scale" in options:
        assert got["residual_scale"] == "trainable"


@pytest.mark.parametrize("name", ["r50", "r100", "r200"])
def test_infer_network_full_size(name: str) -> None:
    with torch.device("meta"):
        sd = get_model(name).state_dict()
    assert infer_network(sd) == (name, {"num_features": 512})
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    assert infer_network(prefixed)[0] == name


def test_infer_network_rejects_unknown() -> None:
    with torch.device("meta"):
        sd = get_model("r18").state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("layer4.1.")}
    with pytest.raises(ValueError):
        infer_network(sd)
