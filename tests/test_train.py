"""craft-train: configuration, data order, a short run, resume bit-identity, NaN guard, DDP."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import spawn

from craft_ext.checkpoint import load_checkpoint
from craft_ext.train import EpochBatches, Trainer, TrainingDiverged, build_parser, parse_config
from craft_ext.train.cli import main as train_main
from craft_ext.train.inputs import val_specs

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
    # the paper's rule on filters planted dead by weight (the demo's defaults are BN-aware;
    # test_demo_defaults_find_channels_dead_through_bn covers those)
    "--plant-through",
    "weight",
    "--criterion",
    "weight",
    "--lr",
    "0.05",
    "--val",
    "toy",
]


def tiny(tmp_path: Path, *extra: str) -> list[str]:
    return [*TINY, "--output", str(tmp_path), *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``craft-train ARGS`` in a subprocess (one thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "craft_ext.train.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2, exactly one line on stderr (no traceback) holding every needle."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def config_error(capsys, argv: list[str]) -> str:
    """The one-line error ``parse_config(argv)`` exits 2 with."""
    with pytest.raises(SystemExit) as err:
        parse_config(argv)
    assert err.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_config_defaults_file_and_errors(tmp_path, capsys):
    cfg = parse_config([])
    assert cfg.data == "toy" and cfg.width == 0.5 and cfg.image_size == 64  # the demo preset
    assert cfg.margin == (1.0, 0.0, 0.4) and cfg.reactivation == "craft"
    assert cfg.optimizer == "sgd" and cfg.grad_accum == 1 and cfg.lr == 0.1
    real = parse_config(["--data", str(tmp_path)])
    assert real.width == 1.0 and real.image_size == 112  # real data: insightface defaults
    assert val_specs(real) == [] and val_specs(cfg) == ["toy"]  # toy pairs only for toy data
    assert parse_config(["--val", "none"]).val == []
    adamw = parse_config(["--optimizer", "adamw"])
    assert adamw.lr == 1e-3 and adamw.weight_decay == 0.1  # arcface_torch's AdamW values
    assert parse_config(["--optimizer", "adamw", "--lr", "0.01"]).lr == 0.01
    conf = tmp_path / "c.toml"
    conf.write_text('network = "r34"\nlr = 0.02\nmargin = [1.0, 0.5, 0.0]\n')
    cfg = parse_config(["--config", str(conf), "--lr", "0.03"])
    assert cfg.network == "r34" and cfg.lr == 0.03 and cfg.margin == (1.0, 0.5, 0.0)
    (tmp_path / "bad.json").write_text('{"learning_rate": 1}')
    (tmp_path / "bad.toml").write_text('network = "r18"\nlr = 0.1\nepochs 3\n')
    (tmp_path / "broken.json").write_text('{\n  "lr": 0.1,\n  "epochs": 3,,\n}\n')
    (tmp_path / "typed.toml").write_text('network = "r18"\nlr = "fast"\n')
    for argv, message in [
        (["--lr", "-1"], "--lr must be > 0"),
        (["--lr", "-1e-3"], "--lr must be > 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--sample-rate", "1.5"], "--sample-rate must be in (0, 1]"),
        (["--config", str(tmp_path / "bad.json")], "unknown options ['learning_rate']"),
        (["--config", str(tmp_path / "missing.json")], "not found"),
        (["--config", str(tmp_path / "bad.toml")], f"{tmp_path / 'bad.toml'}, line 3"),
        (["--config", str(tmp_path / "broken.json")], f"{tmp_path / 'broken.json'}, line 3"),
        (["--config", str(tmp_path / "typed.toml")], "line 2: lr: expected a number, got 'fast'"),
        (["--reactivate-every", "0"], "--reactivate-every must be >= 1"),
        (["--threshold", "-1e-3"], "--threshold must be >= 0, got -0.001"),
        (["--margin", "1", "0", "5"], "M3 (additive cosine margin, CosFace 0.4) must be in [0, 1)"),
        (["--margin", "0", "0.5", "0"], "M1 (multiplicative angular margin) must be in [1, 4]"),
        (["--margin", "1", "-0.5", "0"], "M2 (additive angular margin, ArcFace 0.5)"),
        (["--margin", "1", "2", "0"], "must be in [0, pi/2)"),
        (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
        (["--min-images", "0"], "--min-images must be >= 1"),
        (["--grad-accum", "0"], "--grad-accum must be >= 1"),
        (["--optimizer", "adam"], "invalid choice: 'adam'"),
        (["--val", "toy", "none"], "--val none cannot be combined"),
    ]:
        assert message in config_error(capsys, argv), argv
    bad_toml = config_error(capsys, ["--config", str(tmp_path / "bad.toml")])
    assert "bad.toml, line 3, column" in bad_toml and "invalid TOML" in bad_toml


def test_help_shows_every_default(capsys):
    parser = build_parser()
    for action in parser._actions:
        if action.dest not in ("help", "config"):
            assert "(default: " in (action.help or ""), action.option_strings
    with pytest.raises(SystemExit) as err:
        train_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert err.value.code == 0 and "CRAFT" in text
    for shown in (
        "SGD momentum; AdamW's beta1 (default: 0.9)",
        "(default: 0.0005; 0.1 with adamw)",
        "linear warmup before the poly decay (default: 0.0)",
        "0 disables (default: 5.0)",
        "(default: 0.0)",  # dropout
        "skip identities with fewer images (default: 1)",
        "reactivation (default: 0)",  # seed
        "{sgd,adamw}",
        "--grad-accum",
    ):
        assert shown in text, shown


def test_cli_parse_errors_are_one_line(tmp_path):
    """The CLI end to end (a subprocess): a negative number is a value, then refused (the
    other parse errors take the same path: see test_config_defaults_file_and_errors)."""
    proc = run_cli("--threshold", "-1e-3", "--output", str(tmp_path / "run"))
    assert_one_line_error(proc, "--threshold must be >= 0, got -0.001")
    assert not (tmp_path / "run").exists()


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


def test_short_run_lowers_loss_and_writes_outputs(tmp_path, capsys, monkeypatch):
    said: list[tuple[int, str]] = []  # (the step when it was said, the line)
    real_say = Trainer.say

    def say(self, text):
        said.append((self.step, text))
        real_say(self, text)

    monkeypatch.setattr(Trainer, "say", say)
    assert train_main(tiny(tmp_path, "--epochs", "3")) == 0
    out = capsys.readouterr().out
    assert "reactivated filters in total 5" in out and "best accuracy: toy 0." in out
    # one table row per epoch, said as that epoch ended (not at the end of the run)
    rows = [(step, line.split()) for step, line in said if line.split()[0] in ("1", "2", "3")]
    assert [(step, cells[:2]) for step, cells in rows] == [
        (6, ["1", "6"]),
        (12, ["2", "12"]),
        (18, ["3", "18"]),
    ]
    assert said[0][1].split()[:3] == ["epoch", "step", "loss"] and "toy" in said[0][1]
    steps = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "step"]
    epochs = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "epoch"]
    for key in ("step", "epoch", "loss", "lr", "inactive_filters", "reactivated", "images_per_s"):
        assert key in steps[0]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert len(epochs) == 3 and "val/toy/accuracy" in epochs[0] and epochs[0]["loss"] > 0
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
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final"] is None and summary["skipped_images"]["count"] == 0


def test_max_steps_run_schedules_over_its_steps_and_reports_accuracy(tmp_path, capsys):
    # 3 epochs x 6 steps, stopped at 10: the schedule spans 10 steps, the run is verified
    assert train_main(tiny(tmp_path, "--epochs", "3", "--max-steps", "10", "--log-every", "1")) == 0
    out = capsys.readouterr().out
    assert "stopped by --max-steps at 10" in out
    lr = {r["step"]: r["lr"] for r in read_jsonl(tmp_path / "metrics.jsonl") if "lr" in r}
    assert math.isclose(lr[5], 0.05 * (1 - 5 / 10) ** 2) and lr[10] == 0.0
    end = [line for line in out.splitlines() if line.split()[:2] == ["end", "10"]]
    assert len(end) == 1 and float(end[0].split()[-1]) > 0.5  # the end row, with accuracy
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["final"]["step"] == 10
    assert summary["best"]["val/toy/accuracy"] >= summary["final"]["val/toy/accuracy"]
    assert load_checkpoint(tmp_path)["step"] == 10
    assert (tmp_path / "checkpoint_best.pt").is_file()


def _interrupt_at(monkeypatch, step: int) -> None:
    """Ctrl-C (a real SIGINT to this process) right after optimizer step ``step``."""
    real = Trainer.step_on

    def step_then_ctrl_c(self, batches):
        loss = real(self, batches)
        if self.step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(Trainer, "step_on", step_then_ctrl_c)


@pytest.mark.parametrize("accum", [1, 2])
def test_interrupted_run_resumes_bit_identically(tmp_path, capsys, monkeypatch, accum):
    straight, split = tmp_path / "straight", tmp_path / "split"
    args = ["--epochs", "2", "--dropout", "0.1"]
    if accum > 1:  # the same 16-image steps as two accumulated micro-batches of 8
        args += ["--grad-accum", str(accum), "--batch-size", str(16 // accum)]
    assert train_main(tiny(straight, *args)) == 0
    # Ctrl-C mid epoch 2 (12*8 = 96 images / 16 = 6 steps per epoch), then resumed
    with monkeypatch.context() as m:
        _interrupt_at(m, 8)
        assert train_main(tiny(split, *args)) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 8" in err and err.rstrip().endswith("--resume")
    assert load_checkpoint(split)["step"] == 8 and not (split / "summary.json").exists()
    assert train_main(tiny(split, *args, "--resume")) == 0
    out = capsys.readouterr().out
    assert f"resuming from {split} at step 8 (epoch 2 of 2, 2 of its 6 steps done)" in out
    a, b = load_checkpoint(straight), load_checkpoint(split)
    for key in a["backbone"]:
        assert torch.equal(a["backbone"][key], b["backbone"][key]), key
    for key in a["head"]:
        assert torch.equal(a["head"][key], b["head"][key]), key
    assert a["step"] == b["step"] == 12
    losses = [r["loss"] for r in read_jsonl(straight / "metrics.jsonl") if r["kind"] == "step"]
    resumed = [r["loss"] for r in read_jsonl(split / "metrics.jsonl") if r["kind"] == "step"]
    assert losses == resumed
    summaries = [json.loads((p / "summary.json").read_text()) for p in (straight, split)]
    assert summaries[0]["epochs"] == summaries[1]["epochs"]  # epoch losses too


def test_grad_accum_counts_optimizer_steps(tmp_path):
    one = Trainer(parse_config(tiny(tmp_path / "a", "--epochs", "2")))
    two = Trainer(parse_config(tiny(tmp_path / "b", "--epochs", "2", "--grad-accum", "2")))
    assert one.steps_per_epoch == 6 and two.steps_per_epoch == 3  # 96 images / (16 x 2)
    assert two.total_steps == 6 and two.decay_budget < one.decay_budget
    args = ["--epochs", "2", "--grad-accum", "2", "--batch-size", "8"]
    same = Trainer(parse_config(tiny(tmp_path / "c", *args)))
    assert same.steps_per_epoch == 6 and same.decay_budget == one.decay_budget


@pytest.mark.parametrize("criterion", ["weight", "folded"])
def test_adamw_runs_craft_through_a_reactivator(tmp_path, criterion):
    cfg = parse_config(
        tiny(tmp_path, "--epochs", "2", "--optimizer", "adamw", "--criterion", criterion)
    )
    trainer = Trainer(cfg)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.reactivator.optimizer is trainer.optimizer
    lrs = [0.05 * (1 - t / 12) ** 2 for t in range(12)]  # tiny's --lr, 2 epochs x 6 steps
    assert trainer.decay_budget == pytest.approx(sum(lrs) * 0.1)  # decoupled: no 1 / (1 - mu)
    summary = trainer.run()
    assert summary["reactivated_total"] == 5 and summary["best"]["val/toy/accuracy"] > 0.5
    epochs = summary["epochs"]
    assert epochs[0]["inactive_filters"] == 5 and epochs[0]["inactive_after"] == 0
    state = load_checkpoint(tmp_path)["optimizer"]
    assert "craft_reactivator" in state and "exp_avg" in state["state"][0]


def test_ctrl_c_in_a_terminal_saves_and_exits_130(tmp_path):
    """SIGINT to the whole process group, as a terminal sends it (loader workers included)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = tiny(tmp_path, "--epochs", "1000", "--workers", "1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "craft_ext.train.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        for line in proc.stdout:
            if line.split()[:1] == ["1"]:  # the first table row: an epoch has ended
                break
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "interrupted at step" in lines[0] and "resume with: craft-train" in lines[0]
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["step"] >= 6 and lines[0].split("interrupted at step ")[1].startswith(
        str(ckpt["step"])
    )


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
    assert train_main(tiny(tmp_path / "run", "--plant-inactive", "1000")) == 2
    assert "--plant-inactive 1000 exceeds" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written


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
    assert records[-1]["step"] == 2 and records[-1]["kind"] == "final"
    accuracy = [r for r in records if "val/pairsDevTest/accuracy" in r]
    assert accuracy and 0.0 <= accuracy[-1]["val/pairsDevTest/accuracy"] <= 1.0
    # the --val-every result at the last step is the end-of-run verification (not run twice)
    assert accuracy[0]["val/pairsDevTest/accuracy"] == accuracy[-1]["val/pairsDevTest/accuracy"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best"]["val/pairsDevTest/accuracy"] == accuracy[-1]["val/pairsDevTest/accuracy"]


def test_cli_help_and_bad_data(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        train_main(["--help"])
    assert err.value.code == 0 and "CRAFT" in capsys.readouterr().out
    assert train_main(["--data", str(tmp_path / "nope"), "--output", str(tmp_path)]) == 2
    assert "not 'toy', 'synthetic', an image folder" in capsys.readouterr().err


def test_demo_defaults_find_channels_dead_through_bn(tmp_path):
    """The demo's toy defaults plant channels dead through BatchNorm (filters above 1e-3, so
    the paper's weight rule misses them) and run BN-aware CRAFT, which finds and revives all."""
    argv = tiny(tmp_path, "--epochs", "2")
    for flag in ("--plant-through", "--criterion"):  # back to the toy defaults
        i = argv.index(flag)
        del argv[i : i + 2]
    cfg = parse_config(argv)
    assert (cfg.plant_through, cfg.criterion) == ("bn", "folded")
    summary = Trainer(cfg).run()
    first = summary["epochs"][0]
    assert first["dead_folded"] == 5 and first["dead_weight"] == 0
    assert first["reactivated"] == 5 and first["inactive_after"] == 0
