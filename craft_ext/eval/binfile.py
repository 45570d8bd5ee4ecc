"""insightface verification ``.bin`` files (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``, ...).

A ``.bin`` file is a pickle of ``(bins, issame_list)``: ``bins`` holds ``2N`` encoded images
(JPEG/PNG), as ``bytes`` (files written by Python 2 or by ``pickle.dump`` of bytes) or as 1-D
uint8 numpy arrays (files written from ``np.fromfile`` / ``cv2.imencode``); images ``2i`` and
``2i+1`` form pair ``i`` and ``issame_list[i]`` says whether they show the same person.

Pickles can run arbitrary code, so :func:`load_bin` unpickles with :class:`SafeBinUnpickler`,
which resolves only the globals such files need (see its docstring); anything else (``os.system``,
``builtins.eval``, ...) raises :class:`pickle.UnpicklingError`.
"""

from __future__ import annotations

import codecs
import io
import os
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.image import decode_image, encode_image, resize_center_crop, to_chw_tensor

__all__ = ["SafeBinUnpickler", "load_bin", "safe_load_pickle", "write_bin"]

_ALLOWED_DTYPES = {"u1": np.dtype(np.uint8), "|u1": np.dtype(np.uint8), "b1": np.dtype(np.bool_)}


class _DtypeStub:
    """Stands in for ``numpy.dtype(...)`` while unpickling: its pickled state is checked here
    instead of being handed to numpy's C ``__setstate__`` (which trusts flags and fields)."""

    def __init__(self, name: Any, align: Any = False, copy: Any = False) -> None:
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        if not isinstance(name, str) or name not in _ALLOWED_DTYPES:
            raise pickle.UnpicklingError(f"refusing numpy dtype {name!r} (only uint8 / bool)")
        self.dtype = _ALLOWED_DTYPES[name]

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags) for simple types
        if not isinstance(state, tuple) or len(state) < 5:
            raise pickle.UnpicklingError("malformed numpy dtype state")
        byteorder = state[1].decode() if isinstance(state[1], bytes) else state[1]
        if byteorder not in ("|", "<", ">", "=") or any(x is not None for x in state[2:5]):
            raise pickle.UnpicklingError("refusing a structured or sub-array numpy dtype")
        if len(state) >= 8 and state[7] not in (0, -1):
            raise pickle.UnpicklingError("refusing numpy dtype flags")


def _resolve_dtype(obj: Any) -> np.dtype:
    if not isinstance(obj, _DtypeStub):
        raise pickle.UnpicklingError("numpy array without an allowed dtype")
    return obj.dtype


class _ArrayStub:
    """Stands in for ``numpy.ndarray`` from ``_reconstruct``; built from checked state."""

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        # (version, shape, dtype, is_fortran, rawdata); version is absent in old pickles
        if isinstance(state, tuple) and len(state) == 4:
            state = (0, *state)
        if not isinstance(state, tuple) or len(state) != 5:
            raise pickle.UnpicklingError("malformed numpy array state")
        _, shape, dtype, fortran, raw = state
        if isinstance(raw, str):
            raw = raw.encode("latin1")
        if not isinstance(raw, bytes | bytearray):
            raise pickle.UnpicklingError("numpy array data must be bytes")
        self.array = _build_array(raw, _resolve_dtype(dtype), shape, "F" if fortran else "C")


def _build_array(raw: Any, dtype: np.dtype, shape: Any, order: str) -> np.ndarray:
    if not isinstance(shape, tuple | list) or not all(isinstance(n, int) for n in shape):
        raise pickle.UnpicklingError("malformed numpy array shape")
    arr = np.frombuffer(bytes(raw), dtype=dtype)
    try:
        return arr.reshape(tuple(shape), order="F" if order == "F" else "C").copy()
    except ValueError as exc:
        raise pickle.UnpicklingError(f"numpy array data does not match its shape: {exc}") from None


def _safe_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> _ArrayStub:
    if subtype is not _NDARRAY_MARK:
        raise pickle.UnpicklingError("numpy _reconstruct is only allowed for numpy.ndarray")
    return _ArrayStub()


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    # numpy's protocol-5 path: ndarray.__reduce_ex__(5) -> _frombuffer(buffer, dtype, shape, order)
    if not isinstance(buf, bytes | bytearray | pickle.PickleBuffer):
        raise pickle.UnpicklingError("numpy _frombuffer needs an in-band buffer")
    order = order.decode() if isinstance(order, bytes) else str(order)
    return _build_array(bytes(buf), _resolve_dtype(dtype), shape, order)


def _safe_codecs_encode(obj: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    # Python 3 pickles ``bytes`` at protocol < 3 as _codecs.encode(str, "latin1").
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only _codecs.encode(str, 'latin1') is allowed")
    return codecs.encode(obj, "latin1")


class _Global:
    """What :meth:`SafeBinUnpickler.find_class` hands out: a callable that cannot be modified
    through the pickle (``BUILD`` on it raises, it has no ``__dict__``) nor used with
    ``NEWOBJ`` (it is not a class)."""

    __slots__ = ("_fn", "_name")

    def __init__(self, fn: Any, name: str) -> None:
        self._fn = fn
        self._name = name

    def __call__(self, *args: Any) -> Any:
        if self._fn is None:
            raise pickle.UnpicklingError(f"{self._name} may not be called from a .bin file")
        return self._fn(*args)

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"refusing to modify {self._name} from a .bin file")

    def __repr__(self) -> str:
        return f"<safe global {self._name}>"


_NDARRAY_MARK = _Global(None, "numpy.ndarray")  # only valid as _reconstruct's first argument


def _resolve(obj: Any) -> Any:
    """Replace array stubs by arrays inside the unpickled lists / tuples."""
    if isinstance(obj, _ArrayStub):
        if obj.array is None:
            raise pickle.UnpicklingError("numpy array without state")
        return obj.array
    if isinstance(obj, _DtypeStub | _Global | type):
        raise pickle.UnpicklingError("unexpected numpy object in a verification .bin file")
    if isinstance(obj, list):
        return [_resolve(o) for o in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(o) for o in obj)
    return obj


_ALLOWED_GLOBALS: dict[tuple[str, str], _Global] = {
    ("numpy.core.multiarray", "_reconstruct"): _Global(_safe_reconstruct, "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): _Global(_safe_reconstruct, "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"): _Global(_safe_frombuffer, "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"): _Global(_safe_frombuffer, "_frombuffer"),
    ("numpy", "ndarray"): _NDARRAY_MARK,
    ("numpy", "dtype"): _Global(_DtypeStub, "numpy.dtype"),
    ("_codecs", "encode"): _Global(_safe_codecs_encode, "_codecs.encode"),
}


class SafeBinUnpickler(pickle.Unpickler):
    """Unpickler for ``.bin`` verification files that cannot run code.

    Plain opcodes give lists, tuples, bytes, str, ints and bools. The only globals resolved are
    those numpy uint8 / bool arrays and Python-3 ``bytes`` need, each replaced by a checking
    stand-in (numpy's own C ``__setstate__`` never sees data from the file; arrays are rebuilt
    with ``np.frombuffer`` from the checked state):

    * ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct`` (numpy 1 /
      numpy 2 module names) with ``numpy.ndarray`` - the protocol 0-4 ndarray reduction;
    * ``numpy.dtype`` - restricted to uint8 and bool, no fields / sub-arrays / flags;
    * ``numpy.core.numeric._frombuffer`` / ``numpy._core.numeric._frombuffer`` - protocol 5;
    * ``_codecs.encode`` - restricted to ``(str, "latin1")``.

    Everything else, and persistent ids, raise :class:`pickle.UnpicklingError`.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} from a verification .bin file"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in verification .bin files")


def safe_load_pickle(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`SafeBinUnpickler` (``encoding="bytes"`` like insightface)."""
    return _resolve(SafeBinUnpickler(io.BytesIO(data), encoding="bytes").load())


def _unpickle_bin(raw: bytes, path: str) -> Any:
    """:func:`safe_load_pickle` of a ``.bin`` file's bytes, errors naming the file in one
    line: ``pickle.UnpicklingError`` for a refused global (code), ValueError for a file that
    is not a pickle of the expected kind."""
    if not raw:
        raise ValueError(f"{path}: empty file, not an insightface verification .bin")
    try:
        return safe_load_pickle(raw)
    except pickle.UnpicklingError as exc:
        if str(exc).startswith(("refusing", "persistent ids")):
            raise pickle.UnpicklingError(f"{path}: refused: {exc}") from None
        reason = f"({' '.join(str(exc).split())})"
    except Exception as exc:  # a random or truncated file fails anywhere in the unpickler
        reason = f"({type(exc).__name__}: {' '.join(str(exc).split())})"
    if raw[:1] not in (b"\x80", b"(", b"]"):  # PROTO (protocol >= 2), or a protocol 0/1 list
        reason = "(it does not start like a pickle)"
    what = "an insightface verification .bin file, a pickle of (images, issame)"
    raise ValueError(f"{path}: not {what} {reason}") from None


def _to_bytes(item: Any, i: int, path: str) -> bytes:
    if isinstance(item, bytes | bytearray):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    raise ValueError(f"{path}: image {i} is a {type(item).__name__}, expected bytes or uint8 array")


def load_bin(
    path: str | os.PathLike[str],
    image_size: int | tuple[int, int] | None = None,
    progress: bool = True,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an insightface verification ``.bin`` file safely.

    Args:
        path: the ``.bin`` file.
        image_size: resize / centre-crop every image to this (H, W); by default all images must
            share the size of the first one.
        progress: show a progress bar while decoding.
        limit: decode only the first ``limit`` images (``issame`` keeps the pairs they hold
            completely); None: all.

    Returns:
        ``(images, issame)``: uint8 ``[2N, 3, H, W]`` RGB tensor and bool ``[N]`` tensor.

    Raises (each message one line naming the file): ``pickle.UnpicklingError`` when the file
    asks for a global that could run code; ValueError when it is not a ``.bin`` file (not a
    pickle, or not of ``(bins, issame_list)``); :class:`craft_ext.data.ImageDecodeError` for an
    image that does not decode.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    obj = _unpickle_bin(raw, path)
    if not isinstance(obj, tuple | list) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair")
    bins, issame_list = obj
    if isinstance(issame_list, np.ndarray):
        issame_list = issame_list.tolist()
    if not isinstance(bins, list | tuple) or not isinstance(issame_list, list | tuple):
        raise ValueError(f"{path}: bins and issame_list must be sequences")
    if len(bins) != 2 * len(issame_list):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame_list)} pairs")
    if not all(isinstance(b, bool | int | np.bool_) for b in issame_list):
        raise ValueError(f"{path}: issame_list must hold booleans")
    size = None
    if image_size is not None:
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if limit is not None:
        bins, issame_list = bins[:limit], issame_list[: max(limit, 0) // 2]
    images: torch.Tensor | None = None
    name = os.path.basename(path)
    for i, item in enumerate(tqdm(bins, desc=f"decoding {name}", disable=not progress)):
        arr = decode_image(_to_bytes(item, i, path), source=f"{path} image {i}")
        if size is None:
            size = arr.shape[:2]
        elif arr.shape[:2] != tuple(size):
            if image_size is None:
                raise ValueError(
                    f"{path}: image {i} is {arr.shape[:2]}, earlier ones {tuple(size)}; "
                    "pass image_size to resize"
                )
            arr = resize_center_crop(arr, size)
        if images is None:
            images = torch.empty((len(bins), 3, size[0], size[1]), dtype=torch.uint8)
        images[i] = to_chw_tensor(arr)
    if images is None:
        h, w = size if size is not None else (112, 112)
        images = torch.empty((0, 3, h, w), dtype=torch.uint8)
    return images, torch.tensor([bool(b) for b in issame_list], dtype=torch.bool)


def write_bin(
    path: str | os.PathLike[str],
    images: torch.Tensor | np.ndarray | Sequence[np.ndarray],
    issame: torch.Tensor | Sequence[bool],
    fmt: str = "png",
    as_numpy: bool = False,
    protocol: int = 4,
) -> None:
    """Write an insightface-style ``.bin`` file.

    Args:
        path: output file.
        images: ``2N`` RGB uint8 images, ``[2N, 3, H, W]`` tensor/array or ``[H, W, 3]`` arrays.
        issame: ``N`` booleans.
        fmt: image encoding ("png" is lossless, "jpeg" as in the published files).
        as_numpy: store each encoded image as a 1-D uint8 numpy array instead of ``bytes``.
        protocol: pickle protocol.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1] == 3:
        items = list(images.transpose(0, 2, 3, 1))
    else:
        items = [np.asarray(im) for im in images]
    same = [bool(b) for b in (issame.tolist() if isinstance(issame, torch.Tensor) else issame)]
    if len(items) != 2 * len(same):
        raise ValueError(f"{len(items)} images for {len(same)} pairs")
    bins: list[Any] = []
    for im in items:
        data = encode_image(im, fmt=fmt)
        bins.append(np.frombuffer(data, dtype=np.uint8).copy() if as_numpy else data)
    with open(path, "wb") as f:
        pickle.dump((bins, same), f, protocol=protocol)
