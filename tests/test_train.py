"""craft-train: configuration, data order, a short run, resume bit-identity, NaN guard, DDP."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
from helpers import spawn

from craft_ext.checkpoint import load_checkpoint
from craft_ext.train import EpochBatches, Trainer, TrainingDiverged, parse_config
from craft_ext.train.cli import main as train_main

TINY = [
    "--data",
    "toy:12:8",
    "--image-size",
    "32",
    "--width",
    "0.25",
    "--embedding-size",
    "16",
    "--batch-size",
    "16",
    "--workers",
    "0",
    "--no-progress",
    "--log-every",
    "2",
    "--plant-inactive",
    "5",
    "--lr",
    "0.05",
    "--val",
    "toy",
]


def tiny(tmp_path: Path, *extra: str) -> list[str]:
    return [*TINY, "--output", str(tmp_path), *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_config_defaults_file_and_errors(tmp_path, capsys):
    cfg = parse_config([])
    assert cfg.data == "toy" and cfg.width == 0.5 and cfg.image_size == 64  # the demo preset
    assert cfg.margin == (1.0, 0.0, 0.4) and cfg.reactivation == "craft"
    real = parse_config(["--data", str(tmp_path)])
    assert real.width == 1.0 and real.image_size == 112  # real data: insightface defaults
    conf = tmp_path / "c.toml"
    conf.write_text('network = "r34"\nlr = 0.02\nmargin = [1.0, 0.5, 0.0]\n')
    cfg = parse_config(["--config", str(conf), "--lr", "0.03"])
    assert cfg.network == "r34" and cfg.lr == 0.03 and cfg.margin == (1.0, 0.5, 0.0)
    (tmp_path / "bad.json").write_text('{"learning_rate": 1}')
    for argv, message in [
        (["--lr", "-1"], "lr must be > 0"),
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--sample-rate", "1.5"], "sample_rate must be in (0, 1]"),
        (["--config", str(tmp_path / "bad.json")], "unknown options ['learning_rate']"),
        (["--config", str(tmp_path / "missing.json")], "not found"),
        (["--reactivate-every", "0"], "reactivate_every must be >= 1"),
    ]:
        with pytest.raises(SystemExit) as err:
            parse_config(argv)
        assert err.value.code == 2
        assert message in capsys.readouterr().err


def test_epoch_batches_deterministic_sharded_resumable():
    full = list(EpochBatches(100, 8, seed=1, epoch=3))
    assert full == list(EpochBatches(100, 8, seed=1, epoch=3))
    assert full != list(EpochBatches(100, 8, seed=1, epoch=4))
    assert len(full) == 12 and all(len(b) == 8 for b in full)
    r0 = list(EpochBatches(100, 8, seed=1, epoch=3, rank=0, world=2))
    r1 = list(EpochBatches(100, 8, seed=1, epoch=3, rank=1, world=2))
    assert len(r0) == len(r1) == 6
    assert not set(sum(r0, [])) & set(sum(r1, []))
    assert list(EpochBatches(100, 8, seed=1, epoch=3, skip=5)) == full[5:]


def test_short_run_lowers_loss_and_writes_outputs(tmp_path, capsys):
    assert train_main(tiny(tmp_path, "--epochs", "3")) == 0
    out = capsys.readouterr().out
    assert "reactivated filters in total 5" in out
    steps = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
    epochs = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "epoch"]
    for key in ("step", "epoch", "loss", "lr", "inactive_filters", "reactivated", "images_per_s"):
        assert key in steps[0]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert len(epochs) == 3 and "val/toy/accuracy" in epochs[0]
    assert epochs[0]["inactive_filters"] == 5 and epochs[0]["reactivated"] == 5
    assert epochs[0]["inactive_after"] == 0
    stats = read_jsonl(tmp_path / "filter_stats.jsonl")
    assert {(s["epoch"], s["when"]) for s in stats} >= {(0, "before"), (0, "after")}
    assert len(stats[0]["max_abs"]) == 16  # width 0.25 -> 16 first-layer filters
    events = read_jsonl(tmp_path / "reactivations.jsonl")
    assert sum(len(e["filters"]) for e in events) == 5 and events[0]["param"] == "conv1.weight"
    for name in ("checkpoint_last.pt", "checkpoint_best.pt", "backbone.pth", "summary.json"):
        assert (tmp_path / name).is_file(), name
    assert any((tmp_path / "tb").iterdir())
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["epoch"] == 3 and ckpt["format"] == "craft_ext.checkpoint.v1"
    backbone = torch.load(tmp_path / "backbone.pth", weights_only=True)
    assert "conv1.weight" in backbone and "features.weight" in backbone


def test_resume_is_bit_identical(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train_main(tiny(straight, "--epochs", "2", "--dropout", "0.1")) == 0
    # interrupted mid-epoch 1 (12*8 = 96 images / 16 = 6 steps per epoch), then resumed
    assert train_main(tiny(split, "--epochs", "2", "--dropout", "0.1", "--max-steps", "8")) == 0
    assert load_checkpoint(split)["step"] == 8
    assert train_main(tiny(split, "--epochs", "2", "--dropout", "0.1", "--resume")) == 0
    a, b = load_checkpoint(straight), load_checkpoint(split)
    for key in a["backbone"]:
        assert torch.equal(a["backbone"][key], b["backbone"][key]), key
    for key in a["head"]:
        assert torch.equal(a["head"][key], b["head"][key]), key
    assert a["step"] == b["step"] == 12
    losses = [r["loss"] for r in read_jsonl(straight / "metrics.jsonl") if r["kind"] == "step"]
    resumed = [r["loss"] for r in read_jsonl(split / "metrics.jsonl") if r["kind"] == "step"]
    assert losses == resumed


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = parse_config(tiny(tmp_path, "--epochs", "3", "--log-every", "1"))
    trainer = Trainer(cfg)
    real_forward = trainer.head.forward

    def poisoned(emb, labels):
        loss = real_forward(emb, labels)
        return loss * float("nan") if trainer.step >= 8 else loss

    monkeypatch.setattr(trainer.head, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 9"):
        trainer.run()
    good = load_checkpoint(tmp_path)
    assert good["step"] == 6  # the epoch-0 checkpoint, not overwritten by the diverged run
    assert all(torch.isfinite(v).all() for v in good["backbone"].values() if v.is_floating_point())


def test_too_many_planted_filters_fail_before_training(tmp_path, capsys):
    assert train_main(tiny(tmp_path, "--plant-inactive", "1000")) == 2
    assert "plant_inactive 1000 exceeds" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint_last.pt").exists()  # no epoch was trained


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    cfg = parse_config(tiny(Path(out) / "run", "--epochs", "2", "--batch-size", "8"))
    trainer = Trainer(cfg)
    trainer.run()
    torch.save(
        {"backbone": trainer.backbone.state_dict(), "optimizer": trainer.optimizer.state_dict()},
        Path(out) / f"rank{rank}.pt",
    )
    assert trainer.owns_process_group
    trainer.close()  # frees DDP's Reducer, then ends the process group
    assert not torch.distributed.is_initialized()


def test_ddp_two_processes_end_identical(tmp_path):
    spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path / "run")))
    out = tmp_path / "run"
    r0 = torch.load(out / "rank0.pt", weights_only=True)
    r1 = torch.load(out / "rank1.pt", weights_only=True)
    # parameters (and so the reactivated filters) are identical on every rank; BN running
    # statistics are each rank's own until DDP broadcasts rank 0's at the next forward
    for key in r0["backbone"]:
        if "running_" in key or "num_batches_tracked" in key:
            continue
        assert torch.equal(r0["backbone"][key], r1["backbone"][key]), key
    events = read_jsonl(out / "run" / "reactivations.jsonl")
    assert sum(len(e["filters"]) for e in events) == 5


def test_lfw_view1_smoke(tmp_path, lfw_dir):
    args = [
        "--data",
        str(lfw_dir / "images"),
        "--identities",
        str(lfw_dir / "peopleDevTrain.txt"),
        "--val",
        f"{lfw_dir / 'pairsDevTest.txt'}:{lfw_dir / 'images'}",
        "--width",
        "0.125",
        "--embedding-size",
        "16",
        "--batch-size",
        "16",
        "--max-steps",
        "2",
        "--workers",
        "0",
        "--no-progress",
        "--log-every",
        "1",
        "--val-every",
        "2",
        "--output",
        str(tmp_path),
    ]
    assert train_main(args) == 0
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records[-1]["step"] == 2
    accuracy = [r for r in records if "val/pairsDevTest/accuracy" in r]
    assert accuracy and 0.0 <= accuracy[-1]["val/pairsDevTest/accuracy"] <= 1.0


def test_cli_help_and_bad_data(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        train_main(["--help"])
    assert err.value.code == 0 and "CRAFT" in capsys.readouterr().out
    assert train_main(["--data", str(tmp_path / "nope"), "--output", str(tmp_path)]) == 2
    assert "not 'toy', 'synthetic', an image folder" in capsys.readouterr().err
