"""insightface ``train.rec`` / ``train.idx`` datasets, read without mxnet.

Format (MXNet / dmlc-core RecordIO):

* A record on disk is ``uint32 magic (0xced7230a)``, ``uint32 lrec`` and ``length`` payload
  bytes, zero-padded to a multiple of 4. ``lrec`` holds the payload length in its lower 29 bits
  and a continuation flag ``cflag`` in its upper 3 bits: 0 = whole record, 1 = first part,
  2 = middle part, 3 = last part. The writer splits a record wherever the magic number occurs
  at a 4-byte-aligned offset of the payload (dropping those 4 bytes); the reader joins the parts
  and puts the magic number back between them.
* ``train.idx`` is text, one ``key<TAB>byte_offset`` line per record.
* The payload of an image record is an ``IRHeader`` (struct ``'IfQQ'``: flag, label, id, id2),
  then, when ``flag > 0``, ``flag`` float32 labels (the header's ``label`` field is then 0), then
  the encoded image.
* insightface datasets start with a header record at index 0 whose label array is
  ``(first_identity_record, end)``: images are records ``1 .. first_identity_record-1`` and
  records ``first_identity_record .. end-1`` are one per identity, each with the label array
  ``(first_image, end_image)``. Files without it (flag 0 at index 0) hold only images.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .image import decode_image, encode_image, to_chw_tensor

__all__ = [
    "IRHeader",
    "RECORDIO_MAGIC",
    "RecordIODataset",
    "RecordIOReader",
    "RecordIOWriter",
    "pack_record",
    "unpack_record",
    "write_recordio",
]

RECORDIO_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_LEN_MASK = (1 << 29) - 1
_IR_FORMAT = "<IfQQ"
_IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24

Label = float | int | Sequence[float] | np.ndarray
ImageLike = bytes | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class IRHeader:
    """Image-record header. ``label`` is a float, or a float32 array when ``flag > 0``."""

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack_record(label: Label, payload: bytes, id: int = 0, id2: int = 0) -> bytes:
    """Build an image-record payload: ``IRHeader`` (+ float32 label array) + ``payload``."""
    if isinstance(label, int | float | np.integer | np.floating):
        return struct.pack(_IR_FORMAT, 0, float(label), id, id2) + payload
    arr = np.asarray(label, dtype="<f4").reshape(-1)
    return struct.pack(_IR_FORMAT, arr.size, 0.0, id, id2) + arr.tobytes() + payload


def unpack_record(record: bytes) -> tuple[IRHeader, bytes]:
    """Split a record payload into its :class:`IRHeader` and the remaining bytes."""
    if len(record) < _IR_SIZE:
        raise ValueError(f"record of {len(record)} bytes is shorter than an IRHeader")
    flag, label, id_, id2 = struct.unpack(_IR_FORMAT, record[:_IR_SIZE])
    rest = record[_IR_SIZE:]
    if flag > 0:
        if len(rest) < 4 * flag:
            raise ValueError(f"record too short for its {flag} float32 labels")
        arr = np.frombuffer(rest, dtype="<f4", count=flag).copy()
        return IRHeader(flag, arr, id_, id2), rest[4 * flag :]
    return IRHeader(flag, float(label), id_, id2), rest


class RecordIOWriter:
    """Minimal indexed RecordIO writer (``.rec`` + ``.idx``), format-compatible with MXNet's."""

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str]) -> None:
        self._rec = open(rec_path, "wb")  # noqa: SIM115 - closed in close()
        self._idx = open(idx_path, "w", encoding="ascii")  # noqa: SIM115

    def write(self, key: int, record: bytes) -> None:
        """Append ``record`` under integer ``key``."""
        self._idx.write(f"{int(key)}\t{self._rec.tell()}\n")
        data = bytes(record)
        n = len(data)
        if n >= 1 << 29:
            raise ValueError("RecordIO records must be shorter than 2**29 bytes")
        start = 0
        for i in range(0, n - n % 4, 4):
            if data[i : i + 4] == _MAGIC_BYTES:
                self._write_part(1 if start == 0 else 2, data[start:i])
                start = i + 4
        self._write_part(3 if start else 0, data[start:])

    def _write_part(self, cflag: int, part: bytes) -> None:
        self._rec.write(_MAGIC_BYTES + struct.pack("<I", (cflag << 29) | len(part)) + part)
        self._rec.write(b"\0" * (-len(part) % 4))

    def close(self) -> None:
        """Flush and close both files."""
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RecordIOReader:
    """Random-access reader for an indexed RecordIO file pair.

    The file is (re)opened lazily in each process, so the reader can be shared with DataLoader
    worker processes.
    """

    def __init__(self, rec_path: str | os.PathLike[str], idx_path: str | os.PathLike[str]) -> None:
        self.rec_path = os.fspath(rec_path)
        self.idx_path = os.fspath(idx_path)
        self.offsets: dict[int, int] = {}
        with open(self.idx_path, encoding="ascii") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != 2:
                    raise ValueError(f"{self.idx_path}:{lineno}: expected 'key<TAB>offset'")
                self.offsets[int(parts[0])] = int(parts[1])
        self.keys: list[int] = list(self.offsets)
        self._fh = None
        self._pid = -1

    def _file(self):
        if self._fh is None or self._pid != os.getpid():
            self._fh = open(self.rec_path, "rb")  # noqa: SIM115 - kept open for reuse
            self._pid = os.getpid()
        return self._fh

    def read(self, key: int) -> bytes:
        """Return the payload of record ``key`` (multi-part records joined)."""
        try:
            offset = self.offsets[int(key)]
        except KeyError:
            raise KeyError(f"record {key} not in {self.idx_path}") from None
        f = self._file()
        f.seek(offset)
        parts: list[bytes] = []
        while True:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError(f"{self.rec_path}: truncated record {key} at offset {offset}")
            magic, lrec = struct.unpack("<II", head)
            if magic != RECORDIO_MAGIC:
                raise ValueError(
                    f"{self.rec_path}: bad magic {magic:#x} in record {key} (offset {offset})"
                )
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            data = f.read(length)
            if len(data) != length:
                raise ValueError(f"{self.rec_path}: truncated record {key} at offset {offset}")
            f.seek(-length % 4, os.SEEK_CUR)
            if cflag == 0:
                return data
            if (cflag == 1) != (not parts):
                raise ValueError(f"{self.rec_path}: broken multi-part record {key}")
            parts.append(data)
            if cflag == 3:
                return _MAGIC_BYTES.join(parts)

    def close(self) -> None:
        """Close the file handle (it is reopened on the next read)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fh"], state["_pid"] = None, -1
        return state

    def __len__(self) -> int:
        return len(self.offsets)


def _resolve_paths(root: str | os.PathLike[str]) -> tuple[str, str]:
    root = os.fspath(root)
    if os.path.isdir(root):
        prefix = os.path.join(root, "train")
    elif root.endswith(".rec") or root.endswith(".idx"):
        prefix = root[:-4]
    else:
        prefix = root
    rec, idx = prefix + ".rec", prefix + ".idx"
    for p in (rec, idx):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"RecordIO file {p} not found")
    return rec, idx


class RecordIODataset(Dataset):
    """insightface ``train.rec`` / ``train.idx`` face dataset (no mxnet needed).

    Items are ``(image, label)``: ``image`` is the ``transform`` of the decoded ``[3, H, W]``
    uint8 RGB tensor (the tensor itself when ``transform`` is None), ``label`` the int class
    (the first element when the record holds a label array).

    Args:
        root: folder holding ``train.rec`` + ``train.idx``, or a path prefix / ``.rec`` path.
        transform: applied to each image tensor.
        progress: progress bar when :attr:`num_classes` has to scan every record.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        progress: bool = True,
    ) -> None:
        self.rec_path, self.idx_path = _resolve_paths(root)
        self.reader = RecordIOReader(self.rec_path, self.idx_path)
        self.transform = transform
        self.progress = progress
        self.header0: tuple[int, int] | None = None
        self.identity_ranges: list[tuple[int, int]] | None = None
        first = self.reader.read(0) if 0 in self.reader.offsets else None
        header = unpack_record(first)[0] if first is not None else None
        if header is not None and self._is_header(header):
            lab = np.asarray(header.label)
            self.header0 = (int(lab[0]), int(lab[1]))
            self.imgidx = np.arange(1, self.header0[0], dtype=np.int64)
        else:
            self.imgidx = np.asarray(self.reader.keys, dtype=np.int64)
        self._num_classes: int | None = None
        if self.header0 is not None:
            self._num_classes = self.header0[1] - self.header0[0]

    def _is_header(self, header: IRHeader) -> bool:
        """insightface reads any index-0 record with ``flag > 0`` as the header; also require a
        plausible ``(first_identity_record, end)`` pair so that a header-less file whose first
        image has an array label is not misread."""
        if header.flag < 2:
            return False
        a, b = (float(v) for v in np.asarray(header.label)[:2])
        n = len(self.reader)
        return a.is_integer() and b.is_integer() and 1 <= a <= b <= n

    def read_identity_ranges(self) -> list[tuple[int, int]]:
        """``[(first_image, end_image), ...]`` per identity from the identity records."""
        if self.header0 is None:
            raise ValueError(f"{self.rec_path} has no index-0 header record")
        if self.identity_ranges is None:
            ranges = []
            for key in range(*self.header0):
                header, _ = unpack_record(self.reader.read(key))
                lab = np.atleast_1d(np.asarray(header.label))
                ranges.append((int(lab[0]), int(lab[1])))
            self.identity_ranges = ranges
        return self.identity_ranges

    @property
    def num_classes(self) -> int:
        """Number of identities: from the header record, else ``max(label) + 1`` over a scan."""
        if self._num_classes is None:
            top = -1
            for key in tqdm(self.imgidx, desc="scanning labels", disable=not self.progress):
                top = max(top, self._label(unpack_record(self.reader.read(int(key)))[0]))
            self._num_classes = top + 1
        return self._num_classes

    @staticmethod
    def _label(header: IRHeader) -> int:
        lab = header.label
        return int(np.asarray(lab).reshape(-1)[0]) if header.flag > 0 else int(lab)

    def __len__(self) -> int:
        return len(self.imgidx)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        key = int(self.imgidx[index])
        header, payload = unpack_record(self.reader.read(key))
        image = to_chw_tensor(decode_image(payload, source=f"{self.rec_path} record {key}"))
        if self.transform is not None:
            image = self.transform(image)
        return image, self._label(header)

    def __repr__(self) -> str:
        return f"RecordIODataset({self.rec_path!r}, images={len(self)})"


def _class_of(label: Label) -> int:
    if isinstance(label, int | float | np.integer | np.floating):
        return int(label)
    return int(np.asarray(label).reshape(-1)[0])


def write_recordio(
    path_prefix: str | os.PathLike[str],
    samples: Iterable[tuple[ImageLike, Label]],
    header: bool = True,
    fmt: str = "jpeg",
    quality: int = 95,
) -> tuple[str, str]:
    """Write ``(image, label)`` samples as ``<prefix>.rec`` + ``<prefix>.idx``.

    ``image`` is encoded bytes (written as is), an ``[H, W, 3]`` uint8 array or a ``[3, H, W]``
    uint8 tensor (encoded with ``fmt`` / ``quality``). ``label`` is a number or a sequence of
    floats (stored as a float32 label array, class = first element).

    With ``header=True`` (insightface layout) the samples are stably sorted by class and written
    as records ``1..N``, followed by one identity record per class present (label array
    ``(first_image, end_image)``) and the index-0 header record ``(N + 1, end)``. With
    ``header=False`` the samples are written as records ``0..N-1`` in the given order.
    Returns the ``(rec_path, idx_path)``.
    """
    prefix = os.fspath(path_prefix)
    if os.path.isdir(prefix):
        prefix = os.path.join(prefix, "train")
    rec_path, idx_path = prefix + ".rec", prefix + ".idx"
    items = list(samples)
    if header:
        items.sort(key=lambda s: _class_of(s[1]))

    def payload(image: ImageLike) -> bytes:
        if isinstance(image, bytes | bytearray | memoryview):
            return bytes(image)
        return encode_image(image, fmt=fmt, quality=quality)

    with RecordIOWriter(rec_path, idx_path) as w:
        if not header:
            for key, (image, label) in enumerate(items):
                w.write(key, pack_record(label, payload(image), id=key))
            return rec_path, idx_path
        ranges: list[tuple[int, int]] = []
        for key, (image, label) in enumerate(items, start=1):
            cls = _class_of(label)
            if ranges and _class_of(items[ranges[-1][0] - 1][1]) == cls:
                ranges[-1] = (ranges[-1][0], key + 1)
            else:
                ranges.append((key, key + 1))
            w.write(key, pack_record(label, payload(image), id=key))
        first_id = len(items) + 1
        for j, (a, b) in enumerate(ranges):
            w.write(first_id + j, pack_record([a, b], b"", id=first_id + j))
        w.write(0, pack_record([first_id, first_id + len(ranges)], b""))
    return rec_path, idx_path
