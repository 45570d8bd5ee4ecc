"""``craft-demo``: reactivate a first conv layer with planted inactive filters and show it.

Builds an ArcFace-style first layer (64 filters of 3x3x3), makes some filters inactive as a
trained face model's would be (every weight within 1e-3 of zero), runs
:func:`craft_ext.reactivate_` with each method and prints the filters before and after.
"""

from __future__ import annotations

import argparse

import torch

import craft_ext


def _summary(weight: torch.Tensor, threshold: float) -> str:
    s = craft_ext.filter_stats(weight)
    inactive = int((s.max_abs <= threshold).sum())
    return (
        f"inactive {inactive:2d}/{weight.shape[0]}  "
        f"max|w| median {s.max_abs.median():.4f}  L1 median {s.l1.median():.4f}"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="craft-demo",
        description="Reactivate planted inactive filters of a 64x3x3x3 conv layer with CRAFT "
        "(Bhatta et al., arXiv 2312.00072) and print the layer before and after.",
    )
    parser.add_argument("--filters", type=int, default=64, help="number of filters (default 64)")
    parser.add_argument("--inactive", type=int, default=24, help="filters made inactive")
    parser.add_argument("--threshold", type=float, default=1e-3, help="inactivity threshold")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--backend", default=None, choices=craft_ext.BACKENDS, help="force a backend"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.inactive <= args.filters:
        parser.error(f"--inactive must be between 0 and --filters ({args.filters})")

    torch.manual_seed(args.seed)
    conv = torch.nn.Conv2d(3, args.filters, 3, padding=1, bias=False).to(args.device)
    dead = torch.randperm(args.filters)[: args.inactive]
    with torch.no_grad():
        conv.weight[dead] *= 1e-4  # what weight decay leaves of an unused filter
    backend = craft_ext.resolve_backend(conv.weight.device, "reactivate_", args.backend)
    print(
        f"craft_ext {craft_ext.__version__}: extension_loaded={craft_ext.extension_loaded()}, "
        f"backend={backend}, device={conv.weight.device}"
    )
    print(f"planted inactive filters: {sorted(dead.tolist())}")
    print(f"before            : {_summary(conv.weight, args.threshold)}")

    x = torch.randn(2, 3, 16, 16, device=args.device)
    for method in craft_ext.METHODS:
        layer = torch.nn.Conv2d(3, args.filters, 3, padding=1, bias=False).to(args.device)
        layer.load_state_dict(conv.state_dict())
        gen = torch.Generator(device=conv.weight.device).manual_seed(args.seed)
        res = craft_ext.reactivate_(
            layer.weight, method=method, threshold=args.threshold, generator=gen, backend=backend
        )
        dead_maps = int((layer(x).abs().amax((0, 2, 3)) <= 1e-3).sum())
        print(
            f"after {method:<16s}: {_summary(layer.weight, args.threshold)}  "
            f"reactivated {int(res.count)}  dead feature maps {dead_maps}"
        )
        if method == "craft":
            pairs = [(i, int(d)) for i, d in enumerate(res.donor.tolist()) if res.reactivated[i]][
                :6
            ]
            print("    filter <- -donor: " + ", ".join(f"{i}<-{d}" for i, d in pairs) + " ...")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
