"""Loading the inputs of the analysis tools.

Every tool takes a *source*, which may be

* an ``nn.Module`` (its ``state_dict()`` is used);
* a state dict (``{name: Tensor}``), possibly with ``module.`` / ``backbone.`` / ``_orig_mod.``
  / ``model.`` key prefixes (DataParallel, wrapped backbones, ``torch.compile``) or any other
  prefix common to every key (``encoder.``, ``model.backbone.``, ``student.net.``...), see
  :func:`strip_common_prefix`; when only some keys start with ``backbone.`` (a backbone
  saved with its head), those keys alone are kept;
* a craft-train checkpoint dict (``{"format": "craft_ext.checkpoint.v1", "backbone": ...}``)
  or another common wrapper: the state dict under ``backbone``, ``state_dict``,
  ``model_state_dict``, ``net_state_dict``, ``model``, ``net`` or ``network``, nested to any
  depth (``{"model": {"state_dict": ...}}``);
* a path to any of those saved with ``torch.save`` (loaded with ``weights_only=True``);
* a craft-train run directory: ``backbone.pth``, else ``checkpoint_last.pt``, else
  ``checkpoint_best.pt`` inside it is used.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "RUN_DIR_FILES",
    "AnalysisError",
    "Source",
    "build_model",
    "conv_weights",
    "first_conv",
    "load_model",
    "load_state_dict",
    "resolve_checkpoint_path",
    "strip_common_prefix",
    "unwrap_state_dict",
]

CHECKPOINT_FORMAT = "craft_ext.checkpoint.v1"
#: files looked for, in this order, when a source is a run directory
RUN_DIR_FILES = ("backbone.pth", "checkpoint_last.pt", "checkpoint_best.pt")
#: key prefixes stripped from state-dict keys when every key has them
PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.")
#: prefix of a backbone inside a larger module (e.g. backbone + margin head): kept alone
_BACKBONE_PREFIX = "backbone."
#: dict keys under which wrappers keep the backbone state dict, most specific first
_WRAPPER_KEYS = (
    "backbone",
    "state_dict",
    "model_state_dict",
    "net_state_dict",
    "model",
    "net",
    "network",
)

Source = str | os.PathLike | nn.Module | Mapping[str, Any]


class AnalysisError(ValueError):
    """An input the analysis tools cannot use (wrong format, no conv layer, empty data...)."""


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """Return the checkpoint file that ``path`` names (a file, or a run directory).

    Raises:
        FileNotFoundError: ``path`` does not exist, or is a directory without any of
            :data:`RUN_DIR_FILES`.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file or directory: {str(p)!r}")
    if p.is_dir():
        for name in RUN_DIR_FILES:
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(
            f"{str(p)!r} is a directory without a checkpoint "
            f"(looked for {', '.join(RUN_DIR_FILES)})"
        )
    return p


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsupported globals...
        raise AnalysisError(
            f"cannot load {str(path)!r} as a PyTorch checkpoint (torch.load weights_only=True): "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def strip_common_prefix(keys: list[str]) -> str:
    """The longest prefix of whole dotted components (``"encoder."``, ``"model.backbone."``)
    shared by every key that is a wrapper's attribute path rather than part of the network:
    after removing it every key still has a module path (at least one ``.``) and none starts
    with a numeric component (``"layers."`` before ``"0.conv.weight"`` is a container of the
    network, not a wrapper). ``""`` when there is none."""
    if not keys:
        return ""
    parts = [k.split(".") for k in keys]
    common: list[str] = []
    for comps in zip(*parts, strict=False):
        if len(set(comps)) != 1:
            break
        common.append(comps[0])
    while common:
        n = len(common)
        if all(len(p) - n >= 2 and not p[n].isdigit() for p in parts) and not any(
            c.isdigit() for c in common
        ):
            return ".".join(common) + "."
        common.pop()
    return ""


def _strip_prefixes(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = dict(sd)
    changed = True
    while changed and out:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
        if not changed and any(k.startswith(_BACKBONE_PREFIX) for k in out):
            n = len(_BACKBONE_PREFIX)
            out = {k[n:]: v for k, v in out.items() if k.startswith(_BACKBONE_PREFIX)}
            changed = True
        if not changed:
            prefix = strip_common_prefix(list(out))
            if prefix:
                out = {k[len(prefix) :]: v for k, v in out.items()}
                changed = True
    return out


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and any(isinstance(v, Tensor) for v in obj.values())
    )


def unwrap_state_dict(obj: Any) -> dict[str, Tensor]:
    """Extract the backbone state dict from a loaded object (see module docs).

    Non-tensor entries are dropped and common key prefixes are stripped.

    Raises:
        AnalysisError: no state dict with tensors can be found in ``obj``.
    """
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        fmt = obj.get("format")
        if isinstance(fmt, str) and fmt.startswith("craft_ext.checkpoint"):
            if "backbone" not in obj:
                raise AnalysisError(f"checkpoint of format {fmt!r} has no 'backbone' entry")
            return unwrap_state_dict(obj["backbone"])
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module) or _is_state_dict(inner):
                return unwrap_state_dict(inner)
            if isinstance(inner, Mapping):  # a wrapper inside a wrapper
                try:
                    return unwrap_state_dict(inner)
                except AnalysisError:
                    continue
        if _is_state_dict(obj):
            return _strip_prefixes({k: v for k, v in obj.items() if isinstance(v, Tensor)})
    raise AnalysisError(
        f"expected a state dict, a craft-train checkpoint or an nn.Module, got {type(obj).__name__}"
        + (f" with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, Mapping) else "")
    )


def load_state_dict(source: Source) -> dict[str, Tensor]:
    """Load ``source`` (module, dict, file or run directory) as a backbone state dict on CPU."""
    if isinstance(source, (str, os.PathLike)):
        path = resolve_checkpoint_path(source)
        try:
            return unwrap_state_dict(_torch_load(path))
        except AnalysisError as exc:
            if str(path) in str(exc):
                raise
            raise AnalysisError(f"{str(path)!r}: {exc}") from exc
    return unwrap_state_dict(source)


def conv_weights(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """All 4-D floating weights (conv kernels) of ``sd`` in state-dict order."""
    return {
        k: v
        for k, v in sd.items()
        if v.dim() == 4 and v.is_floating_point() and k.endswith("weight")
    }


def first_conv(sd: Mapping[str, Tensor], layer: str | None = None) -> tuple[str, Tensor]:
    """The first-layer conv weight of ``sd`` as ``(name, weight)``.

    ``layer`` picks a tensor by name (with or without the wrapper prefix the loader stripped:
    ``module.conv1.weight`` finds ``conv1.weight``); otherwise ``conv1.weight``
    (insightface iresnet), else the first conv weight with 3 input channels, else the first
    conv weight.

    Raises:
        AnalysisError: ``layer`` is missing or no conv weight exists.
    """
    if layer is not None:
        if layer not in sd:  # named with the wrapper prefix the loader stripped?
            found = [k for k in sd if layer.endswith("." + k)]
            if not found:
                near = [k for k in conv_weights(sd)][:10]
                raise AnalysisError(f"no tensor {layer!r} in the state dict; conv weights: {near}")
            layer = max(found, key=len)  # the most specific: layer1.0.conv1, not conv1
        w = sd[layer]
        if w.dim() < 2 or not w.is_floating_point():
            raise AnalysisError(f"{layer!r} has shape {tuple(w.shape)}: not a filter bank")
        return layer, w
    convs = conv_weights(sd)
    if not convs:
        raise AnalysisError("no conv weight (4-D tensor) found in the state dict")
    if "conv1.weight" in convs:
        return "conv1.weight", convs["conv1.weight"]
    for k, v in convs.items():
        if v.shape[1] == 3:
            return k, v
    k = next(iter(convs))
    return k, convs[k]


def load_model(source: Source, network: str | None = None) -> nn.Module:
    """An ``nn.Module`` in eval mode for ``source``.

    A module is returned as is (switched to eval mode). Otherwise the state dict is loaded and
    the network built with ``craft_ext.models`` (see :func:`build_model`).

    Raises:
        AnalysisError: ``craft_ext.models`` is unavailable or the weights do not fit.
    """
    if isinstance(source, nn.Module):
        return source.eval()
    return build_model(load_state_dict(source), network)[0].eval()


def build_model(
    sd: dict[str, Tensor], network: str | None = None
) -> tuple[nn.Module, str, dict[str, Any]]:
    """``(model, network name, get_model options)`` for the state dict ``sd``: the network
    ``infer_network`` finds (or ``network``, with default options when it differs), built
    with ``craft_ext.models.get_model`` and loaded strictly.

    Raises:
        AnalysisError: ``craft_ext.models`` is unavailable or the weights do not fit.
    """
    try:
        from craft_ext.models import get_model, infer_network
    except ImportError as exc:
        raise AnalysisError(
            f"building a model from weights needs craft_ext.models ({exc}); "
            "pass an nn.Module to the Python API instead"
        ) from exc
    try:
        name, options = infer_network(sd)
    except Exception as exc:
        if network is None:
            raise AnalysisError(f"cannot infer the network from the state dict: {exc}") from exc
        name, options = network, {}
    if network is not None and network != name:
        name, options = network, {}
    model = get_model(name, **options)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise AnalysisError(f"weights do not fit network {name!r}: {exc}") from exc
    return model, name, options
