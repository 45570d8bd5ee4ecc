"""Tests for craft_ext.analysis and the craft-analyze CLI (CPU only, small inputs)."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from craft_ext.analysis import (
    AnalysisError,
    census,
    filter_grid,
    filter_patterns,
    format_census,
    load_images,
    load_state_dict,
    load_trajectory,
    plot_trajectory,
    threshold_key,
    threshold_sweep,
)
from craft_ext.analysis.cli import main
from craft_ext.analysis.figures import filter_images, grid_figsize
from craft_ext.analysis.io import strip_common_prefix
from craft_ext.analysis.patterns import _handles
from craft_ext.analysis.plotting import (
    DEAD_FOLDED,
    DEAD_WEIGHT,
    MARKERS,
    QUALITATIVE,
    plural,
)

# filters planted inactive at 1e-3 only, and at both 1e-3 and 1e-6
WEAK = [3, 7, 40]  # max |w| = 5e-4
DEAD = [10, 11, 12, 63]  # max |w| in {0, 1e-7}
# channels planted dead through BatchNorm (gamma 1e-4, raw max |w| 5e-3) and by weight (zeros)
BN_DEAD = [2, 5, 11]
W_DEAD = [7]


def _conv1(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 3, 3, 3, generator=g) * 0.1
    w[:, 0, 0, 0] = 0.05 + w[:, 0, 0, 0].abs()  # every filter clearly active
    for i in WEAK:
        w[i] = torch.rand(3, 3, 3, generator=g) * 5e-4
        w[i, 0, 0, 0] = -5e-4
    for j, i in enumerate(DEAD):
        w[i] = 0.0
        if j % 2:
            w[i, 1, 1, 1] = 1e-7
    return w


def _state_dict() -> dict[str, torch.Tensor]:
    """conv1 without a BatchNorm after it (bn1 lacks running_var)."""
    layer1 = torch.randn(8, 64, 3, 3) * 0.05
    layer1[2] = 0
    return {
        "conv1.weight": _conv1(),
        "bn1.weight": torch.ones(64),
        "bn1.running_mean": torch.zeros(64),
        "bn1.num_batches_tracked": torch.tensor(3),
        "layer1.0.conv1.weight": layer1,
        "fc.weight": torch.zeros(10, 64),
    }


def _plant_channels(sd: dict[str, torch.Tensor], conv: str, bn: str) -> dict[str, torch.Tensor]:
    """``sd`` with BN_DEAD channels dead through BN (found by fold, not by weight) and W_DEAD
    channels zero (found by both)."""
    sd = {k: v.clone() for k, v in sd.items()}
    g = torch.Generator().manual_seed(1)
    sd[f"{bn}.running_var"].uniform_(0.5, 1.5, generator=g)
    sd[f"{bn}.weight"].uniform_(0.4, 1.0, generator=g)
    w = sd[f"{conv}.weight"]
    w.normal_(0.0, 0.1, generator=g)
    w[:, 0, 0, 0] = 0.05 + w[:, 0, 0, 0].abs()
    for i in BN_DEAD:
        w[i] = (torch.rand(w.shape[1:], generator=g) * 2 - 1) * 5e-3
        w[i, 0, 0, 0] = 5e-3
        sd[f"{bn}.weight"][i] = 1e-4
    for i in W_DEAD:
        w[i] = 0.0
    return sd


@pytest.fixture(scope="module")
def iresnet_sd() -> dict[str, torch.Tensor]:
    from craft_ext.models import get_model

    return _plant_channels(get_model("r18", width=0.25).state_dict(), "conv1", "bn1")


@pytest.fixture(scope="module")
def mbf_sd() -> dict[str, torch.Tensor]:
    from craft_ext.models import get_model

    sd = get_model("mbf", width=0.5).state_dict()
    return _plant_channels(sd, "layers.0.layers.0", "layers.0.layers.1")


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def _close(size: tuple[int, int], expected: tuple[float, float]) -> bool:
    """A PNG's size is figsize * dpi, up to rounding of a fractional pixel."""
    return all(abs(a - b) <= 1 for a, b in zip(size, expected, strict=True))


def _has_colour(path: Path, hex_colour: str, tol: int = 12) -> bool:
    rgb = np.asarray([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
    with Image.open(path) as img:
        px = np.asarray(img.convert("RGB"), dtype=int)
    return bool(np.any(np.abs(px - rgb).max(axis=-1) <= tol))


def _cli(*args: str) -> subprocess.CompletedProcess:
    """craft-analyze in a subprocess (what a user's shell sees)."""
    return subprocess.run(
        [sys.executable, "-m", "craft_ext.analysis.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# --------------------------------------------------------------------------------------------
# census: weight criterion (paper Table 1)
# --------------------------------------------------------------------------------------------


def test_threshold_key() -> None:
    assert threshold_key(1e-3) == "1e-3"
    assert threshold_key(1e-6) == "1e-6"
    assert threshold_key(2.5e-4) == "2.5e-4"
    assert threshold_key(0.0) == "0"


def _check_counts(res: dict) -> None:
    assert res["layer"] == "conv1.weight"
    assert res["filters"] == 64
    assert res["inactive_1e-3"] == len(WEAK) + len(DEAD)
    assert res["inactive_1e-6"] == len(DEAD)
    assert res["indices_1e-3"] == sorted(WEAK + DEAD)
    assert res["indices_1e-6"] == sorted(DEAD)


def test_census_state_dict_without_bn_folded_equals_weight() -> None:
    res = census(_state_dict())
    _check_counts(res)
    # bn1 keeps no running_var: not a BatchNorm to fold; folded keys equal the weight ones
    assert res["bn"] is None and res["prelu"] is None
    for k in ("1e-3", "1e-6"):
        assert res[f"indices_folded_{k}"] == res[f"indices_{k}"]
        assert res[f"inactive_folded_{k}"] == res[f"inactive_{k}"]
        assert res[f"fraction_folded_{k}"] == res[f"fraction_{k}"]
    assert res["folded_max_abs_min"] == res["max_abs_min"]
    assert "no BatchNorm after it" in format_census(res)


@pytest.mark.parametrize("prefix", ["module.", "backbone.", "module.backbone.", "_orig_mod."])
def test_census_prefixed_keys(prefix: str) -> None:
    sd = {prefix + k: v for k, v in _state_dict().items()}
    _check_counts(census(sd))


def test_census_backbone_inside_larger_module() -> None:
    sd = {"backbone." + k: v for k, v in _state_dict().items()}
    sd["head.weight"] = torch.randn(10, 512)
    _check_counts(census(sd))


def test_census_checkpoint_file_and_run_dir(tmp_path: Path) -> None:
    ckpt = {
        "format": "craft_ext.checkpoint.v1",
        "backbone": {"module." + k: v for k, v in _state_dict().items()},
        "head": {"weight": torch.randn(10, 512)},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 3,
        "step": 300,
        "config": {"network": "r18", "lr": 0.1},
    }
    path = tmp_path / "checkpoint_last.pt"
    torch.save(ckpt, path)
    _check_counts(census(path))
    _check_counts(census(str(tmp_path)))  # run directory without backbone.pth
    _check_counts(census(ckpt))  # already loaded
    torch.save(_state_dict(), tmp_path / "backbone.pth")
    assert load_state_dict(tmp_path).keys() == _state_dict().keys()


def test_census_module_and_all_layers() -> None:
    model = nn.Sequential()
    model.add_module("conv1", nn.Conv2d(3, 64, 3, bias=False))
    model.add_module("conv2", nn.Conv2d(64, 8, 3, bias=False))
    with torch.no_grad():
        model.conv1.weight.copy_(_conv1())
        model.conv2.weight[5] = 0
    res = census(model, all_layers=True)
    _check_counts(res)
    layers = {e["layer"]: e for e in res["layers"]}
    assert set(layers) == {"conv1.weight", "conv2.weight"}
    assert layers["conv2.weight"]["inactive_1e-3"] == 1
    assert res["total_filters"] == 72
    assert res["total_inactive_1e-6"] == len(DEAD) + 1
    assert res["total_inactive_folded_1e-6"] == len(DEAD) + 1  # no BN anywhere


def test_census_explicit_layer_and_missing_layer() -> None:
    res = census(_state_dict(), layer="layer1.0.conv1.weight")
    assert res["inactive_1e-6"] == 1 and res["indices_1e-6"] == [2]
    # named with the wrapper prefix the loader stripped
    sd = {"module." + k: v for k, v in _state_dict().items()}
    assert census(sd, layer="module.layer1.0.conv1.weight")["indices_1e-6"] == [2]
    with pytest.raises(AnalysisError, match="no tensor"):
        census(_state_dict(), layer="nope.weight")


# --------------------------------------------------------------------------------------------
# census: folded criterion on real layouts (issue 11 item 4)
# --------------------------------------------------------------------------------------------


def _check_folded(res: dict, layer: str = "conv1.weight", bn: str = "bn1", prelu: str = "prelu"):
    assert (res["layer"], res["bn"], res["prelu"]) == (layer, bn, prelu)
    # gamma 1e-4 with raw max |w| 5e-3: dead by fold, not by weight
    assert res["indices_1e-3"] == W_DEAD and res["inactive_1e-3"] == len(W_DEAD)
    assert res["indices_folded_1e-3"] == sorted(BN_DEAD + W_DEAD)
    assert res["inactive_folded_1e-3"] == len(BN_DEAD + W_DEAD)
    assert res["fraction_folded_1e-3"] == pytest.approx(4 / res["filters"])
    assert res["indices_1e-6"] == W_DEAD  # folded max is ~5e-3 * 1e-4 / ~1 = ~5e-7
    assert res["indices_folded_1e-6"] == sorted(BN_DEAD + W_DEAD)
    assert res["max_abs_min"] == 0.0 and res["folded_max_abs_min"] == 0.0


def _layouts(sd: dict[str, torch.Tensor]) -> dict[str, object]:
    return {
        "plain": sd,
        "module.": {"module." + k: v for k, v in sd.items()},
        "state_dict": {"state_dict": sd, "epoch": 4},
        "model": {"model": {"module." + k: v for k, v in sd.items()}, "optimizer": {}},
        "net_state_dict": {"net_state_dict": sd, "head_state_dict": {"w": torch.zeros(2)}},
        "backbone": {"backbone": sd, "step": 3},
        "encoder.": {"encoder." + k: v for k, v in sd.items()},
        "model.backbone.": {"model.backbone." + k: v for k, v in sd.items()},
        "nested": {"model": {"state_dict": {"module.student." + k: v for k, v in sd.items()}}},
        "with_head": {
            **{"backbone." + k: v for k, v in sd.items()},
            "head.weight": torch.zeros(10, 8),
        },
    }


LAYOUTS = list(_layouts({"fc.weight": torch.zeros(1)}))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_census_folded_iresnet_layouts(iresnet_sd: dict, layout: str) -> None:
    _check_folded(census(_layouts(iresnet_sd)[layout]))


def test_census_folded_file_all_layers_and_cli(
    iresnet_sd: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "model.pth"
    torch.save({"net_state_dict": {"encoder." + k: v for k, v in iresnet_sd.items()}}, path)
    res = census(path, all_layers=True)
    _check_folded(res)
    convs = [k for k, v in iresnet_sd.items() if v.dim() == 4]
    assert [e["layer"] for e in res["layers"]] == convs
    by = {e["layer"]: e for e in res["layers"]}
    assert by["layer1.0.conv1.weight"]["bn"] == "layer1.0.bn2"  # bn1 precedes conv1 in a block
    assert by["layer1.0.conv2.weight"]["bn"] == "layer1.0.bn3"
    assert all(e["bn"] is not None for e in res["layers"])
    assert res["total_inactive_folded_1e-3"] == len(BN_DEAD + W_DEAD)
    assert res["total_inactive_1e-3"] == len(W_DEAD)

    assert main(["census", str(path), "--json", "--all-layers"]) == 0
    out = json.loads(capsys.readouterr().out)
    _check_folded(out)
    assert len(out["layers"]) == len(convs)
    assert main(["census", str(path), "--all-layers"]) == 0
    text = capsys.readouterr().out
    assert "inactive by weight" in text and "inactive by folded" in text
    assert "BatchNorm bn1 folded in" in text and "layer1.0.bn2" in text


@pytest.mark.parametrize("prefix", ["", "module."])
def test_census_folded_mobilefacenet(mbf_sd: dict, prefix: str) -> None:
    res = census({prefix + k: v for k, v in mbf_sd.items()})
    _check_folded(res, "layers.0.layers.0.weight", "layers.0.layers.1", "layers.0.layers.2")


def test_census_conv_followed_by_other_width_bn_has_none() -> None:
    sd = {
        "stem.weight": torch.full((4, 3, 3, 3), 1e-2),
        "norm.weight": torch.full((8,), 1e-6),  # 8 channels: not the stem's
        "norm.bias": torch.zeros(8),
        "norm.running_mean": torch.zeros(8),
        "norm.running_var": torch.ones(8),
        "conv2.weight": torch.ones(8, 4, 3, 3),
    }
    res = census(sd, all_layers=True)
    assert res["layer"] == "stem.weight" and res["bn"] is None
    assert res["inactive_folded_1e-3"] == 0
    assert {e["layer"]: e["bn"] for e in res["layers"]} == {
        "stem.weight": None,
        "conv2.weight": None,
    }


def test_strip_common_prefix() -> None:
    assert strip_common_prefix(["encoder.conv1.weight", "encoder.bn1.weight"]) == "encoder."
    assert strip_common_prefix(["a.b.conv.weight", "a.b.bn.bias"]) == "a.b."
    assert strip_common_prefix(["conv1.weight"]) == ""  # a layer, not a wrapper
    assert strip_common_prefix(["conv1.weight", "conv1.bias"]) == ""
    assert strip_common_prefix(["layers.0.weight", "layers.1.weight"]) == ""  # a container
    assert strip_common_prefix(["features.0.weight", "features.0.bias"]) == ""
    assert strip_common_prefix(["net.layers.0.weight", "net.fc.weight"]) == "net."
    assert strip_common_prefix([]) == ""


# --------------------------------------------------------------------------------------------
# bad inputs: one line, exit status 2 (issue 14 item 11)
# --------------------------------------------------------------------------------------------


def test_bad_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        census(missing)
    assert main(["census", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "craft-analyze census: error" in err and "missing.pth" in err

    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main(["census", str(empty)]) == 2
    assert "without a checkpoint" in capsys.readouterr().err

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    assert main(["grid", str(junk), "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert "cannot load" in err and "junk.pth" in err and len(err.strip().splitlines()) == 1

    (tmp_path / "torn.pth").write_bytes(b"PK\x03\x04 truncated zip")
    assert main(["census", str(tmp_path / "torn.pth")]) == 2
    err = capsys.readouterr().err
    assert "torn.pth" in err and len(err.strip().splitlines()) == 1

    torch.save({"epoch": 3}, tmp_path / "noweights.pt")
    with pytest.raises(AnalysisError, match="noweights.pt.*expected a state dict"):
        census(tmp_path / "noweights.pt")

    assert main(["trajectory", str(empty), "--out", str(tmp_path / "t.png")]) == 2
    assert "filter_stats.jsonl" in capsys.readouterr().err

    torch.save(_state_dict(), tmp_path / "backbone.pth")
    out = tmp_path / "no_such_dir" / "g.png"
    assert main(["grid", str(tmp_path), "--out", str(out)]) == 2
    assert "output directory does not exist" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exc:  # usage error from argparse
        main(["census"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "required: path" in err


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["census", "P", "--thresholds", "1e-3,-1e-6"], "--thresholds must be >= 0, got -1e-06"),
        (["grid", "P", "--out", "g.png", "--threshold", "-1e-3"], "--threshold must be >= 0"),
        (["patterns", "P", "--bandwidth", "0"], "--bandwidth must be > 0"),
        (["patterns", "P", "--bandwidth", "nan"], "--bandwidth must be > 0"),
        (["patterns", "P", "--quantile", "1.5"], "--quantile must be in (0, 1]"),
        (["patterns", "P", "--bandwidth", "wide"], "expected a number, got 'wide'"),
        (["trajectory", "R", "--out", "t.png", "--threshold", "-2"], "--threshold must be >= 0"),
        (["threshold", "P", "--data", "D", "--thetas", "-1e-3"], "--thetas must be >= 0"),
        (["grid", "P", "--out", "g.png", "--dpi", "-5"], "expected a positive integer, got -5"),
    ],
)
def test_bad_numbers_one_line(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse: the value does not parse
        code = exc.code
    assert code == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], captured.err
    assert lines[0].startswith(f"craft-analyze {args[0]}: error: ")
    assert captured.out == ""


def test_cli_errors_in_subprocess(tmp_path: Path) -> None:
    """What a shell user sees: one line on stderr, no traceback, exit status 2."""
    w, _ = _clustered_filters()
    path = tmp_path / "b.pth"
    torch.save({"conv1.weight": w}, path)
    _one_line_error(
        _cli("patterns", str(path), "--bandwidth", "-1"),
        "craft-analyze patterns: error:",
        "--bandwidth must be > 0",
    )
    # -1e-3 is a negative number, not an option (argparse alone would say "expected one argument")
    _one_line_error(
        _cli("patterns", str(path), "--threshold", "-1e-3"),
        "--threshold must be >= 0",
        "-0.001",
    )


# --------------------------------------------------------------------------------------------
# filter grid (Fig. 4)
# --------------------------------------------------------------------------------------------


def test_filter_images_per_filter_symmetric() -> None:
    w = np.zeros((3, 3, 2, 2))
    w[0, 0, 0, 0], w[0, 1, 1, 1] = 2.0, -1.0  # R +max, G -half
    w[2] = 1e-7  # tiny: scaled to its own max like any other
    img = filter_images(w)
    assert img.shape == (3, 2, 2, 3)
    assert img[0, 0, 0, 0] == 1.0 and img[0, 1, 1, 1] == 0.25 and img[0, 0, 1, 2] == 0.5
    assert np.all(img[1] == 0.5)  # all-zero filter: uniform mid grey
    assert np.allclose(img[2], 1.0)
    grey = filter_images(np.ones((2, 5, 3, 3)))  # not RGB: mean over channels, grey
    assert grey.shape == (2, 3, 3, 3) and np.all(grey == 1.0)


def test_grid_png_marks_and_order(iresnet_sd: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"module." + k: v for k, v in iresnet_sd.items()}, run / "backbone.pth")
    event = {"step": 5, "epoch": 0, "param": "conv1.weight", "method": "craft"}
    (run / "reactivations.jsonl").write_text(
        json.dumps({**event, "filters": [3, 4], "donors": [0, 1]})
        + "\n"
        + json.dumps({**event, "param": "layer1.0.conv1.weight", "filters": [9], "donors": [0]})
        + "\n"
    )
    out = tmp_path / "grid.png"
    res = filter_grid(run, out, dpi=40)
    n = iresnet_sd["conv1.weight"].shape[0]
    w, h = grid_figsize(n, 8)
    assert _close(_png_size(out), (w * 40, h * 40))
    assert h < 1.3 * (n / 8) + 1.5  # about an inch per filter row: no large blank margins
    assert res["bn"] == "bn1"
    assert res["inactive"] == W_DEAD and res["inactive_folded"] == sorted(BN_DEAD + W_DEAD)
    assert res["reactivated"] == [3, 4]  # another layer's event is not this layer's
    l1 = np.asarray(res["l1"])
    assert np.all(np.diff(l1) <= 0) and sorted(res["order"]) == list(range(n))
    assert res["order"][-1] == W_DEAD[0]  # the all-zero filter has the smallest L1
    assert _has_colour(out, DEAD_WEIGHT) and _has_colour(out, DEAD_FOLDED)

    res = filter_grid(iresnet_sd, out, reactivations=[1], cols=4, dpi=30, figsize=(4, 5))
    assert _png_size(out) == (120, 150) and res["reactivated"] == [1]
    res = filter_grid(_state_dict(), out, dpi=30)  # no BN: no folded marks
    assert res["bn"] is None and res["reactivated"] is None
    assert res["inactive"] == res["inactive_folded"] == sorted(WEAK + DEAD)
    assert set(res["order"][-len(DEAD) :]) == set(DEAD)


def test_grid_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(_state_dict(), tmp_path / "backbone.pth")
    out = tmp_path / "grid.png"
    assert main(["grid", str(tmp_path), "--out", str(out), "--dpi", "20", "--cols", "16"]) == 0
    w, h = grid_figsize(64, 16)
    assert _close(_png_size(out), (w * 20, h * 20))
    assert "wrote" in capsys.readouterr().out
    react = tmp_path / "r.jsonl"
    react.write_text(json.dumps({"param": "conv1.weight", "filters": [5]}) + "\n")
    args = ["grid", str(tmp_path / "backbone.pth"), "--out", str(out), "--dpi", "20"]
    assert main([*args, "--reactivations", str(react), "--threshold", "0"]) == 0
    assert main([*args, "--reactivations", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# unique patterns (Fig. 5)
# --------------------------------------------------------------------------------------------


def _clustered_filters(seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(4, 27, generator=g)
    protos = protos / protos.norm(dim=1, keepdim=True) * 0.5
    truth = np.repeat(np.arange(5), [16, 14, 12, 10, 12])  # label 4: inactive (zeros)
    w = torch.zeros(64, 27)
    for i, lab in enumerate(truth):
        if lab < 4:
            w[i] = protos[lab] + 0.005 * torch.randn(27, generator=g)
    perm = torch.randperm(64, generator=g)
    return w[perm].reshape(64, 3, 3, 3), truth[perm.numpy()]


def _same_partition(a: list[int], b: np.ndarray) -> bool:
    pairs = {(int(x), int(y)) for x, y in zip(a, b, strict=True)}
    return len(pairs) == len(set(a)) == len(set(b.tolist()))


def test_patterns_finds_clusters(tmp_path: Path) -> None:
    w, truth = _clustered_filters()
    out = tmp_path / "patterns.png"
    res = filter_patterns({"conv1.weight": w}, out=out, dpi=30)  # estimated bandwidth
    assert res["clusters"] == 5
    assert _same_partition(res["labels"], truth)
    assert list(res["cluster_sizes"].values()) == [16, 14, 12, 12, 10]  # 0 = largest
    assert len(res["inactive"]) == 12 and len(res["inactive_clusters"]) == 1
    assert res["bandwidth_rule"].startswith("0.5 x median pairwise distance of the 52 active")
    assert np.asarray(res["pca"]).shape == (64, 2)
    assert _png_size(out) == (300, 180)  # default figsize 10 x 6 in


@pytest.mark.parametrize("n", [32, 64])
def test_patterns_scattered_filters_are_not_one_pattern(n: int) -> None:
    """sklearn's estimate_bandwidth(quantile=0.2) merges N = 32 scattered 27-D filters into
    one pattern (the demo's report); the default rule keeps them apart."""
    w = torch.randn(n, 3, 3, 3, generator=torch.Generator().manual_seed(n)) * 0.1
    if n == 32:
        assert filter_patterns({"conv1.weight": w}, quantile=0.2)["clusters"] <= 2
    res = filter_patterns({"conv1.weight": w})
    assert res["clusters"] >= 0.75 * n


def test_patterns_legend_palette_and_folded(iresnet_sd: dict, tmp_path: Path) -> None:
    assert len(set(QUALITATIVE)) == 10
    styles = {(QUALITATIVE[k % 10], MARKERS[(k // 10) % len(MARKERS)]) for k in range(40)}
    assert len(styles) == 40
    w, truth = _clustered_filters()
    sd = {"conv1.weight": w[torch.from_numpy(truth != 4)]}  # no zeros: no inactive filter
    res = filter_patterns(sd, out=tmp_path / "p.png", dpi=20)
    assert res["inactive"] == [] and res["inactive_folded"] == []
    labels = [h.get_label() for h in _handles(res, np.asarray(res["labels"]), _masks(res, 52))]
    assert labels[0] == "pattern 0 (16 filters)" and not any("inactive" in t for t in labels)
    res = filter_patterns(iresnet_sd, out=tmp_path / "p.png", dpi=20)
    assert res["bn"] == "bn1" and res["inactive"] == W_DEAD
    assert res["inactive_folded"] == sorted(BN_DEAD + W_DEAD)
    masks = _masks(res, len(res["labels"]))
    labels = [h.get_label() for h in _handles(res, np.asarray(res["labels"]), masks)]
    assert any(t.startswith("inactive by weight") and t.endswith("(1)") for t in labels)
    assert any(t.startswith("dead through BN only") and t.endswith("(3)") for t in labels)


def _masks(res: dict, n: int) -> dict[str, np.ndarray]:
    w, f = np.zeros(n, bool), np.zeros(n, bool)
    w[res["inactive"]], f[res["inactive_folded"]] = True, True
    return {"weight": w, "folded_only": f & ~w}


def test_patterns_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    w, _ = _clustered_filters(1)
    torch.save({"module.conv1.weight": w}, tmp_path / "b.pth")
    out = tmp_path / "p.png"
    args = ["patterns", str(tmp_path / "b.pth"), "--json", "--out", str(out), "--dpi", "20"]
    assert main([*args, "--bandwidth", "0.2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["clusters"] == 5 and res["bandwidth"] == 0.2 and res["bandwidth_rule"] == "given"
    assert _png_size(out) == (200, 120)
    assert main(["patterns", str(tmp_path / "b.pth"), "--bandwidth", "0.01"]) == 0
    assert "unique patterns" in capsys.readouterr().out  # tiny bandwidth: patterns split
    assert main(["patterns", str(tmp_path / "b.pth"), "--quantile", "0.3", "--json"]) == 0
    assert "quantile=0.3" in json.loads(capsys.readouterr().out)["bandwidth_rule"]


def test_patterns_identical_filters() -> None:
    res = filter_patterns({"conv1.weight": torch.zeros(64, 3, 3, 3)})
    assert res["clusters"] == 1
    assert len(res["inactive"]) == 64


# --------------------------------------------------------------------------------------------
# threshold sweep (Eq. 1)
# --------------------------------------------------------------------------------------------


class StandIn(nn.Module):
    """Tiny face-embedding stand-in: conv1 -> BN -> PReLU -> conv -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU(64)
        self.conv2 = nn.Conv2d(64, 16, 3, stride=2, bias=False)
        self.fc = nn.Linear(16 * 4, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.prelu(self.bn1(self.conv1(x))))
        return self.fc(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


def _stand_in() -> StandIn:
    torch.manual_seed(0)
    m = StandIn()
    with torch.no_grad():
        w = _conv1()
        w[WEAK] = 0.0  # max |w| exactly 0: truly inactive
        m.conv1.weight.copy_(w)
        m.bn1.running_mean.uniform_(-0.1, 0.1)
        m.bn1.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _write_images(folder: Path, n: int, size: int = 16) -> None:
    rng = np.random.default_rng(0)
    (folder / "sub").mkdir(parents=True)
    for i in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        sub = folder / "sub" if i % 2 else folder
        Image.fromarray(arr).save(sub / f"img{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")


def test_threshold_sweep_folder(tmp_path: Path) -> None:
    _write_images(tmp_path / "imgs", 6)
    model = _stand_in()
    before = model.conv1.weight.detach().clone()
    thetas = [0.0, 1e-6, 1e-3, 0.2, 10.0]
    res = threshold_sweep(model, tmp_path / "imgs", thetas=thetas, n=5, size=(16, 16))
    assert res["images"] == 5 and res["layer"] == "conv1.weight"
    by = {r["theta"]: r for r in res["results"]}
    n_zero = len(WEAK) + len(DEAD)
    # the filters with max|w| exactly 0 are zeroed at every theta >= 0: nothing changes
    assert by[0.0]["cos_min"] == pytest.approx(1.0, abs=1e-12)
    assert by[0.0]["zeroed"] == n_zero - 2  # DEAD[1] and DEAD[3] hold 1e-7
    for t in (1e-6, 1e-3):  # the 1e-7 / 5e-4 filters are inactive too
        assert by[t]["cos_min"] == pytest.approx(1.0, abs=1e-6)
    assert by[1e-3]["zeroed"] == n_zero and by[1e-3]["indices"] == sorted(WEAK + DEAD)
    assert by[0.2]["zeroed"] > n_zero and by[0.2]["cos_mean"] < 1.0 - 1e-6
    assert by[10.0]["zeroed"] == 64
    assert torch.equal(model.conv1.weight, before)  # weights restored


def test_load_images_normalisation_and_bin(tmp_path: Path) -> None:
    blobs = []
    for v in (0, 255, 128, 64):  # two pairs
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (v, v, v)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    path = tmp_path / "lfw.bin"
    for protocol in (2, 4, 5):
        with open(path, "wb") as f:
            pickle.dump((blobs, np.array([True, False])), f, protocol=protocol)
        x = load_images(path, n=2, size=(8, 8))
        assert x.shape == (2, 3, 8, 8)
        assert torch.all(x[0] == -1.0) and torch.all(x[1] == 1.0)
    assert load_images(path, n=10, size=(4, 4)).shape == (4, 3, 4, 4)  # resized

    evil = tmp_path / "evil.bin"
    with open(evil, "wb") as f:
        pickle.dump((blobs, types.SimpleNamespace()), f)
    with pytest.raises(AnalysisError, match="refusing to load"):
        load_images(evil)
    with pytest.raises(FileNotFoundError):
        load_images(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnalysisError, match="no readable images"):
        load_images(tmp_path / "empty")
    empty_bin = tmp_path / "empty.bin"
    with open(empty_bin, "wb") as f:
        pickle.dump(([], []), f)
    with pytest.raises(AnalysisError, match="no readable images"):
        load_images(empty_bin)
    # only the first n images of a .bin are decoded: a broken image after them is never read
    with open(path, "wb") as f:
        pickle.dump((blobs[:2] + [b"not an image", blobs[3]], [True, False]), f)
    assert load_images(path, n=2, size=(8, 8)).shape == (2, 3, 8, 8)


def test_threshold_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CLI builds the network with craft_ext.models; a fake one serves the stand-in."""
    fake = types.ModuleType("craft_ext.models")
    fake.infer_network = lambda sd: ("standin", {})  # type: ignore[attr-defined]
    fake.get_model = lambda name, **kw: StandIn()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "craft_ext.models", fake)
    torch.save(_stand_in().state_dict(), tmp_path / "backbone.pth")
    _write_images(tmp_path / "imgs", 4)
    args = ["threshold", str(tmp_path), "--data", str(tmp_path / "imgs"), "-n", "4"]
    assert main([*args, "--input-size", "16", "--thetas", "1e-3,0.5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["images"] == 4
    assert res["results"][0]["cos_min"] == pytest.approx(1.0, abs=1e-12)
    assert res["results"][1]["cos_mean"] < 1.0
    assert main([*args, "--input-size", "16"]) == 0
    assert "cos mean" in capsys.readouterr().out
    assert main(["threshold", str(tmp_path), "--data", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_threshold_input_size_from_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """A network trained at 32 px (the demo: 64 px) is fed 32 px images without --input-size
    (issue 14 item 12: 112 px images crashed its fc layer)."""
    from craft_ext.models import get_model

    torch.manual_seed(0)
    torch.save(get_model("r18", width=0.25, input_size=32).state_dict(), tmp_path / "backbone.pth")
    _write_images(tmp_path / "imgs", 3, size=20)
    args = ["threshold", str(tmp_path), "--data", str(tmp_path / "imgs"), "-n", "3"]
    assert main([*args, "--thetas", "0,1e-3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["input_size"] == [32, 32] and res["images"] == 3
    assert res["results"][0]["cos_min"] == pytest.approx(1.0, abs=1e-9)


# --------------------------------------------------------------------------------------------
# trajectory (Fig. 2)
# --------------------------------------------------------------------------------------------


def _write_run(
    run: Path,
    epochs: int = 5,
    n: int = 64,
    steps_per_epoch: int = 20,
    every: int = 2,
    folded: bool = True,
) -> None:
    """A run log as craft-train writes it: "step" records every ``every`` steps (none for 0),
    "before" / "after" at epoch ends. Filters 1, 2, 3 decay below the threshold; 1 and 2 are
    reactivated at the end of epoch 2; channel 5's gamma decays (dead through BN only)."""
    run.mkdir()
    rng = np.random.default_rng(0)
    w = rng.uniform(0.05, 0.3, n)
    gamma = rng.uniform(0.3, 1.0, n)
    rate_w, rate_g = np.ones(n), np.ones(n)
    rate_w[[1, 2, 3]] = 0.8
    rate_g[5] = 0.8
    stats, events = [], []

    def record(ep: int, step: int, when: str) -> None:
        r = {"epoch": ep, "step": step, "layer": "conv1.weight", "when": when, "threshold": 1e-3}
        r.update(max_abs=w.tolist(), l1=(w * 10).tolist(), mean=[0.0] * n, std=(w / 2).tolist())
        if folded:
            r.update(folded_max_abs=(w * gamma).tolist(), folded_l1=(w * gamma * 10).tolist())
            r["bn_weight"] = gamma.tolist()
        stats.append(r)

    step = 0
    for ep in range(epochs):
        for _ in range(steps_per_epoch):
            step += 1
            w[:] = w * rate_w * rng.uniform(0.99, 1.012, n)
            gamma[:] = gamma * rate_g
            if every and step % every == 0:
                record(ep, step, "step")
        record(ep, step, "before")
        if ep == 2:
            w[[1, 2]] = w[[10, 11]]
            rate_w[[1, 2]] = 1.0
            events.append(
                {
                    "step": step,
                    "epoch": ep,
                    "param": "conv1.weight",
                    "method": "craft",
                    "filters": [1, 2],
                    "donors": [10, 11],
                }
            )
        record(ep, step, "after")
    stats.reverse()  # order on disk must not matter
    (run / "filter_stats.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stats))
    (run / "reactivations.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_trajectory_dense_and_folded(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_run(run)
    traj = load_trajectory(run)
    assert traj["dense"] and traj["x_axis"] == "step" and traj["threshold"] == 1e-3
    assert traj["max_abs"].shape == (60, 64) and traj["folded_max_abs"].shape == (60, 64)
    assert traj["when"][:12] == ["step"] * 10 + ["before", "after"]
    assert list(traj["step"][9:12]) == [20, 20, 20]
    # before and after an epoch end's reactivation sit at distinct x, in order
    assert traj["x"][10] == 20 and 20 < traj["x"][11] < 21
    assert np.all(np.diff(traj["x"]) >= 0)
    assert len(traj["reactivations"]) == 1

    out = tmp_path / "traj.png"
    res = plot_trajectory(run, out, dpi=60)
    assert _png_size(out) == (600, 450)  # default figsize 10 x 7.5 in
    assert res["dense"] and res["folded"] and res["records"] == 60 and res["threshold"] == 1e-3
    assert res["reactivated_filters"] == [1, 2] and res["reactivation_events"] == 1
    assert res["inactive_final"] == [3] and res["inactive_final_folded"] == [3, 5]
    assert _has_colour(out, DEAD_WEIGHT) and _has_colour(out, DEAD_FOLDED)


def test_trajectory_jump_rows(tmp_path: Path) -> None:
    from craft_ext.analysis.trajectory import _event_rows

    run = tmp_path / "run"
    _write_run(run)
    traj = load_trajectory(run)
    b, a = _event_rows(traj["reactivations"][0], traj)
    assert (traj["when"][b], traj["when"][a]) == ("before", "after")
    assert np.all(traj["max_abs"][a, [1, 2]] > 100 * traj["max_abs"][b, [1, 2]])  # the jump
    # a reactivation every N steps (no epoch-end pair): the records around its step
    b, a = _event_rows({"step": 31, "filters": [1]}, traj)
    assert (traj["step"][b], traj["step"][a]) == (30, 32)


def test_trajectory_epoch_ends_only(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_run(run, every=0, folded=False)
    traj = load_trajectory(run)
    assert not traj["dense"] and traj["folded_max_abs"] is None
    assert traj["max_abs"].shape == (10, 64)
    assert traj["when"][:2] == ["before", "after"]
    assert list(traj["epoch"][:4]) == [0, 0, 1, 1]
    assert traj["x"][0] < traj["x"][1] < traj["x"][2]

    out = tmp_path / "traj.png"
    res = plot_trajectory(run, out, dpi=20, threshold=1e-4)
    assert _png_size(out) == (200, 150)
    assert res["reactivated_filters"] == [1, 2] and not res["folded"]
    assert res["inactive_final"] == [3] and res["inactive_final_folded"] == []
    assert res["threshold"] == 1e-4

    # linear axes, the jsonl given directly, a torn last line and no reactivations file
    (run / "reactivations.jsonl").unlink()
    with open(run / "filter_stats.jsonl", "a") as f:
        f.write('{"epoch": 9, "ste')
    res = plot_trajectory(run / "filter_stats.jsonl", out, log=False, figsize=(6, 4), dpi=30)
    assert _png_size(out) == (180, 120)
    assert res["reactivated_filters"] == []


def test_trajectory_bad_inputs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match="filter_stats.jsonl"):
        load_trajectory(run)
    with pytest.raises(FileNotFoundError, match="no such run directory"):
        load_trajectory(tmp_path / "missing")
    (run / "filter_stats.jsonl").write_text('{"epoch": 0}\nnot json\n{"epoch": 1}\n')
    with pytest.raises(AnalysisError, match="line 2"):
        load_trajectory(run)
    (run / "filter_stats.jsonl").write_text("")
    with pytest.raises(AnalysisError, match="no records"):
        load_trajectory(run)


def test_trajectory_cli_and_plurals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (plural(1, "filter"), plural(0, "filter"), plural(2, "filter")) == (
        "1 filter",
        "0 filters",
        "2 filters",
    )
    run = tmp_path / "run"
    _write_run(run, epochs=3, n=16)
    out = tmp_path / "t.png"
    assert main(["trajectory", str(run), "--out", str(out), "--dpi", "20", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["filters"] == 16 and res["reactivated_filters"] == [1, 2]
    assert _png_size(out) == (200, 150)
    assert main(["trajectory", str(run), "--out", str(out), "--dpi", "20"]) == 0
    text = capsys.readouterr().out
    assert "1 reactivation event," in text and "records" in text


def test_help_lists_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("census", "threshold", "grid", "patterns", "trajectory"):
        assert cmd in text
    for cmd in ("census", "threshold", "grid", "patterns", "trajectory"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "usage: craft-analyze " + cmd in capsys.readouterr().out
