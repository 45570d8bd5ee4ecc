"""``craft-analyze``: inspect first-layer filters of face-recognition backbones.

Run ``craft-analyze --help`` or ``craft-analyze SUBCOMMAND --help``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .io import AnalysisError

__all__ = ["build_parser", "main"]

PROG = "craft-analyze"

_SOURCE_HELP = (
    "backbone weights: a state-dict file (arcface_torch backbone.pth, keys may carry "
    "'module.'/'backbone.' prefixes), a craft-train checkpoint (.pt), or a craft-train run "
    "directory (uses backbone.pth, else checkpoint_last.pt, else checkpoint_best.pt)"
)

_DESCRIPTION = """\
Analyse the first-layer filters of a face-recognition backbone (CRAFT, Bhatta et al.,
arXiv 2312.00072). A filter is inactive when every weight satisfies |w| <= threshold.

subcommands:
  census      count inactive first-layer filters at 1e-3 and 1e-6 (paper Table 1)
  threshold   zero filters with max|w| <= theta for a sweep of theta and report the cosine
              similarity of embeddings before/after on N images (paper Eq. 1)
  grid        PNG of the filters sorted by L1 norm: R, G, B weight planes and the
              std across channels (paper Fig. 4)
  patterns    PCA + mean-shift clustering of the filters: number of unique patterns and a
              scatter plot (paper Fig. 5)
  trajectory  PNG of per-filter max|w| and L1 over training from a craft-train run directory,
              reactivations marked (paper Fig. 2)
"""


def _floats(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one number")
    return vals


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from exc
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _size(text: str) -> tuple[float, float]:
    vals = _floats(text.lower().replace("x", ","))
    if len(vals) != 2 or min(vals) <= 0:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in inches, got {text!r}")
    return vals[0], vals[1]


def build_parser() -> argparse.ArgumentParser:
    """The ``craft-analyze`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)

    def add(name: str, help_: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=description,
            formatter_class=argparse.HelpFormatter,
        )

    def fig_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--figsize",
            type=_size,
            default=None,
            metavar="WxH",
            help="figure size in inches (default: per figure)",
        )
        p.add_argument(
            "--dpi", type=_positive_int, default=100, help="PNG resolution (default: %(default)s)"
        )

    p = add(
        "census",
        "count inactive first-layer filters (Table 1)",
        "Count the first-layer filters whose max |w| is <= each threshold (paper Table 1).",
    )
    p.add_argument("path", help=_SOURCE_HELP)
    p.add_argument(
        "--thresholds",
        type=_floats,
        default=[1e-3, 1e-6],
        metavar="T1,T2",
        help="comma-separated thresholds (default: 1e-3,1e-6)",
    )
    p.add_argument(
        "--all-layers", action="store_true", help="also count inactive filters in every conv layer"
    )
    p.add_argument(
        "--layer",
        default=None,
        help="state-dict name of the layer (default: conv1.weight, else the first conv)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON object")

    p = add(
        "threshold",
        "embedding similarity after zeroing weak filters (Eq. 1)",
        "For each theta, zero the first-layer filters with max |w| <= theta and report the "
        "cosine similarity between embeddings of N images before and after. Images: a folder "
        "(searched recursively) or an insightface .bin; decoded with PIL, resized to the "
        "input size, normalised (x/255-0.5)/0.5. Needs craft_ext.models to build the network.",
    )
    p.add_argument("path", help=_SOURCE_HELP)
    p.add_argument("--data", required=True, help="image folder or insightface .bin file")
    p.add_argument(
        "-n",
        "--num-images",
        type=_positive_int,
        default=64,
        help="number of images (default: %(default)s)",
    )
    p.add_argument(
        "--thetas",
        type=_floats,
        default=None,
        metavar="T1,T2,...",
        help="thresholds to sweep (default 0,1e-6,1e-5,1e-4,1e-3,1e-2,2e-2,5e-2,0.1)",
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=32,
        help="forward batch size (default: %(default)s)",
    )
    p.add_argument(
        "--network",
        default=None,
        help="network name for craft_ext.models.get_model (default: inferred)",
    )
    p.add_argument(
        "--input-size",
        type=_positive_int,
        default=112,
        help="image side in pixels (default: %(default)s)",
    )
    p.add_argument(
        "--layer",
        default=None,
        help="parameter name of the layer (default: conv1.weight, else the first conv)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON object")

    p = add(
        "grid",
        "filter grid PNG (Fig. 4)",
        "Draw the first-layer filters sorted by L1 norm (row-major, strongest first): R, G, B "
        "weight planes on one grey scale (black negative, grey zero, white positive) and the "
        "per-pixel std across channels.",
    )
    p.add_argument("path", help=_SOURCE_HELP)
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument(
        "--cols", type=_positive_int, default=8, help="filters per grid row (default: %(default)s)"
    )
    p.add_argument("--ascending", action="store_true", help="weakest filters first")
    p.add_argument(
        "--layer",
        default=None,
        help="state-dict name of the layer (default: conv1.weight, else the first conv)",
    )
    fig_options(p)

    p = add(
        "patterns",
        "unique filter patterns: PCA + mean shift (Fig. 5)",
        "Flatten the first-layer filters (64 x 27 for iresnet), cluster them with mean shift "
        "and report the number of unique patterns; optionally draw the PCA scatter plot.",
    )
    p.add_argument("path", help=_SOURCE_HELP)
    p.add_argument("--out", default=None, help="output PNG path for the PCA scatter plot")
    p.add_argument(
        "--bandwidth", type=float, default=None, help="mean-shift bandwidth (default: estimated)"
    )
    p.add_argument(
        "--quantile",
        type=float,
        default=0.2,
        help="quantile for the bandwidth estimate (default: %(default)s)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=1e-3,
        help="inactive threshold for marking (default: %(default)s)",
    )
    p.add_argument(
        "--layer",
        default=None,
        help="state-dict name of the layer (default: conv1.weight, else the first conv)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON object")
    fig_options(p)

    p = add(
        "trajectory",
        "per-filter max|w| and L1 over training (Fig. 2)",
        "Plot each first-layer filter's max |w| and L1 norm per epoch from a craft-train run "
        "directory's filter_stats.jsonl, with reactivations from reactivations.jsonl marked.",
    )
    p.add_argument("run_dir", help="craft-train run directory (or its filter_stats.jsonl)")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument(
        "--layer",
        default=None,
        help="layer name in the statistics (default: conv1.weight, else the first conv)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=1e-3,
        help="inactive threshold line (default: %(default)s)",
    )
    p.add_argument("--linear", action="store_true", help="linear instead of log y axes")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    fig_options(p)
    return parser


def _fig_kwargs(args: argparse.Namespace) -> dict:
    kw: dict = {"dpi": args.dpi}
    if args.figsize is not None:
        kw["figsize"] = args.figsize
    return kw


def _run(args: argparse.Namespace) -> None:
    from .census import census, format_census
    from .figures import filter_grid
    from .patterns import filter_patterns
    from .threshold import DEFAULT_THETAS, format_sweep, threshold_sweep
    from .trajectory import plot_trajectory

    if args.command == "census":
        res = census(
            args.path, thresholds=args.thresholds, all_layers=args.all_layers, layer=args.layer
        )
        print(json.dumps(res, indent=2) if args.json else format_census(res))
    elif args.command == "threshold":
        res = threshold_sweep(
            args.path,
            args.data,
            thetas=args.thetas or DEFAULT_THETAS,
            n=args.num_images,
            batch_size=args.batch_size,
            layer=args.layer,
            network=args.network,
            size=(args.input_size, args.input_size),
        )
        print(json.dumps(res, indent=2) if args.json else format_sweep(res))
    elif args.command == "grid":
        res = filter_grid(
            args.path,
            args.out,
            layer=args.layer,
            cols=args.cols,
            descending=not args.ascending,
            **_fig_kwargs(args),
        )
        print(f"wrote {res['out']} ({res['layer']}, {res['filters']} filters)")
    elif args.command == "patterns":
        res = filter_patterns(
            args.path,
            layer=args.layer,
            bandwidth=args.bandwidth,
            quantile=args.quantile,
            threshold=args.threshold,
            out=args.out,
            **_fig_kwargs(args),
        )
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            sizes = ", ".join(f"{k}: {v}" for k, v in res["cluster_sizes"].items())
            print(
                f"{res['layer']}: {res['filters']} filters, {res['clusters']} unique patterns "
                f"(bandwidth {res['bandwidth']:.4g}); sizes {{{sizes}}}"
            )
            print(f"inactive filters {res['inactive']} in pattern(s) {res['inactive_clusters']}")
            if res["out"]:
                print(f"wrote {res['out']}")
    elif args.command == "trajectory":
        res = plot_trajectory(
            args.run_dir,
            args.out,
            layer=args.layer,
            threshold=args.threshold,
            log=not args.linear,
            **_fig_kwargs(args),
        )
        if args.json:
            print(json.dumps(res, indent=2))
        else:
            print(
                f"wrote {res['out']} ({res['layer']}: {res['records']} records, "
                f"{res['reactivation_events']} reactivation events, "
                f"{len(res['inactive_final'])} inactive at the end)"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``craft-analyze``; returns the exit status (0 ok, 1 error, 2 usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _run(args)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except AnalysisError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
