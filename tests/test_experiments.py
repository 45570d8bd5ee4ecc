"""The die-off experiment driver end to end at its --quick size on LFW: runs, reuse of finished
runs, the issue's summary.json shape, runs.json, the table and the figures."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import REPO, lfw_path

sys.path.insert(0, str(REPO / "experiments"))
import die_off  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    lfw_dir = lfw_path()
    if not (lfw_dir / "images").is_dir():
        pytest.skip(f"LFW data not found at {lfw_dir}")
    out = tmp_path_factory.mktemp("die_off")
    argv = ["--quick", "--data", str(lfw_dir), "--out", str(out), "--seeds", "0"]
    argv += ["--arms", "none", "craft_folded", "--min-images", "12", "--jobs", "2"]
    assert die_off.main(argv) == 0
    return out, argv


def test_summary_has_the_issue_shape(quick_run):
    out, _ = quick_run
    summary = json.loads((out / "summary.json").read_text())
    cfg = summary["config"]
    assert cfg["plant_inactive"] == 0 and cfg["first_layer_filters"] == 8
    assert cfg["decay_budget"] > 0
    assert set(summary["arms"]) == {"none", "craft_folded"}
    for arm in summary["arms"].values():
        assert arm["seeds"] == [0]
        for key in ("dead_folded_final", "dead_weight_final", "reactivated_total", "redeaths"):
            assert len(arm[key]) == 1 and 0 <= arm[key][0] <= (8 if "dead" in key else 10**6)
        assert 0.0 <= arm["accuracy"][0] <= 1.0
    assert summary["arms"]["none"]["reactivated_total"] == [0]
    assert "vs_none" in summary["arms"]["craft_folded"]
    table = (out / "table.md").read_text()
    assert "| craft_folded | 1 |" in table and "| none | 1 |" in table
    for name in ("die_off_curves.png", "patterns.png", "trajectories_seed0.png"):
        assert (out / name).stat().st_size > 10_000, name


def test_runs_json_keeps_the_numbers_and_curves(quick_run):
    out, _ = quick_run
    runs = json.loads((out / "runs.json").read_text())
    assert set(runs) == {"none_s0", "craft_folded_s0"}
    summary = json.loads((out / "summary.json").read_text())
    for name, run in runs.items():
        assert run["accuracy"] == summary["arms"][run["arm"]]["accuracy"][0]
        curve = run["curve"]
        assert len(curve["step"]) == len(curve["dead_folded"]) == len(curve["dead_weight"]) > 2
        assert curve["dead_folded"][-1] == run["dead_folded_final"], name
        assert "path" not in run


def test_finished_runs_are_reused_and_other_configs_refused(quick_run):
    out, argv = quick_run
    stamp = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    assert len(stamp) == 2
    assert die_off.main(argv) == 0  # reuses both runs (and their cached evaluations)
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    with pytest.raises(SystemExit, match="another configuration"):
        die_off.main([*argv, "--lr", "0.05"])


def test_missing_data_is_one_line(tmp_path, capsys):
    assert die_off.main(["--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("die_off: --data") and "images not found" in err
