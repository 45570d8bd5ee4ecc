"""Correlation-guided connection sparsification (Sun, Wang and Tang, CVPR 2016).

Sun et al. ("Sparsifying Neural Network Connections for Face Recognition") score every
connection of a layer by how strongly the neurons it joins are correlated over training
samples, drop most of the weak ones and retrain, layer by layer from the top of the network
down. This module provides the three pieces:

* :func:`connection_scores`: the correlation score of every weight, shaped like the weight.

  - ``nn.Linear`` (weight ``[O, K]``), the paper's Eq. 1: ``r[i, k]`` is the Pearson
    correlation over the samples n between output neuron i, ``a[n, i]``, and input neuron k,
    ``b[n, k]``::

        r[i, k] = sum_n (a[n,i] - mean_a[i]) (b[n,k] - mean_b[k])
                  / sqrt(sum_n (a[n,i] - mean_a[i])^2 * sum_n (b[n,k] - mean_b[k])^2)

  - ``nn.Conv2d`` (weight ``[O, C, kh, kw]``), Eq. 2: the weight joins output map i and the
    input patch element k = (c, p, q) at every output position m, so
    ``r[i, k] = sum_m |corr_n(a[n, i, m], b[n, k, m])|`` where ``b[n, k, m]`` is the (zero
    padded) input value that element k of the kernel multiplies at output position m,
    honouring stride, padding and dilation. Only ``groups=1`` is supported.

  A neuron that is constant over the samples (a dead unit, or a patch element lying in the
  padding) has correlation 0 with everything.

  The PyTorch path (``backend="reference"``, :func:`craft_ext.reference.connection_scores`)
  walks over bands of output rows and never holds the whole im2col tensor
  ``[N, C*kh*kw, Ho*Wo]``; the Triton kernel
  (``craft_ext::connection_scores_triton``, ``kernels/connection_scores.py``) gathers the patch
  elements on the fly (implicit im2col) and accumulates centred moments per output position.

* :func:`dropping_mask`, :func:`apply_masks`, :func:`remove_masks`: the paper's dropping rule
  (keep ``lambda`` of the kept budget at random from the higher-scored half, the rest from the
  lower half; positive and negative correlations of fully connected layers handled apart) and
  masks that hold the dropped weights at zero through training
  (:func:`torch.nn.utils.prune.custom_from_mask`).

* :func:`layerwise_schedule`: sparsify the given layers from the top down, retraining between
  steps through a user function; :func:`make_retrain_fn` (a small SGD loop with
  :class:`~craft_ext.heads.NormalizedFC` and :class:`~craft_ext.losses.CombinedMarginLoss`) and
  :func:`trainer_retrain_fn` (drives ``craft_ext.train.Trainer.train_step``) build one.

No function here reads tensor values back to the host: counts per neuron, random choices and
the chunking depend on shapes only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from . import reference
from .ops import _FLOAT_DTYPES, _check_float_arg, _check_generator, resolve_backend

__all__ = [
    "apply_masks",
    "connection_scores",
    "dropping_mask",
    "layerwise_schedule",
    "make_retrain_fn",
    "remove_masks",
    "trainer_retrain_fn",
]

#: Default budget (elements) of one chunk's temporaries in the PyTorch (reference) path.
DEFAULT_CHUNK_ELEMENTS = 1 << 21


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


def _single_tensor(value: object, arg: str) -> Tensor:
    """Accept a tensor, or a 1-tuple/list holding one (as forward hooks pass inputs)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 1:
            raise ValueError(f"{arg} must be one tensor (or a 1-tuple of one), got {len(value)}")
        value = value[0]
    if not isinstance(value, Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{arg} must be float16, bfloat16, float32 or float64, got {value.dtype}")
    return value


def _conv_geometry(module: nn.Conv2d) -> tuple[int, int, int, int, int, int, int, int, int, int]:
    """(kh, kw, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right, dil_h, dil_w)."""
    if module.groups != 1:
        raise ValueError(
            f"connection_scores supports Conv2d with groups=1 only, got groups={module.groups}"
        )
    if module.padding_mode != "zeros":
        raise ValueError(f"only padding_mode='zeros' is supported, got {module.padding_mode!r}")
    kh, kw = module.kernel_size
    sh, sw = module.stride
    dh, dw = module.dilation
    if isinstance(module.padding, str):
        if module.padding == "valid":
            pads = (0, 0, 0, 0)
        else:  # "same" (stride 1): torch puts the odd extra pixel at the bottom/right
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pads = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
    else:
        ph, pw = module.padding
        pads = (ph, ph, pw, pw)
    return kh, kw, sh, sw, *pads, dh, dw


def _check_pair(module: nn.Module, x: Tensor, y: Tensor) -> tuple[int, ...]:
    """Check ``x`` / ``y`` against ``module``; return the operator's geometry arguments
    ``(kh, kw, stride_h, stride_w, pad_top, pad_left, dil_h, dil_w)`` (a Linear layer is a
    1x1 convolution)."""
    if x.device != y.device:
        raise ValueError(f"inputs and outputs must be on one device, got {x.device}, {y.device}")
    if isinstance(module, nn.Linear):
        if x.dim() < 2 or x.shape[-1] != module.in_features:
            raise ValueError(
                f"Linear inputs must be [N, ..., {module.in_features}], got {tuple(x.shape)}"
            )
        if y.shape[:-1] != x.shape[:-1] or y.shape[-1] != module.out_features:
            raise ValueError(
                f"Linear outputs must be [{', '.join(map(str, x.shape[:-1]))}, "
                f"{module.out_features}] to match inputs {tuple(x.shape)}, got {tuple(y.shape)}"
            )
        return (1, 1, 1, 1, 0, 0, 1, 1)
    kh, kw, sh, sw, pt, pb, pl, pr, dh, dw = _conv_geometry(module)  # type: ignore[arg-type]
    if x.dim() != 4 or x.shape[1] != module.in_channels:  # type: ignore[union-attr]
        raise ValueError(
            f"Conv2d inputs must be [N, {module.in_channels}, H, W], got {tuple(x.shape)}"
        )
    ho = (x.shape[2] + pt + pb - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] + pl + pr - dw * (kw - 1) - 1) // sw + 1
    want = (x.shape[0], module.out_channels, ho, wo)  # type: ignore[union-attr]
    if tuple(y.shape) != want:
        raise ValueError(
            f"Conv2d outputs must be {want} for inputs {tuple(x.shape)}, got {tuple(y.shape)}"
        )
    return (kh, kw, sh, sw, pt, pl, dh, dw)


def _row_bands(x: Tensor, y: Tensor, kh: int, kw: int, chunk_elements: int) -> int:
    """How many bands of output rows keep the largest temporary of the PyTorch path
    (:func:`craft_ext.reference.connection_scores`) within ``chunk_elements`` (at least one
    row per band). From shapes only."""
    n, c = x.shape[:2]
    o, ho, wo = y.shape[1:]
    k = c * kh * kw
    per_row = max(n * k, n * o, o * k) * wo  # elements of the largest temporary, per row
    rows = max(1, min(ho, chunk_elements // per_row))
    return -(-ho // rows)


def connection_scores(
    module: nn.Module,
    inputs: Tensor | Sequence[Tensor],
    outputs: Tensor | Sequence[Tensor],
    *,
    backend: str | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """Correlation score of every connection of ``module``, shaped like ``module.weight``.

    Sun, Wang and Tang (CVPR 2016), Eq. 1 (``nn.Linear``) and Eq. 2 (``nn.Conv2d``); see the
    module docstring for the formulas. Neurons constant over the samples score 0.

    Args:
        module: ``nn.Linear`` or ``nn.Conv2d`` (``groups=1``, ``padding_mode="zeros"``).
        inputs: what the module received: Linear ``[N, ..., K]`` (leading dims are samples),
            Conv2d ``[N, C, H, W]``; a 1-tuple (as a forward hook gets) is accepted.
        outputs: what it returned (before any activation): Linear ``[N, ..., O]``, Conv2d
            ``[N, O, Ho, Wo]``.
        backend: ``"reference"`` (:func:`craft_ext.reference.connection_scores`: chunked
            PyTorch, any device) or ``"triton"`` (the fused kernel: CUDA, or CPU with
            ``TRITON_INTERPRET=1``). ``None`` takes :func:`craft_ext.use_backend`'s choice, else
            ``$CRAFT_EXT_BACKEND``, else ``"auto"``: Triton on CUDA when available, the chunked
            PyTorch path otherwise (interpreted Triton is never picked automatically). A
            backend that cannot run here (e.g. ``"cpp"``: there is no compiled kernel for this
            op) raises ``RuntimeError``.
        chunk_elements: element budget of one chunk's largest temporary in the PyTorch path
            (a chunk holds at least one output row).

    Returns:
        Tensor shaped like ``module.weight`` on the inputs' device: Linear scores are signed
        correlations in [-1, 1]; Conv2d scores are sums of ``|corr|`` over the ``Ho*Wo``
        positions. float64 for float64 activations (Triton: accumulated in float32), else
        float32.
    """
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise TypeError(f"module must be nn.Linear or nn.Conv2d, got {type(module).__name__}")
    x = _single_tensor(inputs, "inputs")
    y = _single_tensor(outputs, "outputs")
    geometry = _check_pair(module, x, y)
    if isinstance(chunk_elements, bool) or not isinstance(chunk_elements, int):
        raise TypeError(f"chunk_elements must be an int, got {type(chunk_elements).__name__}")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be >= 1, got {chunk_elements}")
    absolute = isinstance(module, nn.Conv2d)  # Eq. 2 sums |corr|; Eq. 1 keeps the sign
    if isinstance(module, nn.Linear):
        x = x.reshape(-1, module.in_features, 1, 1)
        y = y.reshape(-1, module.out_features, 1, 1)
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 samples to correlate, got {x.shape[0]}")
    chosen = resolve_backend(x.device, "connection_scores", backend)
    with torch.no_grad():
        if chosen == "triton":
            out = torch.ops.craft_ext.connection_scores_triton(x, y, *geometry, absolute)
            if torch.float64 in (x.dtype, y.dtype):
                out = out.double()
        else:  # "reference": the only other backend this op has
            splits = _row_bands(x, y, geometry[0], geometry[1], chunk_elements)
            out = reference.connection_scores(x, y, *geometry, absolute, splits)
    return out.reshape(module.weight.shape)


# --------------------------------------------------------------------------------------------
# Dropping masks
# --------------------------------------------------------------------------------------------


def _check_density(density: object) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a float in (0, 1], got {type(density).__name__}")
    density = float(density)
    if not (0.0 < density <= 1.0):
        raise ValueError(f"density (fraction of connections kept) must be in (0, 1], got {density}")
    return density


def _rank_within(key: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """Per row, the rank of each element within its group in ascending order of ``key``
    (ties broken by position).

    ``key`` [R, K]; ``groups`` [R, K] int64 in ``[0, num_groups)``. Returns int64 [R, K].
    """
    order = torch.sort(key, dim=1, stable=True).indices
    idx = torch.sort(groups.gather(1, order), dim=1, stable=True).indices
    order = order.gather(1, idx)
    sizes = torch.zeros(
        (groups.shape[0], num_groups), dtype=groups.dtype, device=groups.device
    ).scatter_add_(1, groups, torch.ones_like(groups))  # [R, G] group sizes
    starts = torch.cumsum(sizes, 1) - sizes
    position = torch.empty_like(order).scatter_(
        1, order, torch.arange(groups.shape[1], device=groups.device).expand_as(order)
    )
    return position - starts.gather(1, groups)


def _split(total: Tensor, share: Tensor, size_a: Tensor, size_b: Tensor) -> Tensor:
    """``round(share)`` clamped so that ``total - result`` fits ``size_b`` and result ``size_a``."""
    return torch.minimum(torch.maximum(torch.round(share), total - size_b), size_a)


def dropping_mask(
    scores: Tensor,
    density: float,
    lam: float = 0.75,
    generator: torch.Generator | None = None,
    *,
    signed: bool = True,
) -> Tensor:
    """Which connections to keep (True) under Sun et al.'s dropping rule (CVPR 2016, sec. 3.2).

    For every output neuron i (row ``scores[i]``, K = ``scores[i].numel()`` connections),
    ``keep = clamp(round(density * K), 1, K)`` connections survive. With ``signed`` (the
    paper's treatment of fully connected layers) the budget is split between the connections
    of positive (``r >= 0``) and negative correlation in proportion to their numbers,
    ``keep_pos = round(keep * K_pos / K)``; within each sign the connections are ranked by
    ``|r|``, the higher half (the ``ceil(K_s / 2)`` largest) supplies
    ``round(lam * keep_s)`` kept connections drawn uniformly at random and the lower half the
    remaining ``keep_s - round(lam * keep_s)`` (amounts clamped to what each part holds).
    Non-negative scores (every Conv2d score) thus reduce to the plain rule on ``r``.
    ``signed=False`` ranks by the raw score without a sign split.

    Args:
        scores: [O, ...] scores (:func:`connection_scores`), at least 2-D.
        density: S, the fraction of each neuron's connections kept, in (0, 1].
        lam: lambda in [0, 1], the share of the kept budget drawn from the higher half.
        generator: torch.Generator on the scores' device type for the random draws.

    Returns:
        bool tensor shaped like ``scores``, exactly ``clamp(round(density * K), 1, K)`` True
        per row. Ties in the ranking are broken by position; NaN scores rank arbitrarily.
    """
    if not isinstance(scores, Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() < 2 or scores.numel() == 0:
        raise ValueError(f"scores must be [O, ...] with at least 2 dims, got {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be floating point, got {scores.dtype}")
    density = _check_density(density)
    lam = _check_float_arg(lam, "lam", 0.0, 1.0)
    _check_generator(generator, scores.device)
    rows, k = scores.shape[0], scores[0].numel()
    s = scores.detach().reshape(rows, k).double()
    keep = float(min(k, max(1, round(density * k))))
    negative = (s < 0) if signed else torch.zeros_like(s, dtype=torch.bool)
    sign = negative.long()  # 0: r >= 0, 1: r < 0
    magnitude = s.abs() if signed else s
    k_neg = negative.sum(1).double()
    k_pos = k - k_neg
    keep_t = torch.full_like(k_neg, keep)
    keep_pos = _split(keep_t, keep_t * k_pos / k, k_pos, k_neg)
    keep_by_sign = torch.stack([keep_pos, keep_t - keep_pos], 1)  # [R, 2]
    size_by_sign = torch.stack([k_pos, k_neg], 1)
    # rank by magnitude (descending) within each sign
    rank = _rank_within(-magnitude, sign, 2)
    high_size = torch.ceil(size_by_sign / 2)
    low_size = size_by_sign - high_size
    in_low = (rank.double() >= high_size.gather(1, sign)).long()
    keep_high = _split(keep_by_sign, lam * keep_by_sign, high_size, low_size)
    quota = torch.stack(
        [
            keep_high[:, 0],
            keep_by_sign[:, 0] - keep_high[:, 0],
            keep_high[:, 1],
            keep_by_sign[:, 1] - keep_high[:, 1],
        ],
        1,
    )  # groups: pos-high, pos-low, neg-high, neg-low
    group = 2 * sign + in_low
    u = torch.rand(s.shape, generator=generator, device=s.device)
    random_rank = _rank_within(u, group, 4)
    mask = random_rank.double() < quota.gather(1, group)
    return mask.reshape(scores.shape)


def _named_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise KeyError(f"{name!r} is not a submodule of {type(model).__name__}") from exc


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """Attach ``masks`` ({submodule name: bool mask shaped like its weight}) as pruning masks.

    Uses :func:`torch.nn.utils.prune.custom_from_mask`: the parameter becomes ``weight_orig``
    (the same ``nn.Parameter`` object, so existing optimizers keep working) and ``weight`` is
    recomputed as ``weight_orig * mask`` before every forward, so dropped connections stay
    exactly zero however the optimizer (momentum, weight decay) moves ``weight_orig``. A module
    already masked gets the product of its masks. Returns ``model``.
    """
    checked = []
    for name, mask in masks.items():
        module = _named_module(model, name)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            raise ValueError(f"{name!r} has no weight to mask")
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask for {name!r} must be a bool tensor")
        if mask.shape != weight.shape:
            raise ValueError(
                f"mask for {name!r} has shape {tuple(mask.shape)}, weight {tuple(weight.shape)}"
            )
        checked.append((module, mask.to(weight.device)))
    for module, mask in checked:
        prune.custom_from_mask(module, "weight", mask)
    return model


def remove_masks(model: nn.Module, names: Iterable[str] | None = None) -> nn.Module:
    """Make the masks permanent: ``weight = weight_orig * mask`` becomes a plain parameter.

    ``names``: submodules to unmask (default: every masked module). Returns ``model``.
    """
    if names is None:
        targets = [m for m in model.modules() if prune.is_pruned(m) and hasattr(m, "weight_mask")]
    else:
        targets = [_named_module(model, n) for n in names]
    for module in targets:
        prune.remove(module, "weight")
    return model


# --------------------------------------------------------------------------------------------
# Layer-wise schedule
# --------------------------------------------------------------------------------------------


def _batch_images(batch: Any) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def collect_activations(
    model: nn.Module,
    module: nn.Module,
    data: Iterable[Any],
    *,
    max_samples: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Inputs and outputs of ``module`` while ``model`` (eval mode, no grad) sees ``data``.

    ``data`` yields image tensors or ``(images, labels, ...)`` tuples. At most ``max_samples``
    samples are kept. Returns ``(inputs, outputs)`` concatenated over batches.
    """
    seen_in: list[Tensor] = []
    seen_out: list[Tensor] = []

    def hook(_m: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
        seen_in.append(args[0].detach())
        seen_out.append(out.detach())

    handle = module.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    count = 0
    try:
        with torch.no_grad():
            for batch in data:
                images = _batch_images(batch)
                if device is not None:
                    images = images.to(device)
                model(images)
                count += images.shape[0]
                if max_samples is not None and count >= max_samples:
                    break
    finally:
        handle.remove()
        model.train(was_training)
    if not seen_in:
        raise ValueError("data yielded no batches")
    x, y = torch.cat(seen_in), torch.cat(seen_out)
    if max_samples is not None:
        x, y = x[:max_samples], y[:max_samples]
    return x, y


RetrainFn = Callable[[nn.Module, str], Any]


def layerwise_schedule(
    model: nn.Module,
    layers: Sequence[str],
    density: float | Mapping[str, float],
    retrain_fn: RetrainFn | None,
    data: Iterable[Any],
    *,
    lam: float = 0.75,
    generator: torch.Generator | None = None,
    max_samples: int | None = None,
    backend: str | None = None,
) -> dict[str, Tensor]:
    """Sun et al.'s schedule: sparsify ``layers`` one at a time, top layer first, retraining
    in between.

    For each name in ``layers`` (give them top-down, e.g. ``["fc", "layer4.1.conv2", ...]``):
    run ``model`` over ``data`` (see :func:`collect_activations`) to record the layer's inputs
    and outputs with the layers above already sparsified, score the connections
    (:func:`connection_scores`), draw :func:`dropping_mask` with that layer's density, attach it
    (:func:`apply_masks`) and call ``retrain_fn(model, name)``. Masks stay attached (call
    :func:`remove_masks` to bake them in).

    Using craft_ext's trainer: build a ``craft_ext.train.Trainer``, pass
    ``model=trainer.backbone``, ``retrain_fn=trainer_retrain_fn(trainer, steps)`` and any
    loader of its training images as ``data``; pruning masks keep the same parameter objects,
    so the trainer's optimizers (and its CRAFT reactivation) carry on::

        trainer = Trainer(cfg)
        data = [trainer._images(images) for images, _ in itertools.islice(loader, 4)]
        masks = layerwise_schedule(
            trainer.backbone, ["fc", "layer4.1.conv2", "layer4.1.conv1"], 0.5,
            trainer_retrain_fn(trainer, steps=2000), data,
        )
        trainer.run()  # fine-tune the rest of the schedule with the masks attached
        remove_masks(trainer.backbone)

    Without a trainer, :func:`make_retrain_fn` gives a plain SGD loop.

    Args:
        density: fraction of connections kept, one float or ``{layer: density}``.
        retrain_fn: called after each layer is masked; None skips retraining.
        data: re-iterable batches (a DataLoader, a list; not a one-shot iterator or
            generator): it is run through once per layer.
        generator: for the random draws of :func:`dropping_mask` (on the model's device type).

    Returns:
        ``{layer name: bool mask}`` in the order applied.
    """
    if isinstance(layers, str) or not layers:
        raise ValueError("layers must be a non-empty sequence of submodule names (top-down)")
    if isinstance(data, Iterator):  # iter(data) is data: exhausted after the first layer
        raise TypeError(
            f"data must be re-iterable (e.g. a DataLoader or a list of batches): it is read once "
            f"per layer, got a one-shot iterator ({type(data).__name__})"
        )
    plan = []
    for name in layers:  # validate everything before the first (costly) step
        module = _named_module(model, name)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{name!r} is {type(module).__name__}, not nn.Linear or nn.Conv2d")
        if isinstance(density, Mapping) and name not in density:
            raise KeyError(f"density has no entry for layer {name!r}")
        d = _check_density(density[name] if isinstance(density, Mapping) else density)
        plan.append((name, module, d))
    masks: dict[str, Tensor] = {}
    device = next(model.parameters()).device
    for name, module, d in plan:
        x, y = collect_activations(model, module, data, max_samples=max_samples, device=device)
        scores = connection_scores(module, x, y, backend=backend)
        mask = dropping_mask(scores, d, lam, generator)
        apply_masks(model, {name: mask})
        masks[name] = mask
        if retrain_fn is not None:
            retrain_fn(model, name)
    return masks


def make_retrain_fn(
    data: Iterable[tuple[Tensor, Tensor]],
    embedding_size: int,
    num_classes: int,
    *,
    steps: int = 100,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    margin: tuple[float, float, float, float] = (64.0, 1.0, 0.0, 0.4),
) -> RetrainFn:
    """A default retraining loop for :func:`layerwise_schedule`.

    The returned ``retrain(model, layer)`` trains ``model`` (images -> embeddings
    ``[N, embedding_size]``) for ``steps`` SGD steps (momentum, weight decay; a fresh optimizer
    per call) over ``data`` (re-iterable, e.g. a list or DataLoader, of ``(images, labels)``
    batches, cycled) with a
    :class:`~craft_ext.heads.NormalizedFC` head and
    :class:`~craft_ext.losses.CombinedMarginLoss` ``(s, m1, m2, m3) = margin`` (CosFace by
    default). The head persists across calls. Returns the last loss (a tensor, not read back).
    """
    from .heads import NormalizedFC, check_steps, margin_sgd_steps
    from .losses import CombinedMarginLoss

    check_steps(steps)
    head = NormalizedFC(embedding_size, num_classes)
    loss_fn = CombinedMarginLoss(*margin)

    def retrain(model: nn.Module, layer: str = "") -> Tensor:
        losses = margin_sgd_steps(
            model, head, loss_fn, data, steps, lr=lr, momentum=momentum, weight_decay=weight_decay
        )
        return losses[-1]

    return retrain


def trainer_retrain_fn(trainer: Any, steps: int) -> RetrainFn:
    """Retrain through a ``craft_ext.train.Trainer``: ``steps`` calls of its ``train_step``
    over its own training loader (its optimizers, schedulers, head and AMP settings). These
    steps advance the trainer's step counter and learning-rate schedule like any other.

    Use with ``layerwise_schedule(trainer.backbone, layers, density, trainer_retrain_fn(
    trainer, steps), data)``.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")

    def retrain(model: nn.Module, layer: str = "") -> Tensor | None:
        loss = None
        done = 0
        while done < steps:
            before = done
            for images, labels in trainer._loader():
                loss = trainer.train_step(images, labels)
                done += 1
                if done >= steps:
                    break
            if done == before:
                raise ValueError("the trainer's loader yielded no batches")
        return loss

    return retrain
