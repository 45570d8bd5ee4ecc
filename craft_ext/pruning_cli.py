"""``craft-prune``: prune an iresnet backbone by feature-map statistics, optionally fine-tune.

Diba & Khosravi (IASC 2023): 100 images of the most populous identities go through the
trained backbone; filters whose maps are empty or redundant in >= 80% of them are removed
(:mod:`craft_ext.pruning`), and the smaller network is fine-tuned. Run as
``python -m craft_ext.pruning_cli`` (or the ``craft-prune`` script where installed).

Writes into ``--output``:

* ``pruned_backbone.pt``: the pruned backbone (:func:`craft_ext.pruning.load_pruned` reads it);
* ``plan.json``: ``{layer: [pruned channels]}`` with the settings used;
* ``profile.json``: parameters and FLOPs before and after pruning (and the fine-tune losses);
* ``finetuned_backbone.pt`` with ``--finetune-steps N > 0``: the pruned backbone, reloaded
  from ``pruned_backbone.pt`` and trained N SGD steps with a cosine head
  (:class:`craft_ext.heads.NormalizedFC`) and :class:`craft_ext.losses.CombinedMarginLoss`,
  the optimizer built after pruning.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .analysis.io import build_model, load_state_dict
from .data.folder import ImageFolderDataset
from .data.synthetic import SyntheticFaceDataset
from .data.transforms import eval_transform, train_transform
from .heads import NormalizedFC, check_steps, margin_sgd_steps
from .losses import CombinedMarginLoss
from .pruning import find_prunable, load_pruned, profile, prune, save_pruned

__all__ = ["build_parser", "finetune", "main"]

PROG = "craft-prune"


def build_parser() -> argparse.ArgumentParser:
    """Argument parser of ``craft-prune``."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Prune the block-internal filters of an iresnet backbone whose feature maps are "
            "empty (|sum| <= sum-threshold) or redundant (Pearson correlation >= "
            "corr-threshold with a lower-index map) in at least a vote fraction of the sample "
            "images (Diba & Khosravi, IASC 2023), then optionally fine-tune the smaller model."
        ),
    )
    p.add_argument(
        "checkpoint",
        help="backbone.pth (insightface/craft-train state_dict, possibly wrapped as "
        "{'state_dict': ...} or with module./_orig_mod. key prefixes), a craft-train "
        "checkpoint file or a run directory (backbone.pth, checkpoint_last.pt or "
        "checkpoint_best.pt inside)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="image folder (one sub-folder per identity) or 'synthetic' for generated faces",
    )
    p.add_argument("--output", required=True, help="output directory")
    p.add_argument("--network", default=None, help="iresnet name (default: inferred)")
    p.add_argument("--synthetic-classes", type=int, default=10, help="identities (synthetic)")
    p.add_argument("--synthetic-images", type=int, default=200, help="images (synthetic)")
    p.add_argument("--samples", type=int, default=100, help="images voted on (paper: 100)")
    p.add_argument("--vote", type=float, default=0.8, help="flagged fraction to prune (0.8)")
    p.add_argument("--sum-threshold", type=float, default=0.02, help="empty map threshold")
    p.add_argument("--corr-threshold", type=float, default=0.95, help="redundancy threshold")
    p.add_argument("--batch-size", type=int, default=25, help="images per forward pass")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--backend", default=None, help="feature_map_stats backend (default auto)")
    p.add_argument("--finetune-steps", type=int, default=0, help="SGD steps after pruning (0)")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tune learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="fine-tune SGD momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="fine-tune weight decay")
    p.add_argument("--finetune-batch-size", type=int, default=32, help="fine-tune batch size")
    p.add_argument("--scale", type=float, default=64.0, help="margin loss scale s")
    p.add_argument(
        "--margin",
        default="1.0,0.5,0.0",
        help="combined margin m1,m2,m3 (ArcFace 1.0,0.5,0.0; CosFace 1.0,0.0,0.4)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the fine-tune")
    return p


def _load_backbone(path: str, network: str | None) -> tuple[nn.Module, str, dict[str, Any]]:
    """The backbone in ``path`` (any source :func:`craft_ext.analysis.io.load_state_dict` reads:
    a state-dict file, possibly wrapped or key-prefixed, a craft-train checkpoint or a run
    directory), built by :func:`craft_ext.analysis.io.build_model`: ``(model, name, options)``."""
    try:
        sd = load_state_dict(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"checkpoint not found: {exc}") from exc
    return build_model(sd, network)


def _dataset(args: argparse.Namespace, size: int, train: bool) -> Any:
    transform = train_transform() if train else eval_transform()
    if args.data == "synthetic":
        return SyntheticFaceDataset(
            args.synthetic_classes, args.synthetic_images, size=size, transform=transform
        )
    return ImageFolderDataset(args.data, transform=transform, progress=False)


def finetune(
    backbone: nn.Module,
    dataset: Any,
    num_classes: int,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    scale: float = 64.0,
    margins: tuple[float, float, float] = (1.0, 0.5, 0.0),
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> list[float]:
    """Train ``backbone`` in place for ``steps`` SGD steps; returns the loss of every step.

    Loss: :class:`CombinedMarginLoss` (s, m1, m2, m3) on the cosines of a fresh
    :class:`NormalizedFC` head; one SGD optimizer over backbone and head, built here (after
    pruning, so it holds the pruned parameters).

    Raises:
        ValueError: ``steps`` is not a positive int.
    """
    check_steps(steps)  # before the data set is built
    torch.manual_seed(seed)
    backbone.to(torch.device(device))
    num_features = int(getattr(backbone, "num_features", 512))
    head = NormalizedFC(num_features, num_classes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True)
    losses = margin_sgd_steps(
        backbone,
        head,
        CombinedMarginLoss(scale, *margins),
        loader,
        steps,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
    )
    backbone.eval()
    return torch.stack(losses).tolist()


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, prune, write the outputs, optionally fine-tune; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        margins = tuple(float(v) for v in args.margin.split(","))
        if len(margins) != 3:
            raise ValueError(f"--margin needs three numbers m1,m2,m3, got {args.margin!r}")
        if args.finetune_steps < 0:
            raise ValueError(f"--finetune-steps must be >= 0, got {args.finetune_steps}")
        model, network, options = _load_backbone(args.checkpoint, args.network)
        device = torch.device(args.device)
        model.to(device).eval()
        size = int(model.input_size[0])
        data = _dataset(args, size, train=False)
        plan = find_prunable(
            model,
            data,
            samples=args.samples,
            vote=args.vote,
            sum_threshold=args.sum_threshold,
            corr_threshold=args.corr_threshold,
            batch_size=args.batch_size,
            backend=args.backend,
        )
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    pruned = prune(model, plan)
    before, after = profile(model, model.input_size), profile(pruned, model.input_size)
    save_pruned(pruned, out / "pruned_backbone.pt", network=network, options=options, plan=plan)
    settings = {k: getattr(args, k) for k in ("samples", "vote", "sum_threshold")}
    settings["corr_threshold"] = args.corr_threshold
    (out / "plan.json").write_text(
        json.dumps({"network": network, "settings": settings, "plan": plan}, indent=1)
    )
    report: dict[str, Any] = {"before": before, "after": after}
    n_pruned = sum(len(v) for v in plan.values())
    print(
        f"{PROG}: pruned {n_pruned} filters in {sum(bool(v) for v in plan.values())} layers; "
        f"params {before['params']} -> {after['params']}, "
        f"FLOPs {before['flops']} -> {after['flops']}"
    )

    if args.finetune_steps > 0:
        reloaded = load_pruned(out / "pruned_backbone.pt", map_location=device)
        train_set = _dataset(args, size, train=True)
        losses = finetune(
            reloaded,
            train_set,
            int(train_set.num_classes),
            steps=args.finetune_steps,
            batch_size=args.finetune_batch_size,
            lr=args.lr,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            scale=args.scale,
            margins=margins,  # type: ignore[arg-type]
            device=device,
            seed=args.seed,
        )
        save_pruned(
            reloaded, out / "finetuned_backbone.pt", network=network, options=options, plan=plan
        )
        report["finetune_losses"] = losses
        print(f"{PROG}: fine-tuned {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    (out / "profile.json").write_text(json.dumps(report, indent=1))
    print(f"{PROG}: wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
