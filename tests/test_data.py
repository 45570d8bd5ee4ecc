"""Tests for craft_ext.data: image folders, RecordIO, synthetic data, transforms, loaders."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from craft_ext.data import (
    RECORDIO_MAGIC,
    ImageDecodeError,
    ImageFolderDataset,
    RecordIODataset,
    RecordIOReader,
    RecordIOWriter,
    Resize,
    SyntheticFaceDataset,
    encode_image,
    eval_transform,
    make_loader,
    normalize,
    pack_record,
    read_identity_list,
    resize_center_crop,
    train_transform,
    unpack_record,
    write_recordio,
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


def _image(seed: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """bob: 3 images, alice: 2, carol: 1, plus a stray text file."""
    counts = {"bob": 3, "alice": 2, "carol": 1}
    k = 0
    for name, n in counts.items():
        d = tmp_path / name
        d.mkdir()
        for i in range(n):
            (d / f"{name}_{i:04d}.jpg").write_bytes(encode_image(_image(k), "jpeg"))
            k += 1
    (tmp_path / "bob" / "notes.txt").write_text("not an image")
    return tmp_path


# --------------------------------------------------------------------------- image folder


def test_image_folder_labels_sorted(folder: Path) -> None:
    ds = ImageFolderDataset(folder, progress=False)
    assert ds.classes == ["alice", "bob", "carol"]
    assert len(ds) == 6
    assert sorted(set(ds.labels)) == [0, 1, 2]
    img, label = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 16, 16)
    assert label == 0
    assert [lbl for _, lbl in (ds[i] for i in range(len(ds)))] == [0, 0, 1, 1, 1, 2]


def test_image_folder_identity_filter_list_and_files(folder: Path, tmp_path_factory) -> None:
    ds = ImageFolderDataset(folder, identities=["carol", "bob"])
    assert ds.classes == ["bob", "carol"] and len(ds) == 4
    lists = tmp_path_factory.mktemp("lists")
    lfw_style = lists / "people.txt"
    lfw_style.write_text("2\ncarol\t1\nalice\t2\n")
    plain = lists / "plain.txt"
    plain.write_text("# comment\nalice\n\ncarol\n")
    for f in (lfw_style, plain):
        assert read_identity_list(f) == (
            ["carol", "alice"] if f == lfw_style else ["alice", "carol"]
        )
        ds = ImageFolderDataset(folder, identities=f)
        assert ds.classes == ["alice", "carol"]
        assert ds.labels == [0, 0, 1]


def test_image_folder_min_images_and_missing_identity(folder: Path) -> None:
    ds = ImageFolderDataset(folder, min_images=2)
    assert ds.classes == ["alice", "bob"]
    with pytest.raises(FileNotFoundError, match="dave"):
        ImageFolderDataset(folder, identities=["alice", "dave"])
    with pytest.warns(UserWarning, match="dave"):
        ds = ImageFolderDataset(folder, identities=["alice", "dave"], on_error="skip")
    assert ds.missing_identities == ["dave"] and ds.classes == ["alice"]


def test_image_folder_corrupt_raise_vs_skip(folder: Path) -> None:
    bad = folder / "alice" / "alice_0001.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    ds = ImageFolderDataset(folder)
    with pytest.raises(ImageDecodeError, match="alice_0001.jpg"):
        ds[1]
    with pytest.raises(ImageDecodeError, match="alice_0001.jpg"):
        ImageFolderDataset(folder, verify=True, progress=False)

    # skip at construction (verify): the file is dropped and counted
    with pytest.warns(UserWarning, match="alice_0001.jpg"):
        ds = ImageFolderDataset(folder, on_error="skip", verify=True, progress=False)
    assert ds.skipped == 1 and len(ds) == 5
    assert ds.skipped_files == [str(bad)]

    # skip at load time: warned, counted, the next readable sample is returned instead
    ds = ImageFolderDataset(folder, on_error="skip")
    with pytest.warns(UserWarning, match="alice_0001.jpg"):
        img, label = ds[1]
    assert ds.skipped == 1 and label == 1 and img.shape == (3, 16, 16)

    # a file that vanished after the scan is reported by name too
    ds = ImageFolderDataset(folder)
    os.remove(folder / "carol" / "carol_0000.jpg")
    with pytest.raises(ImageDecodeError, match="carol_0000.jpg"):
        ds[5]


@needs_lfw
def test_lfw_view1_training_people() -> None:
    listed = read_identity_list(LFW / "peopleDevTrain.txt")
    assert len(listed) == 4038
    ds = ImageFolderDataset(LFW / "images", identities=LFW / "peopleDevTrain.txt")
    assert ds.num_classes == 4038
    assert ds.classes == sorted(listed)
    counts = np.bincount(ds.labels, minlength=ds.num_classes)
    assert counts.min() >= 1
    # the list's per-person image counts match the folders
    expected = {}
    for line in (LFW / "peopleDevTrain.txt").read_text().splitlines()[1:]:
        name, n = line.split("\t")
        expected[name] = int(n)
    assert len(ds) == sum(expected.values())
    img, label = ds[0]
    assert img.shape == (3, 112, 112) and label == 0


# --------------------------------------------------------------------------- RecordIO


def _samples(n_classes: int = 3, per_class: int = 2) -> list[tuple[np.ndarray, int]]:
    out = []
    for c in range(n_classes):
        for j in range(per_class):
            out.append((_image(100 * c + j, size=24), c))
    return out[::-1]  # unsorted on purpose: the writer groups by class


def test_recordio_roundtrip_with_header(tmp_path: Path) -> None:
    samples = _samples()
    rec, idx = write_recordio(tmp_path / "train", samples, fmt="png")
    assert rec.endswith("train.rec") and idx.endswith("train.idx")
    ds = RecordIODataset(tmp_path)
    assert ds.header0 == (7, 10)  # 6 images at 1..6, identity records 7..9
    assert len(ds) == 6 and ds.num_classes == 3
    assert ds.read_identity_ranges() == [(1, 3), (3, 5), (5, 7)]
    by_label: dict[int, list[np.ndarray]] = {}
    for img, lbl in samples:
        by_label.setdefault(lbl, []).append(img)
    expected = [img for c in sorted(by_label) for img in by_label[c]]  # stable sort by class
    for i in range(len(ds)):
        img, label = ds[i]
        assert label == i // 2
        assert torch.equal(img, torch.from_numpy(expected[i]).permute(2, 0, 1))  # PNG: lossless

    # the header record at index 0 is as insightface writes it
    header, rest = unpack_record(ds.reader.read(0))
    assert header.flag == 2 and rest == b""
    np.testing.assert_array_equal(header.label, [7.0, 10.0])

    # raw framing: magic, length, 4-byte alignment
    raw = Path(rec).read_bytes()
    magic, lrec = struct.unpack("<II", raw[:8])
    assert magic == RECORDIO_MAGIC and lrec >> 29 == 0
    assert len(raw) % 4 == 0


def test_recordio_array_labels_and_no_header(tmp_path: Path) -> None:
    samples = [(_image(i), [float(i % 2), 0.25 * i, 7.0]) for i in range(4)]
    write_recordio(tmp_path / "arr", samples, header=False, fmt="png")
    ds = RecordIODataset(tmp_path / "arr")
    assert ds.header0 is None and len(ds) == 4
    assert [ds[i][1] for i in range(4)] == [0, 1, 0, 1]
    assert ds.num_classes == 2  # from a scan of the labels
    header, payload = unpack_record(ds.reader.read(3))
    assert header.flag == 3
    np.testing.assert_allclose(header.label, [1.0, 0.75, 7.0])
    assert payload[:8] == b"\x89PNG\r\n\x1a\n"

    # scalar labels are stored with flag 0
    header, _ = unpack_record(pack_record(5, b"xyz", id=9))
    assert header.flag == 0 and header.label == 5.0 and header.id == 9


def test_recordio_multipart_records(tmp_path: Path) -> None:
    magic = struct.pack("<I", RECORDIO_MAGIC)
    payloads = [
        b"abcd" + magic + b"efgh" + magic + magic + b"ij",  # splits into 4 parts
        magic + b"xyz",  # starts with the magic number
        b"12" + magic,  # unaligned: no split
        b"",
    ]
    with RecordIOWriter(tmp_path / "m.rec", tmp_path / "m.idx") as w:
        for k, p in enumerate(payloads):
            w.write(k, p)
    r = RecordIOReader(tmp_path / "m.rec", tmp_path / "m.idx")
    assert [r.read(k) for k in range(len(payloads))] == payloads
    with pytest.raises(KeyError):
        r.read(99)


def test_recordio_exact_bytes(tmp_path: Path) -> None:
    magic = struct.pack("<I", RECORDIO_MAGIC)
    with RecordIOWriter(tmp_path / "x.rec", tmp_path / "x.idx") as w:
        w.write(0, b"abcde")
        w.write(7, b"ab" * 2 + magic + b"z")
    assert (tmp_path / "x.rec").read_bytes() == (
        magic + struct.pack("<I", 5) + b"abcde\0\0\0"
        + magic + struct.pack("<I", (1 << 29) | 4) + b"abab"
        + magic + struct.pack("<I", (3 << 29) | 1) + b"z\0\0\0"
    )  # fmt: skip
    assert (tmp_path / "x.idx").read_text() == "0\t0\n7\t16\n"


_MAGIC = struct.pack("<I", RECORDIO_MAGIC)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.one_of(st.binary(max_size=9), st.just(_MAGIC)), max_size=6).map(b"".join),
        min_size=1,
        max_size=5,
    )
)
def test_recordio_roundtrip_property(tmp_path_factory, payloads: list[bytes]) -> None:
    d = tmp_path_factory.mktemp("prop")
    with RecordIOWriter(d / "p.rec", d / "p.idx") as w:
        for k, p in enumerate(payloads):
            w.write(10 * k, p)
    assert (d / "p.rec").stat().st_size % 4 == 0
    r = RecordIOReader(d / "p.rec", d / "p.idx")
    assert [r.read(10 * k) for k in range(len(payloads))] == payloads


def test_recordio_corrupt_record_is_named(tmp_path: Path) -> None:
    write_recordio(tmp_path / "train", [(b"not an image", 0)])
    ds = RecordIODataset(tmp_path / "train.rec")
    with pytest.raises(ImageDecodeError, match="record 1"):
        ds[0]


# --------------------------------------------------------------------------- synthetic, transforms


def test_synthetic_deterministic() -> None:
    a = SyntheticFaceDataset(5, 20, size=32, seed=3)
    b = SyntheticFaceDataset(5, 20, size=32, seed=3)
    c = SyntheticFaceDataset(5, 20, size=32, seed=4)
    for i in (0, 7, 19):
        ia, la = a[i]
        ib, lb = b[i]
        assert torch.equal(ia, ib) and la == lb == i % 5
        assert ia.dtype == torch.uint8 and ia.shape == (3, 32, 32)
    assert not torch.equal(a[0][0], c[0][0])
    assert not torch.equal(a[0][0], a[1][0])
    with pytest.raises(IndexError):
        a[20]


def test_transforms() -> None:
    img = torch.tensor([[[0, 255], [128, 64]]] * 3, dtype=torch.uint8)
    out = eval_transform()(img)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (img.float() / 255 - 0.5) / 0.5)
    torch.testing.assert_close(normalize(img), out)
    t = train_transform(flip_p=1.0)
    torch.testing.assert_close(t(img), out.flip(-1))
    assert torch.equal(train_transform(flip_p=0.0)(img), out)


# --------------------------------------------------------------------------- loader


def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True)
    )


def test_loader_deterministic_and_resumable() -> None:
    ds = SyntheticFaceDataset(4, 22, size=8, seed=1, transform=train_transform())
    l1 = make_loader(ds, batch_size=4, workers=0, shuffle=True, seed=7)
    l2 = make_loader(ds, batch_size=4, workers=0, shuffle=True, seed=7)
    assert len(l1) == 5 and l1.batches_per_epoch == 5  # drop_last
    torch.manual_seed(123)
    e0 = _epoch(l1)
    torch.manual_seed(456)  # global RNG state must not matter
    assert _same(e0, _epoch(l2))
    assert all(x.shape == (4, 3, 8, 8) and x.dtype == torch.float32 for x, _ in e0)

    l1.set_epoch(1)
    e1 = _epoch(l1)
    assert not _same(e0, e1)
    l3 = make_loader(ds, batch_size=4, seed=8)
    assert not _same(e0, _epoch(l3))

    # resume epoch 1 after 2 batches: same remaining batches
    l2.set_epoch(1, skip_batches=2)
    assert len(l2) == 3
    assert _same(e1[2:], _epoch(l2))

    # state_dict / load_state_dict mid-epoch
    l4 = make_loader(ds, batch_size=4, seed=7)
    l4.set_epoch(1)
    it = iter(l4)
    next(it), next(it), next(it)
    state = l4.state_dict()
    assert state == {"epoch": 1, "batch": 3, "seed": 7}
    l5 = make_loader(ds, batch_size=4, seed=7)
    l5.load_state_dict(state)
    assert _same(e1[3:], _epoch(l5))
    assert l5.state_dict()["batch"] == 5
    l5.load_state_dict(l5.state_dict())  # finished epoch -> next epoch
    assert l5.epoch == 2 and len(l5) == 5


def test_loader_workers_match_main_process() -> None:
    ds = SyntheticFaceDataset(4, 16, size=8, seed=2, transform=train_transform())
    a = _epoch(make_loader(ds, batch_size=4, workers=0, seed=3))
    b = _epoch(make_loader(ds, batch_size=4, workers=2, seed=3))
    assert _same(a, b)


def test_loader_distributed_partition() -> None:
    ds = SyntheticFaceDataset(3, 20, size=4, seed=0)
    labels = []
    for rank in range(2):
        loader = make_loader(ds, batch_size=2, seed=5, num_replicas=2, rank=rank, shuffle=False)
        assert loader.sampler.dist_sampler is not None and len(loader) == 5
        labels.append(torch.cat([y for _, y in loader]).tolist())
    assert labels[0] == [i % 3 for i in range(0, 20, 2)]
    assert labels[1] == [i % 3 for i in range(1, 20, 2)]
    # shuffled, two ranks are disjoint and cover the dataset
    seen = []
    for rank in range(2):
        loader = make_loader(ds, batch_size=2, seed=5, num_replicas=2, rank=rank)
        seen += [i for i, _ in loader.sampler]
    assert sorted(seen) == list(range(20))


# --------------------------------------------------------------------------- Resize


def test_resize_is_the_verification_resampling() -> None:
    arr = _image(3, size=24)[:, :20]  # 24 x 20: covered, then centre-cropped
    out = Resize(16)(torch.from_numpy(arr).permute(2, 0, 1).contiguous())
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)
    assert torch.equal(out.permute(1, 2, 0), torch.from_numpy(resize_center_crop(arr, 16)))
    same = torch.from_numpy(_image(4, size=16)).permute(2, 0, 1)
    assert Resize((16, 16))(same) is same
    with pytest.raises(ValueError, match="size must be a positive int"):
        Resize(0)
    with pytest.raises(ValueError, match=r"expects a \[3, H, W\] uint8 image"):
        Resize(16)(torch.zeros(3, 8, 8))


def test_training_sets_from_disk_are_resized_like_verification(tmp_path: Path) -> None:
    from craft_ext.data import load_image
    from craft_ext.train import parse_config
    from craft_ext.train.trainer import build_train_set

    samples = _samples()
    (tmp_path / "rec").mkdir()
    write_recordio(tmp_path / "rec" / "train", samples, fmt="png")
    for i, (arr, c) in enumerate(samples):
        (tmp_path / "folder" / f"id{c}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "folder" / f"id{c}" / f"{i}.png").write_bytes(encode_image(arr, fmt="png"))
    for root in ("rec", "folder"):
        cfg = parse_config(["--data", str(tmp_path / root), "--image-size", "16"])
        ds, classes = build_train_set(cfg)
        assert classes == 3 and all(ds[j][0].shape == (3, 16, 16) for j in range(len(ds)))
    path = ds.samples[0][0]  # the folder set: its first item is that file, resized
    want = torch.from_numpy(resize_center_crop(load_image(path), 16))
    assert torch.equal(ds[0][0].permute(1, 2, 0), want)


# --------------------------------------------------------------------------- craft-train --data


def _training_folder(root: Path, bad: bytes | None) -> Path:
    """4 identities x 4 JPEGs of 32 x 32; with ``bad``, id1/img_0002.jpg holds those bytes."""
    for c in range(4):
        (root / f"id{c}").mkdir(parents=True)
        for i in range(4):
            data = encode_image(_image(10 * c + i, size=32), "jpeg")
            if bad is not None and (c, i) == (1, 2):
                data = bad if bad else data[: len(data) // 2]  # b"": a truncated JPEG
            (root / f"id{c}" / f"img_{i:04d}.jpg").write_bytes(data)
    return root


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    tiny = ["--image-size", "32", "--width", "0.125", "--embedding-size", "16", "--epochs", "1"]
    tiny += ["--batch-size", "4", "--workers", "1", "--no-progress", "--log-every", "1"]
    return ["--data", str(data), "--output", str(out), *tiny, *extra]


def test_craft_train_corrupt_jpeg_is_one_line(tmp_path: Path) -> None:
    """A corrupt JPEG met in a DataLoader worker: one line naming it, exit 2, no checkpoint."""
    from test_train import assert_one_line_error, run_cli

    data = _training_folder(tmp_path / "data", b"")
    out = tmp_path / "run"
    proc = run_cli(*_train_args(data, out))
    line = assert_one_line_error(proc, "img_0002.jpg", "--on-error skip")
    assert str(data / "id1" / "img_0002.jpg") in line and "truncated" in line
    assert not (out / "checkpoint_last.pt").exists() and not (out / "summary.json").exists()


def test_craft_train_on_error_skip_counts_and_names_skipped_files(tmp_path: Path) -> None:
    from test_train import run_cli

    data = _training_folder(tmp_path / "data", b"\xff\xd8\xff\xe0 not a jpeg")
    out = tmp_path / "run"
    proc = run_cli(*_train_args(data, out, "--on-error", "skip"))
    assert proc.returncode == 0, proc.stderr
    bad = str(data / "id1" / "img_0002.jpg")
    assert f"skipped 1 unreadable image (--on-error skip; listed in summary.json): {bad}" in (
        proc.stdout
    )
    assert proc.stdout.count("skipping unreadable image") == 1  # said once, when first met
    # a real folder and no --val: said once at start-up, nothing validated on toy identities
    assert proc.stdout.count(f"no verification (no --val given for --data {data})") == 1
    assert "toy" not in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_images"]["count"] == 1 and summary["skipped_images"]["files"] == [bad]
    assert summary["best"] == {} and summary["config"]["val"] is None


def test_load_item_reports_skips_without_recording(folder: Path) -> None:
    (folder / "alice" / "alice_0001.jpg").write_bytes(b"garbage")
    ds = ImageFolderDataset(folder, on_error="skip")
    image, label, skipped = ds.load_item(1)
    assert label == 1 and image.shape == (3, 16, 16) and ds.skipped == 0
    assert [p for p, _ in skipped] == [str(folder / "alice" / "alice_0001.jpg")]
    assert "cannot decode image" in skipped[0][1]
