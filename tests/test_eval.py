"""Tests for craft_ext.eval: .bin files (and their safety), pair lists, verification metrics."""

from __future__ import annotations

import math
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from craft_ext.data import ImageDecodeError, encode_image
from craft_ext.eval import (
    VerificationSet,
    evaluate,
    extract_embeddings,
    load_bin,
    load_pairs,
    load_verification_set,
    read_pairs,
    safe_load_pickle,
    verification_accuracy,
    write_bin,
)


def _lfw_dir() -> Path | None:
    env = os.environ.get("CRAFT_LFW_DIR")
    candidates = [Path(env)] if env else []
    # CI: <repo root>/../shared; also any further ancestor (e.g. a worktree under the checkout)
    candidates += [p / "shared" / "data" / "lfw112" for p in Path(__file__).resolve().parents[1:]]
    for c in candidates:
        if (c / "images").is_dir():
            return c
    return None


LFW = _lfw_dir()
needs_lfw = pytest.mark.skipif(LFW is None, reason="LFW data (../shared/data/lfw112) not found")


def _images(n: int, h: int = 20, w: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)


# --------------------------------------------------------------------------- .bin files


@pytest.mark.parametrize("as_numpy", [False, True], ids=["bytes", "numpy"])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_bin_roundtrip(tmp_path: Path, as_numpy: bool, protocol: int) -> None:
    images = _images(6)
    issame = [True, False, True]
    path = tmp_path / "set.bin"
    write_bin(path, images, issame, fmt="png", as_numpy=as_numpy, protocol=protocol)
    with open(path, "rb") as f:  # the file is what insightface's loader expects
        bins, same = pickle.load(f, encoding="bytes")
    assert len(bins) == 6 and same == issame
    assert isinstance(bins[0], np.ndarray if as_numpy else bytes)
    got, got_same = load_bin(path, progress=False)
    assert got.dtype == torch.uint8 and got.shape == (6, 3, 20, 20)
    assert torch.equal(got, images)
    assert got_same.dtype == torch.bool and got_same.tolist() == issame


def test_bin_jpeg_and_resize(tmp_path: Path) -> None:
    ramp = torch.arange(24, dtype=torch.float32) * 10
    images = (
        ramp[None, None, :, None]
        + ramp[None, None, None, :] / 2
        + torch.arange(4)[:, None, None, None] * 7
    )
    images = images.expand(4, 3, 24, 24).round().clamp(0, 255).to(torch.uint8).contiguous()
    write_bin(tmp_path / "j.bin", images, [False, True], fmt="jpeg", as_numpy=True)
    got, _ = load_bin(tmp_path / "j.bin", progress=False)
    assert got.shape == (4, 3, 24, 24)
    assert (got.float() - images.float()).abs().mean() < 4  # lossy, but the same images
    small, _ = load_bin(tmp_path / "j.bin", image_size=16, progress=False)
    assert small.shape == (4, 3, 16, 16)


def test_bin_python2_style_pickle(tmp_path: Path) -> None:
    """Python 2 wrote images as ``str`` (BINSTRING opcodes), read back as bytes."""
    imgs = [encode_image(im, "png") for im in _images(2)]
    body = b"".join(b"T" + struct.pack("<I", len(d)) + d for d in imgs)
    raw = b"\x80\x02(](" + body + b"e](\x88e" + b"t."
    (tmp_path / "py2.bin").write_bytes(raw)
    got, same = load_bin(tmp_path / "py2.bin", progress=False)
    assert got.shape == (2, 3, 20, 20) and same.tolist() == [True]


class _Evil:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_malicious_pickle_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.bin"
    with open(evil, "wb") as f:
        pickle.dump(([_Evil(str(marker))], []), f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_bin(evil, progress=False)
    assert not marker.exists()
    for proto in (0, 4):
        data = pickle.dumps((_EvalEvil(), [True]), protocol=proto)
        with pytest.raises(pickle.UnpicklingError, match="eval"):
            safe_load_pickle(data)
    # numpy arrays of other dtypes (object arrays can hold anything) are refused too
    for arr in (np.array([1.5]), np.array([None, 1], dtype=object)):
        with pytest.raises(pickle.UnpicklingError, match="dtype"):
            safe_load_pickle(pickle.dumps(([arr], []), protocol=2))
    # a uint8 array whose dtype state carries forged flags never reaches numpy's __setstate__
    good = pickle.dumps(([np.frombuffer(b"abcd", np.uint8)], []), protocol=2)
    forged = good.replace(b"K\x00tq", b"K\x3ftq", 1)
    assert forged != good and isinstance(safe_load_pickle(good)[0][0], np.ndarray)
    with pytest.raises(pickle.UnpicklingError, match="flags"):
        safe_load_pickle(forged)
    # the admitted globals cannot be modified through BUILD (state dict or slot state)
    for state in (b"}(X\x01\x00\x00\x00aK\x01u", b"N}(X\x01\x00\x00\x00aK\x01u\x86"):
        with pytest.raises(pickle.UnpicklingError, match="modify"):
            safe_load_pickle(b"\x80\x02cnumpy\ndtype\n" + state + b"b.")
    # builtins that look harmless are still not admitted
    with pytest.raises(pickle.UnpicklingError, match="set"):
        safe_load_pickle(pickle.dumps(([set()], []), protocol=2))


def test_bin_shape_mismatch(tmp_path: Path) -> None:
    with open(tmp_path / "bad.bin", "wb") as f:
        pickle.dump(([b"x"] * 3, [True]), f)
    with pytest.raises(ValueError, match="3 images for 1 pairs"):
        load_bin(tmp_path / "bad.bin", progress=False)


# --------------------------------------------------------------------------- pairs files


@pytest.fixture()
def pairs_setup(tmp_path: Path) -> tuple[Path, Path, dict]:
    root = tmp_path / "images"
    pics = {}
    for k, name in enumerate(["Ann", "Bo", "Cy"]):
        (root / name).mkdir(parents=True)
        for i in (1, 2, 3):
            im = _images(1, 40, 40, seed=10 * k + i)[0]
            (root / name / f"{name}_{i:04d}.png").write_bytes(encode_image(im, "png"))
            pics[(name, i)] = im
    pairs = tmp_path / "pairs.txt"
    pairs.write_text(
        "2\t2\n"
        "Ann\t1\t2\nBo\t1\t3\nAnn\t1\tBo\t2\nBo\t3\tCy\t1\n"
        "Cy\t1\t2\nAnn\t2\t3\nCy\t3\tAnn\t3\nBo\t2\tCy\t2\n"
    )
    return pairs, root, pics


def test_pairs_with_folds(pairs_setup) -> None:
    pairs, root, pics = pairs_setup
    images, issame, folds = load_pairs(pairs, root, image_size=40, progress=False)
    assert images.shape == (16, 3, 40, 40) and images.dtype == torch.uint8
    assert issame.tolist() == [True, True, False, False] * 2
    assert folds.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert torch.equal(images[0], pics[("Ann", 1)]) and torch.equal(images[5], pics[("Bo", 2)])
    assert torch.equal(images[15], pics[("Cy", 2)])
    small, _, _ = load_pairs(pairs, root, image_size=32, progress=False)
    assert small.shape == (16, 3, 32, 32)

    vs = load_verification_set(f"tiny={pairs}:{root}", image_size=40, progress=False)
    assert vs.name == "tiny" and vs.num_pairs == 8 and torch.equal(vs.images, images)
    assert torch.equal(vs.folds, folds)


def test_pairs_errors(tmp_path: Path, pairs_setup) -> None:
    pairs, root, _ = pairs_setup
    bad = tmp_path / "bad.txt"
    bad.write_text("3\nAnn\t1\t2\n")
    with pytest.raises(ValueError, match="says 3"):
        read_pairs(bad)
    missing = tmp_path / "missing.txt"
    missing.write_text("2\nAnn\t1\t9\nBo\t4\tZed\t1\n")
    # every missing file named (with its line) before any image is decoded
    with pytest.raises(FileNotFoundError) as err:
        load_pairs(missing, root, image_size=40, progress=False)
    message = str(err.value)
    assert message.startswith(f"{missing} names 3 image(s) missing under {root}: ")
    assert "Ann/Ann_0009.jpg (line 2), Bo/Bo_0004.jpg (line 3), Zed/Zed_0001.jpg (line 3)" in (
        message
    )
    (tmp_path / "letters.txt").write_text("1\nAnn\t1\tx\n")
    with pytest.raises(ValueError, match="letters.txt, line 2: expected 'Name i j'"):
        read_pairs(tmp_path / "letters.txt")
    (root / "Bo" / "Bo_0002.png").write_bytes(b"not a png")
    with pytest.raises(ImageDecodeError, match=r"pairs.txt, line 4: cannot decode image .*Bo_0002"):
        load_pairs(pairs, root, image_size=40, progress=False)
    with pytest.raises(FileNotFoundError):
        load_verification_set(f"{pairs}:{tmp_path / 'nope'}")


def test_bin_that_is_not_a_bin_is_named(tmp_path: Path) -> None:
    for name, data, why in [
        ("random.bin", bytes(range(7, 256)) * 4, "it does not start like a pickle"),
        ("empty.bin", b"", "empty file"),
        ("cut.bin", pickle.dumps(([b"x", b"y"], [True]), protocol=4)[:20], "pickle data"),
    ]:
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ValueError) as err:
            load_bin(path, progress=False)
        assert str(err.value).startswith(f"{path}: ") and why in str(err.value)
        assert "\n" not in str(err.value)


def test_craft_train_bad_val_files_are_one_line(tmp_path: Path, pairs_setup) -> None:
    """``--val`` files that cannot be used: one line naming the file, exit 2, nothing written."""
    from test_train import TINY, assert_one_line_error, run_cli

    pairs, root, _ = pairs_setup
    missing = tmp_path / "missing.txt"
    missing.write_text("1\nAnn\t1\t9\n")
    random_bin = tmp_path / "random.bin"
    random_bin.write_bytes(bytes(range(256)) * 8)
    out = tmp_path / "run"
    for spec, needles in [
        (f"{missing}:{root}", [f"--val {missing} names 1 image(s) missing", "Ann_0009.jpg"]),
        (str(random_bin), [f"--val {random_bin}: not an insightface verification .bin"]),
    ]:
        args = [*TINY[: TINY.index("--val")], "--val", spec, "--output", str(out)]
        assert_one_line_error(run_cli(*args), *needles)
        assert not out.exists()


@needs_lfw
def test_lfw_pairs_dev_test() -> None:
    """View 1 test list: header "500" = 500 matched then 500 mismatched pairs."""
    images, issame, folds = load_pairs(LFW / "pairsDevTest.txt", LFW / "images", progress=False)
    assert images.shape == (2000, 3, 112, 112) and images.dtype == torch.uint8
    assert issame.shape == (1000,) and int(issame.sum()) == 500
    assert bool(issame[:500].all()) and not bool(issame[500:].any())
    assert sorted(set(folds.tolist())) == list(range(10))
    for f in range(10):  # every fold holds 50 matched and 50 mismatched pairs
        assert int(issame[folds == f].sum()) == 50 and int((folds == f).sum()) == 100
    assert images.float().std() > 20  # real pictures, not blank

    pairs, folds_all = read_pairs(LFW / "pairs.txt")
    assert len(pairs) == 6000 and np.bincount(folds_all).tolist() == [600] * 10
    assert [p[4] for p in pairs[:600]] == [True] * 300 + [False] * 300


def test_load_verification_set_bin(tmp_path: Path) -> None:
    write_bin(tmp_path / "cfp_fp.bin", _images(20), [True, False] * 5)
    vs = load_verification_set(tmp_path / "cfp_fp.bin", progress=False)
    assert vs.name == "cfp_fp" and vs.num_pairs == 10 and vs.folds == 10
    assert vs.images.shape == (20, 3, 20, 20)
    with pytest.raises(FileNotFoundError):
        load_verification_set(tmp_path / "nothing.bin")


# --------------------------------------------------------------------------- metrics


def _unit(angle_cos: np.ndarray) -> np.ndarray:
    return np.stack([angle_cos, np.sqrt(1 - angle_cos**2)], axis=1)


def test_accuracy_perfect_separation() -> None:
    rng = np.random.default_rng(0)
    n, d = 600, 64
    e1 = rng.standard_normal((n, d))
    same = np.arange(n) % 2 == 0
    e2 = np.where(
        same[:, None], e1 + 0.1 * rng.standard_normal((n, d)), rng.standard_normal((n, d))
    )
    r = verification_accuracy(torch.from_numpy(e1), torch.from_numpy(e2), torch.from_numpy(same))
    assert r["accuracy"] == 1.0 and r["std"] == 0.0
    assert r["tar_at_far"] == {1e-3: 1.0, 1e-2: 1.0} and r["auc"] == 1.0
    assert 0.0 < r["best_threshold"] < 0.99 and len(r["fold_accuracies"]) == 10


def test_accuracy_random_is_chance() -> None:
    rng = np.random.default_rng(1)
    n = 6000
    r = verification_accuracy(
        rng.standard_normal((n, 32)), rng.standard_normal((n, 32)), rng.random(n) < 0.5
    )
    assert abs(r["accuracy"] - 0.5) < 0.03
    assert abs(r["auc"] - 0.5) < 0.03
    assert r["tar_at_far"][1e-2] < 0.05


def test_accuracy_known_case() -> None:
    """10 folds of 5 matched (cos 0.9) + 5 mismatched (cos 0.1) pairs; one mismatched pair in
    fold 0 has cos 0.95. Every training split puts the threshold at 0.5: fold 0 scores 9/10, the
    others 10/10, so accuracy = 0.99 and std = sqrt((0.09^2 + 9 * 0.01^2) / 10) = 0.03."""
    cos = np.tile([0.9] * 5 + [0.1] * 5, 10)
    same = np.tile([True] * 5 + [False] * 5, 10)
    cos[5] = 0.95
    e1 = np.tile([[1.0, 0.0]], (100, 1))
    r = verification_accuracy(e1, _unit(cos), same, folds=10)
    assert r["accuracy"] == pytest.approx(0.99)
    assert r["std"] == pytest.approx(0.03)
    assert r["fold_accuracies"] == pytest.approx([0.9] + [1.0] * 9)
    assert r["thresholds"] == pytest.approx([0.5] * 10)
    # explicit fold ids giving the same split give the same result
    r2 = verification_accuracy(e1, _unit(cos), same, folds=torch.arange(100) // 10)
    assert r2["accuracy"] == pytest.approx(0.99)
    # ROC: the 50 matched pairs all beat 49 of the 50 mismatched ones
    r3 = verification_accuracy(e1, _unit(cos), same, fars=(0.0, 0.01, 0.02))
    assert r3["tar_at_far"] == {0.0: 0.0, 0.01: 0.0, 0.02: 1.0}


def test_tar_at_far_monotone() -> None:
    rng = np.random.default_rng(2)
    n = 4000
    same = rng.random(n) < 0.5
    e1 = rng.standard_normal((n, 16))
    e2 = np.where(
        same[:, None], e1 + 1.2 * rng.standard_normal((n, 16)), rng.standard_normal((n, 16))
    )
    fars = (1e-4, 1e-3, 1e-2, 1e-1, 0.5, 1.0)
    r = verification_accuracy(e1, e2, same, fars=fars)
    tars = [r["tar_at_far"][f] for f in fars]
    assert all(a <= b for a, b in zip(tars, tars[1:], strict=False))
    assert tars[-1] == 1.0 and 0.0 < tars[2] < 1.0
    assert 0.7 < r["accuracy"] < 1.0 and 0.7 < r["auc"] < 1.0


def test_accuracy_input_checks() -> None:
    with pytest.raises(ValueError):
        verification_accuracy(np.ones((4, 2)), np.ones((3, 2)), [True] * 4)
    r = verification_accuracy(np.ones((20, 2)), np.ones((20, 2)), [True] * 20)
    assert r["accuracy"] == 1.0 and math.isnan(r["auc"])


# --------------------------------------------------------------------------- embeddings


class _TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3 * 8 * 8, 16)
        self.bn = torch.nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x.flatten(1)))


def test_extract_embeddings_flip_and_mode() -> None:
    model = _TinyNet().train()
    images = _images(10, 8, 8)
    emb = extract_embeddings(model, images, batch_size=4, flip=True, progress=False)
    assert model.training  # mode restored
    assert emb.shape == (10, 16) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(10))
    model.eval()
    with torch.no_grad():
        x = (images.float() / 255 - 0.5) / 0.5
        ref = torch.nn.functional.normalize(model(x) + model(x.flip(-1)), dim=1)
        ref_noflip = torch.nn.functional.normalize(model(x), dim=1)
    torch.testing.assert_close(emb, ref)
    emb1 = extract_embeddings(model, images, batch_size=3, flip=False, progress=False)
    torch.testing.assert_close(emb1, ref_noflip)


def test_evaluate_end_to_end() -> None:
    images = _images(40, 8, 8, seed=5)
    images[1::2][::2] = images[0::2][::2]  # even pairs: identical images
    issame = torch.tensor([True, False] * 10)
    vs = VerificationSet("toy", images, issame, folds=torch.arange(20) % 10)
    r = evaluate(_TinyNet(), vs, batch_size=16, progress=False)
    assert r["name"] == "toy" and r["accuracy"] == 1.0 and r["num_pairs"] == 20
    with pytest.raises(ValueError):
        VerificationSet("bad", images[:3], issame)


def test_numpy1_module_names_accepted(tmp_path: Path) -> None:
    """Files written under numpy 1.x name ``numpy.core.multiarray`` instead of ``numpy._core``."""
    images = _images(2)
    bins = [np.frombuffer(encode_image(im, "png"), np.uint8) for im in images]
    raw = pickle.dumps((bins, [False]), protocol=2)
    assert b"numpy._core.multiarray" in raw
    (tmp_path / "np1.bin").write_bytes(raw.replace(b"numpy._core.", b"numpy.core."))
    got, same = load_bin(tmp_path / "np1.bin", progress=False)
    assert torch.equal(got, images) and same.tolist() == [False]
