"""The paper's Eq. 1 check: do near-zero filters matter?

For each threshold theta, the first-layer filters with max |w| <= theta are zeroed and the
embeddings of N images are compared with those of the unmodified network by cosine
similarity. Where the similarity stays at 1.0 the zeroed filters were truly inactive.

Images come from a folder (any PIL-readable files, searched recursively, sorted by path), an
insightface ``.bin`` verification set (pickled list of encoded images), or a tensor. They are
decoded as RGB, resized to the network input size if needed and normalised as in arcface_torch:
``(x / 255 - 0.5) / 0.5``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import filter_stats
from .io import AnalysisError, Source, load_model

__all__ = [
    "DEFAULT_THETAS",
    "IMAGE_EXTENSIONS",
    "find_layer",
    "format_sweep",
    "input_size",
    "load_images",
    "threshold_sweep",
]

DEFAULT_THETAS: tuple[float, ...] = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 2e-2, 5e-2, 1e-1)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def _to_tensor(img: Any, size: tuple[int, int]) -> Tensor:
    from PIL import Image

    img = img.convert("RGB")
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
    return (x / 255.0 - 0.5) / 0.5


def load_images(
    data: str | os.PathLike | Tensor, n: int = 64, size: tuple[int, int] = (112, 112)
) -> Tensor:
    """Load up to ``n`` images as a float32 [n, 3, H, W] batch in arcface normalisation.

    Args:
        data: an image folder, a ``.bin`` verification set, or a tensor (returned, cut to n).
        n: number of images (the first n in sorted path order / file order).
        size: (H, W) the images are resized to when they differ.

    Raises:
        FileNotFoundError: ``data`` does not exist.
        AnalysisError: no readable images.
    """
    if isinstance(data, Tensor):
        if data.dim() != 4:
            raise AnalysisError(f"image tensor must be [N, C, H, W], got {tuple(data.shape)}")
        return data[:n].float()
    from PIL import Image, UnidentifiedImageError

    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"no such image folder or .bin file: {str(path)!r}")
    images: list[Tensor] = []
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        for p in files:
            if len(images) >= n:
                break
            try:
                with Image.open(p) as img:
                    images.append(_to_tensor(img, size))
            except (UnidentifiedImageError, OSError):
                continue  # skip unreadable files
    elif path.suffix.lower() == ".bin":
        from ..eval import load_bin  # restricted unpickler: a .bin file cannot run code

        try:
            pixels, _ = load_bin(path, image_size=size, progress=False, limit=n)
        except Exception as exc:
            raise AnalysisError(f"cannot read {str(path)!r} as an insightface .bin: {exc}") from exc
        if len(pixels) == 0:
            raise AnalysisError(f"no readable images in {str(path)!r}")
        return pixels.float().div_(127.5).sub_(1.0)
    else:
        try:
            with Image.open(path) as img:
                images.append(_to_tensor(img, size))
        except (UnidentifiedImageError, OSError) as exc:
            raise AnalysisError(
                f"{str(path)!r} is neither an image folder, a .bin set nor an image"
            ) from exc
    if not images:
        raise AnalysisError(f"no readable images in {str(path)!r}")
    return torch.stack(images)


# --------------------------------------------------------------------------------------------
# sweep
# --------------------------------------------------------------------------------------------


def find_layer(model: nn.Module, layer: str | None = None) -> tuple[str, nn.Parameter]:
    """The first-layer conv weight parameter of ``model`` as ``(name, param)``.

    ``layer`` names it (e.g. ``conv1.weight``); otherwise ``conv1.weight`` if present, else the
    first 4-D weight with 3 input channels, else the first 4-D weight.
    """
    params = dict(model.named_parameters())
    if layer is not None:
        if layer not in params:
            raise AnalysisError(f"model has no parameter {layer!r}")
        return layer, params[layer]
    convs = {k: v for k, v in params.items() if v.dim() == 4 and k.endswith("weight")}
    if not convs:
        raise AnalysisError("model has no conv weight")
    if "conv1.weight" in convs:
        return "conv1.weight", convs["conv1.weight"]
    for k, v in convs.items():
        if v.shape[1] == 3:
            return k, v
    k = next(iter(convs))
    return k, convs[k]


def input_size(model: nn.Module, default: tuple[int, int] = (112, 112)) -> tuple[int, int]:
    """The (H, W) input size ``model`` was built for: its ``input_size`` attribute
    (craft_ext iresnet / MobileFaceNet, whose size :func:`craft_ext.models.infer_network`
    recovers from a checkpoint's head), else ``default``."""
    size = getattr(model, "input_size", None)
    if isinstance(size, int):
        return (size, size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return (int(size[0]), int(size[1]))
    return default


def _embed(model: nn.Module, images: Tensor, batch_size: int) -> Tensor:
    outs = []
    for i in range(0, images.shape[0], batch_size):
        out = model(images[i : i + batch_size])
        if isinstance(out, (tuple, list)):
            out = out[0]
        outs.append(out.reshape(out.shape[0], -1).double())
    return torch.cat(outs)


def threshold_sweep(
    model: Source,
    data: str | os.PathLike | Tensor,
    *,
    thetas: Sequence[float] = DEFAULT_THETAS,
    n: int = 64,
    batch_size: int = 32,
    layer: str | None = None,
    network: str | None = None,
    size: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Zero the first-layer filters with max |w| <= theta and compare embeddings (Eq. 1).

    Args:
        model: an ``nn.Module`` or anything :func:`craft_ext.analysis.io.load_model` builds a
            network from (needs ``craft_ext.models``).
        data: image folder, ``.bin`` set or a [N, 3, H, W] tensor (already normalised).
        thetas: thresholds to sweep.
        n: number of images.
        batch_size: forward batch size.
        layer: parameter name of the layer to zero (default: first conv).
        network: network name when building from weights (default: inferred).
        size: (H, W) input size (default :func:`input_size`: the network's own, e.g. 64 for
            a craft-train demo checkpoint, whose ``fc`` expects a 64 x 64 input).

    Returns:
        dict with ``layer``, ``filters``, ``images``, ``input_size`` ([H, W]) and ``results``:
        one entry per theta with
        ``theta``, ``zeroed`` (count), ``indices``, ``cos_mean``, ``cos_min``, ``cos_max``.
        The model's weights are restored afterwards.
    """
    net = load_model(model, network=network)
    size = size or input_size(net)
    images = load_images(data, n=n, size=size)
    name, weight = find_layer(net, layer)
    device = weight.device
    images = images.to(device=device, dtype=weight.dtype)
    max_abs = filter_stats(weight.detach()).max_abs.cpu()
    original = weight.detach().clone()
    was_training = net.training
    net.eval()
    results = []
    try:
        with torch.no_grad():
            ref = _embed(net, images, batch_size)
            for theta in thetas:
                mask = max_abs <= float(theta)
                weight.copy_(original)
                weight[mask.to(device)] = 0
                emb = _embed(net, images, batch_size)
                cos = F.cosine_similarity(ref, emb, dim=1, eps=1e-12).cpu()
                results.append(
                    {
                        "theta": float(theta),
                        "zeroed": int(mask.sum()),
                        "indices": torch.nonzero(mask).flatten().tolist(),
                        "cos_mean": float(cos.mean()),
                        "cos_min": float(cos.min()),
                        "cos_max": float(cos.max()),
                    }
                )
    finally:
        with torch.no_grad():
            weight.copy_(original)
        net.train(was_training)
    return {
        "layer": name,
        "filters": int(weight.shape[0]),
        "images": int(images.shape[0]),
        "input_size": [int(images.shape[-2]), int(images.shape[-1])],
        "results": results,
    }


def format_sweep(result: dict[str, Any]) -> str:
    """Human-readable table of a :func:`threshold_sweep` result."""
    lines = [
        f"layer {result['layer']}: {result['filters']} filters, {result['images']} images"
        + (" at {}x{} px".format(*result["input_size"]) if "input_size" in result else ""),
        f"{'theta':>10} {'zeroed':>7} {'cos mean':>10} {'cos min':>10}",
    ]
    for r in result["results"]:
        lines.append(
            f"{r['theta']:>10.3g} {r['zeroed']:>7d} {r['cos_mean']:>10.6f} {r['cos_min']:>10.6f}"
        )
    return "\n".join(lines)
