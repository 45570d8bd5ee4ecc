"""craft_ext.checkpoint: atomic writes (a failed write leaves the old file and no temporary),
one-line reasons for checkpoints that cannot be loaded, and craft-train's --resume errors."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from craft_ext.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    atomic_copy,
    atomic_save,
    intact_alternative,
    load_checkpoint,
)


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_atomic_save_roundtrip_and_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ckpt.pt"
    atomic_save({"w": torch.arange(5)}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(5))
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"w": torch.zeros(3), "bad": Unpicklable()}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]  # no temporary left


def test_atomic_copy_copies_bytes_and_failure_leaves_dst(tmp_path: Path) -> None:
    src = atomic_save({"w": torch.randn(1000)}, tmp_path / "last.pt")
    dst = atomic_copy(src, tmp_path / "best.pt")
    assert dst.read_bytes() == src.read_bytes()
    with pytest.raises(FileNotFoundError):
        atomic_copy(tmp_path / "missing.pt", dst)
    assert dst.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _broken_files(tmp_path: Path, good: Path) -> dict[str, tuple[Path, str]]:
    """Files --resume must refuse, each with the words of its reason."""
    data = good.read_bytes()
    files = {
        "truncated": (data[: len(data) // 2], "truncated or corrupt checkpoint"),
        "text": (b"step = 101\nnot a checkpoint\n", "a text file, not a PyTorch checkpoint"),
        "pickle": (pickle.dumps({"x": _Evil()}, protocol=2), "refused: it holds Python objects"),
        "empty": (b"", "empty file"),
    }
    out = {}
    for name, (content, why) in files.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(content)
        out[name] = (path, why)
    evil_zip = tmp_path / "evil_zip.pt"
    torch.save({"format": "x", "payload": _Evil()}, evil_zip)
    out["evil_zip"] = (evil_zip, "GLOBAL posix.system")
    return out


def test_load_checkpoint_says_why_in_one_line(tmp_path: Path) -> None:
    good = atomic_save({"format": CHECKPOINT_FORMAT, "w": torch.randn(3000)}, tmp_path / "g.pt")
    for name, (path, why) in _broken_files(tmp_path, good).items():
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        message = str(err.value)
        assert message.startswith(f"{path}: ") and why in message and "\n" not in message, name
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_intact_alternative_finds_the_other_run_checkpoint(tmp_path: Path) -> None:
    last = atomic_save({"format": CHECKPOINT_FORMAT, "step": 9}, tmp_path / "checkpoint_last.pt")
    assert intact_alternative(last) is None  # no checkpoint_best.pt beside it
    atomic_save({"format": CHECKPOINT_FORMAT, "step": 6}, tmp_path / "checkpoint_best.pt")
    found = intact_alternative(tmp_path)  # a run directory: checkpoint_last.pt is resumed
    assert found is not None and found[0] == tmp_path / "checkpoint_best.pt"
    assert found[1]["step"] == 6
    (tmp_path / "checkpoint_best.pt").write_bytes(b"PK\x03\x04 cut")
    assert intact_alternative(last) is None  # a broken one is not offered


def test_craft_train_resume_errors_are_one_line(tmp_path: Path, capsys) -> None:
    """``--resume`` with a checkpoint that cannot be resumed: one line, exit 2, the run
    directory untouched (and an intact checkpoint_best.pt offered)."""
    from test_train import assert_one_line_error, run_cli, tiny

    from craft_ext.train.cli import main as train_main

    run = tmp_path / "run"
    assert train_main(tiny(run, "--epochs", "1")) == 0  # writes last and best (r18)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    broken = _broken_files(tmp_path, run / "checkpoint_last.pt")
    cut = run / "checkpoint_last.pt"
    cut.write_bytes(before["checkpoint_last.pt"][:-4000])
    offer = f"{run / 'checkpoint_best.pt'} is intact (step 6): use --resume {run}/checkpoint_best"
    cases = [
        (run, ["truncated or corrupt checkpoint", offer]),
        *[(broken[name][0], [broken[name][1]]) for name in ("text", "pickle")],
    ]
    for where, needles in cases:  # the CLI end to end: nothing else on stderr
        proc = run_cli(*tiny(run, "--epochs", "2", "--resume", str(where)))
        assert_one_line_error(proc, f"--resume {where}", *needles)
    cut.write_bytes(before["checkpoint_last.pt"])
    proc = run_cli(*tiny(run, "--epochs", "2", "--network", "r34", "--resume"))
    assert_one_line_error(proc, "checkpoint is r18, --network is r34")
    capsys.readouterr()
    assert train_main(tiny(run, "--epochs", "2", "--data", "toy:16:8", "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"craft-train: error: --resume {cut}: checkpoint's head has 12 identities, --data "
        "toy:16:8 has 16"
    ]
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before  # nothing written or lost
