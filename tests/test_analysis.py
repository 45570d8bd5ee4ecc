"""Tests for craft_ext.analysis and the craft-analyze CLI (CPU only, small inputs)."""

from __future__ import annotations

import io
import json
import pickle
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
    load_images,
    load_state_dict,
    load_trajectory,
    plot_trajectory,
    threshold_key,
    threshold_sweep,
)
from craft_ext.analysis.cli import main

# filters planted inactive at 1e-3 only, and at both 1e-3 and 1e-6
WEAK = [3, 7, 40]  # max |w| = 5e-4
DEAD = [10, 11, 12, 63]  # max |w| in {0, 1e-7}


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


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


# --------------------------------------------------------------------------------------------
# census
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


def test_census_state_dict() -> None:
    _check_counts(census(_state_dict()))


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


def test_census_explicit_layer_and_missing_layer() -> None:
    res = census(_state_dict(), layer="layer1.0.conv1.weight")
    assert res["inactive_1e-6"] == 1 and res["indices_1e-6"] == [2]
    with pytest.raises(AnalysisError, match="no tensor"):
        census(_state_dict(), layer="nope.weight")


def test_census_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "backbone.pth"
    torch.save(_state_dict(), path)
    assert main(["census", str(path), "--json", "--all-layers"]) == 0
    out = json.loads(capsys.readouterr().out)
    _check_counts(out)
    assert {e["layer"] for e in out["layers"]} == {"conv1.weight", "layer1.0.conv1.weight"}
    assert main(["census", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "conv1.weight" in text and "inactive" in text


# --------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------


def test_bad_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        census(missing)
    assert main(["census", str(missing)]) == 1
    err = capsys.readouterr().err
    assert "craft-analyze census: error" in err and "missing.pth" in err

    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert main(["census", str(empty)]) == 1
    assert "without a checkpoint" in capsys.readouterr().err

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    assert main(["grid", str(junk), "--out", str(tmp_path / "g.png")]) == 1
    assert "cannot load" in capsys.readouterr().err

    torch.save({"epoch": 3}, tmp_path / "noweights.pt")
    with pytest.raises(AnalysisError, match="expected a state dict"):
        census(tmp_path / "noweights.pt")

    assert main(["trajectory", str(empty), "--out", str(tmp_path / "t.png")]) == 1
    assert "filter_stats.jsonl" in capsys.readouterr().err

    torch.save(_state_dict(), tmp_path / "backbone.pth")
    out = tmp_path / "no_such_dir" / "g.png"
    assert main(["grid", str(tmp_path), "--out", str(out)]) == 1
    assert "output directory does not exist" in capsys.readouterr().err

    with pytest.raises(SystemExit):  # usage error from argparse
        main(["census"])


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------


def test_grid_png(tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    res = filter_grid(_state_dict(), out, figsize=(8, 2.5), dpi=50)
    assert _png_size(out) == (400, 125)
    l1 = np.asarray(res["l1"])
    assert np.all(np.diff(l1) <= 0)  # strongest first
    assert set(res["order"][-len(DEAD) :]) == set(DEAD)
    assert sorted(res["order"]) == list(range(64))


def test_grid_cli_default_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(_state_dict(), tmp_path / "backbone.pth")
    out = tmp_path / "grid.png"
    assert main(["grid", str(tmp_path), "--out", str(out), "--dpi", "40"]) == 0
    assert _png_size(out) == (640, 200)  # default figsize 16 x 5 in
    assert "wrote" in capsys.readouterr().out


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
    res = filter_patterns({"conv1.weight": w}, out=out, dpi=50)  # estimated bandwidth
    assert res["clusters"] == 5
    assert _same_partition(res["labels"], truth)
    assert len(res["inactive"]) == 12 and len(res["inactive_clusters"]) == 1
    assert np.asarray(res["pca"]).shape == (64, 2)
    assert _png_size(out) == (400, 325)  # default figsize 8 x 6.5 in


def test_patterns_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    w, _ = _clustered_filters(1)
    torch.save({"module.conv1.weight": w}, tmp_path / "b.pth")
    out = tmp_path / "p.png"
    args = ["patterns", str(tmp_path / "b.pth"), "--json", "--out", str(out), "--dpi", "30"]
    assert main([*args, "--bandwidth", "0.2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["clusters"] == 5 and res["bandwidth"] == 0.2
    assert _png_size(out) == (240, 195)
    assert main(["patterns", str(tmp_path / "b.pth"), "--bandwidth", "0.01"]) == 0
    assert "unique patterns" in capsys.readouterr().out  # tiny bandwidth: patterns split


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
    assert main(["threshold", str(tmp_path), "--data", str(tmp_path / "nope")]) == 1
    assert "nope" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# trajectory
# --------------------------------------------------------------------------------------------


def _write_run(run: Path, epochs: int = 5, n: int = 64) -> None:
    run.mkdir()
    rng = np.random.default_rng(0)
    start = rng.uniform(0.05, 0.3, n)
    decay = np.ones(n)
    decay[[1, 2, 3]] = 1e-2  # these die quickly
    cur = start.copy()
    stats, events = [], []
    for ep in range(epochs):
        cur = cur * decay
        rec = {"epoch": ep, "step": (ep + 1) * 100, "layer": "conv1.weight"}
        stats.append(
            {
                **rec,
                "when": "before",
                "max_abs": cur.tolist(),
                "l1": (cur * 10).tolist(),
                "mean": [0.0] * n,
                "std": (cur / 2).tolist(),
            }
        )
        if ep == 2:  # reactivate filters 1 and 2 from donors 10 and 11
            cur[[1, 2]] = cur[[10, 11]]
            decay[[1, 2]] = 1.0
            events.append(
                {
                    "step": rec["step"],
                    "epoch": ep,
                    "param": "conv1.weight",
                    "method": "craft",
                    "filters": [1, 2],
                    "donors": [10, 11],
                }
            )
        stats.append(
            {
                **rec,
                "when": "after",
                "max_abs": cur.tolist(),
                "l1": (cur * 10).tolist(),
                "mean": [0.0] * n,
                "std": (cur / 2).tolist(),
            }
        )
    stats.reverse()  # order on disk must not matter
    (run / "filter_stats.jsonl").write_text("".join(json.dumps(s) + "\n" for s in stats))
    (run / "reactivations.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_trajectory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _write_run(run)
    traj = load_trajectory(run)
    assert traj["max_abs"].shape == (10, 64)
    assert traj["when"][:2] == ["before", "after"]
    assert list(traj["epoch"][:4]) == [0, 0, 1, 1]
    assert len(traj["reactivations"]) == 1

    out = tmp_path / "traj.png"
    res = plot_trajectory(run, out, dpi=40)
    assert _png_size(out) == (480, 320)  # default figsize 12 x 8 in
    assert res["reactivated_filters"] == [1, 2]
    assert res["inactive_final"] == [3]
    assert res["reactivation_events"] == 1 and res["records"] == 10

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


def test_trajectory_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    _write_run(run, epochs=3, n=16)
    out = tmp_path / "t.png"
    assert main(["trajectory", str(run), "--out", str(out), "--dpi", "20", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["filters"] == 16 and res["reactivated_filters"] == [1, 2]
    assert _png_size(out) == (240, 160)


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
