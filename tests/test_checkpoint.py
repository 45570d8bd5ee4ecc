"""craft_ext.checkpoint: atomic writes (a failed write leaves the old file and no temporary)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from craft_ext.checkpoint import atomic_copy, atomic_save, load_checkpoint


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
