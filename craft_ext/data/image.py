"""Image decoding / encoding helpers shared by the datasets and the verification readers.

Images travel through craft_ext as ``uint8`` RGB arrays: ``[H, W, 3]`` numpy while decoding and
``[3, H, W]`` torch tensors once they leave a dataset. Decoding uses PIL only.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "ImageDecodeError",
    "decode_image",
    "encode_image",
    "load_image",
    "resize_center_crop",
    "to_chw_tensor",
]


class ImageDecodeError(RuntimeError):
    """An image file or blob could not be read or decoded; the message names its source."""


def decode_image(data: bytes | bytearray | memoryview, source: str = "<bytes>") -> np.ndarray:
    """Decode JPEG/PNG/... bytes into an RGB ``uint8`` array ``[H, W, 3]``.

    Raises :class:`ImageDecodeError` naming ``source`` when the data is not a readable image.
    """
    try:
        with Image.open(io.BytesIO(bytes(data))) as img:
            img.load()
            return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"cannot decode image {source}: {exc}") from exc


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read and decode the image file ``path`` into an RGB ``uint8`` array ``[H, W, 3]``.

    Raises :class:`ImageDecodeError` (missing, unreadable or corrupt file), naming the file.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ImageDecodeError(f"cannot read image file {path}: {exc}") from exc
    return decode_image(data, source=path)


def encode_image(image: np.ndarray | torch.Tensor, fmt: str = "jpeg", quality: int = 95) -> bytes:
    """Encode an RGB ``uint8`` image (``[H, W, 3]`` array or ``[3, H, W]`` tensor) to bytes.

    ``fmt`` is any PIL format name ("jpeg", "png", ...); ``quality`` applies to JPEG.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().permute(1, 2, 0).numpy()
    arr = np.ascontiguousarray(image, dtype=np.uint8)
    buf = io.BytesIO()
    pil_fmt = fmt.upper().replace("JPG", "JPEG")
    kwargs = {"quality": int(quality)} if pil_fmt == "JPEG" else {}
    Image.fromarray(arr).save(buf, format=pil_fmt, **kwargs)
    return buf.getvalue()


def resize_center_crop(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize ``[H, W, 3]`` so that it covers ``size`` (H, W) and centre-crop to exactly it.

    Returns the input unchanged when it already has that size.
    """
    th, tw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    h, w = image.shape[:2]
    if (h, w) == (th, tw):
        return image
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    img = Image.fromarray(image)
    if (nh, nw) != (h, w):
        img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return np.asarray(img.crop((left, top, left + tw, top + th)), dtype=np.uint8).copy()


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 array -> contiguous ``[3, H, W]`` uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
