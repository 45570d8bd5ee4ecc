"""Face-recognition training data: image folders, insightface RecordIO, synthetic data, loaders.

* :class:`ImageFolderDataset` - ``root/<identity>/<image>`` with identity-list filtering.
* :class:`RecordIODataset` - insightface ``train.rec`` / ``train.idx`` read without mxnet;
  :func:`write_recordio` writes such files.
* :class:`SyntheticFaceDataset` - deterministic random images for throughput runs.
* :func:`train_transform` / :func:`eval_transform` - flip + arcface_torch normalisation.
* :func:`make_loader` - reproducible, resumable (and distributed-aware) batch loading.
"""

from __future__ import annotations

from .folder import IMAGE_EXTENSIONS, ImageFolderDataset, read_identity_list
from .image import (
    ImageDecodeError,
    decode_image,
    encode_image,
    load_image,
    resize_center_crop,
    to_chw_tensor,
)
from .loader import FaceLoader, ResumableSampler, make_loader
from .recordio import (
    RECORDIO_MAGIC,
    IRHeader,
    RecordIODataset,
    RecordIOReader,
    RecordIOWriter,
    pack_record,
    unpack_record,
    write_recordio,
)
from .synthetic import SyntheticFaceDataset
from .transforms import (
    Compose,
    Normalize,
    RandomHorizontalFlip,
    Resize,
    eval_transform,
    normalize,
    train_transform,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "RECORDIO_MAGIC",
    "Compose",
    "FaceLoader",
    "IRHeader",
    "ImageDecodeError",
    "ImageFolderDataset",
    "Normalize",
    "RandomHorizontalFlip",
    "Resize",
    "RecordIODataset",
    "RecordIOReader",
    "RecordIOWriter",
    "ResumableSampler",
    "SyntheticFaceDataset",
    "decode_image",
    "encode_image",
    "eval_transform",
    "load_image",
    "make_loader",
    "normalize",
    "pack_record",
    "read_identity_list",
    "resize_center_crop",
    "to_chw_tensor",
    "train_transform",
    "unpack_record",
    "write_recordio",
]
