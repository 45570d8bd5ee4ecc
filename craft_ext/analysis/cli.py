"""``craft-analyze``: inspect first-layer filters of face-recognition backbones.

Run ``craft-analyze --help`` or ``craft-analyze SUBCOMMAND --help``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import NoReturn

from .io import AnalysisError

__all__ = ["build_parser", "main"]

PROG = "craft-analyze"

_SOURCE_HELP = (
    "backbone weights: a state-dict file (arcface_torch backbone.pth; keys may carry any "
    "wrapper prefix such as 'module.', 'backbone.', 'encoder.', or sit under 'state_dict', "
    "'model', 'net_state_dict', 'backbone'), a craft-train checkpoint (.pt), or a craft-train "
    "run directory (uses backbone.pth, else checkpoint_last.pt, else checkpoint_best.pt)"
)

_DESCRIPTION = """\
Analyse the first-layer filters of a face-recognition backbone (CRAFT, Bhatta et al.,
arXiv 2312.00072). A filter is inactive by weight when every |w| <= threshold, and by the
folded criterion when every |w * s| <= threshold, s = gamma / sqrt(running_var + eps) of the
BatchNorm after the conv (found in the checkpoint by key order and channel count).

subcommands:
  census      count inactive first-layer filters at 1e-3 and 1e-6 by both criteria
              (paper Table 1); --all-layers for every conv
  threshold   zero filters with max|w| <= theta for a sweep of theta and report the cosine
              similarity of embeddings before/after on N images (paper Eq. 1)
  grid        PNG of the filters sorted by L1 norm, each as one colour image, inactive and
              reactivated filters marked (paper Fig. 4)
  patterns    PCA + mean-shift clustering of the filters: number of unique patterns and a
              scatter plot (paper Fig. 5)
  trajectory  PNG of per-filter max|w| (raw and BN-folded) over training from a craft-train
              run directory, reactivations marked (paper Fig. 2)

Errors (a missing or unreadable file, a bad number) print one line and exit with status 2.
"""

#: options taking numbers: a negative value after them is a value, not an option
_NUMERIC_OPTIONS = frozenset(
    {"--thresholds", "--threshold", "--thetas", "--bandwidth", "--quantile", "--dpi", "--cols"}
    | {"-n", "--num-images", "--batch-size", "--input-size"}
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``craft-analyze SUB: error: MESSAGE``, exit 2."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _join_negative_numbers(argv: Sequence[str]) -> list[str]:
    """``--threshold -1e-3`` as ``--threshold=-1e-3``: argparse takes ``-1e-3`` (not a plain
    ``-1`` / ``-.5``) for an option, so the value would be lost and the error misleading."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if tok in _NUMERIC_OPTIONS and nxt is not None and nxt.startswith("-") and _numeric(nxt):
            out.append(f"{tok}={nxt}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def _numeric(text: str) -> bool:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    try:
        [float(p) for p in parts]
    except ValueError:
        return False
    return bool(parts)


def _floats(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one number")
    return vals


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc


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


def _check_numbers(args: argparse.Namespace) -> str | None:
    """The first out-of-range number in ``args`` as an error message, or None."""
    finite = math.isfinite
    for name in ("thresholds", "thetas"):
        for v in getattr(args, name, None) or []:
            if not (finite(v) and v >= 0):
                return f"--{name} must be >= 0, got {v:g}"
    t = getattr(args, "threshold", None)
    if t is not None and not (finite(t) and t >= 0):
        return f"--threshold must be >= 0, got {t:g}"
    bw = getattr(args, "bandwidth", None)
    if bw is not None and not (finite(bw) and bw > 0):
        return f"--bandwidth must be > 0 (in weight units), got {bw:g}"
    q = getattr(args, "quantile", None)
    if q is not None and not (finite(q) and 0 < q <= 1):
        return f"--quantile must be in (0, 1], got {q:g}"
    return None


def build_parser() -> argparse.ArgumentParser:
    """The ``craft-analyze`` argument parser."""
    parser = _Parser(
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

    def layer_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--layer",
            default=None,
            help="state-dict name of the conv weight, with or without its wrapper prefix "
            "(default: conv1.weight, else the first conv with 3 input channels)",
        )

    def threshold_option(p: argparse.ArgumentParser, default: float | None, what: str) -> None:
        shown = f"{default:g}" if default is not None else "the run's, else 1e-3"
        p.add_argument(
            "--threshold", type=_number, default=default, help=f"{what} (default: {shown})"
        )

    p = add(
        "census",
        "count inactive first-layer filters (Table 1)",
        "Count the first-layer filters inactive at each threshold by the weight criterion "
        "(max |w| <= t) and the folded one (max |w * s| <= t, s = gamma / sqrt(running_var + "
        "eps) of the BatchNorm after the conv, found by key order and channel count: no "
        "network is built, any checkpoint layout works). A conv with no BatchNorm after it has "
        "folded counts equal to its weight counts and bn null (paper Table 1).",
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
    layer_option(p)
    p.add_argument("--json", action="store_true", help="print a JSON object")

    p = add(
        "threshold",
        "embedding similarity after zeroing weak filters (Eq. 1)",
        "For each theta, zero the first-layer filters with max |w| <= theta and report the "
        "cosine similarity between embeddings of N images before and after. Images: a folder "
        "(searched recursively) or an insightface .bin; decoded with PIL, resized to the "
        "network's input size, normalised (x/255-0.5)/0.5. Needs craft_ext.models to build "
        "the network.",
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
        default=None,
        help="image side in pixels (default: the checkpoint's, e.g. 64 for the craft-train "
        "demo, else 112)",
    )
    layer_option(p)
    p.add_argument("--json", action="store_true", help="print a JSON object")

    p = add(
        "grid",
        "filter grid PNG (Fig. 4)",
        "Draw the first-layer filters sorted by L1 norm (row-major, strongest first), each as "
        "one colour image (its R, G, B input-channel weights, scaled to its own max |w|: mid "
        "grey = 0), labelled with its index and L1 norm. Frames mark filters inactive by weight "
        "(red) and, with a BatchNorm after the conv, dead through it only (dashed purple); "
        "triangles mark filters the run reactivated.",
    )
    p.add_argument("path", help=_SOURCE_HELP)
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument(
        "--cols", type=_positive_int, default=8, help="filters per grid row (default: %(default)s)"
    )
    p.add_argument("--ascending", action="store_true", help="weakest filters first")
    threshold_option(p, 1e-3, "inactive threshold of the marks")
    p.add_argument(
        "--reactivations",
        default=None,
        metavar="JSONL",
        help="reactivations.jsonl whose filters to mark (default: PATH's, if PATH is a run "
        "directory)",
    )
    layer_option(p)
    fig_options(p)

    p = add(
        "patterns",
        "unique filter patterns: PCA + mean shift (Fig. 5)",
        "Flatten the first-layer filters (64 x 27 for iresnet), cluster them with mean shift "
        "and report the number of unique patterns; optionally draw the PCA scatter plot. "
        "Default bandwidth: half the median pairwise distance between the active filters "
        "(robust for 32-64 filters, where sklearn's estimate merges scattered filters).",
    )
    p.add_argument("path", help=_SOURCE_HELP)
    p.add_argument("--out", default=None, help="output PNG path for the PCA scatter plot")
    p.add_argument(
        "--bandwidth",
        type=_number,
        default=None,
        help="mean-shift bandwidth in weight units, > 0 (default: estimated)",
    )
    p.add_argument(
        "--quantile",
        type=_number,
        default=None,
        help="estimate the bandwidth with sklearn's estimate_bandwidth(quantile=Q), 0 < Q <= 1, "
        "instead of the default rule",
    )
    threshold_option(p, 1e-3, "inactive threshold for marking")
    layer_option(p)
    p.add_argument("--json", action="store_true", help="print a JSON object")
    fig_options(p)

    p = add(
        "trajectory",
        "per-filter max|w| over training (Fig. 2)",
        "Plot each first-layer filter's max |w| (and, when logged, its BN-folded max |w * s|; "
        "otherwise its L1 norm) over training steps from a craft-train run directory's "
        "filter_stats.jsonl (dense --stats-every records when present, else epoch ends), with "
        "reactivations from reactivations.jsonl marked.",
    )
    p.add_argument("run_dir", help="craft-train run directory (or its filter_stats.jsonl)")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument(
        "--layer",
        default=None,
        help="layer name in the statistics (default: conv1.weight, else the first conv)",
    )
    threshold_option(p, None, "inactive threshold line")
    p.add_argument("--linear", action="store_true", help="linear instead of log y axes")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    fig_options(p)
    return parser


def _fig_kwargs(args: argparse.Namespace) -> dict:
    kw: dict = {"dpi": args.dpi}
    if args.figsize is not None:
        kw["figsize"] = args.figsize
    return kw


def _print_census(res: dict, as_json: bool) -> None:
    from .census import format_census

    print(json.dumps(res, indent=2) if as_json else format_census(res))


def _print_patterns(res: dict, as_json: bool) -> None:
    from .plotting import plural

    if as_json:
        print(json.dumps(res, indent=2))
        return
    sizes = ", ".join(f"{k}: {v}" for k, v in res["cluster_sizes"].items())
    print(
        f"{res['layer']}: {plural(res['filters'], 'filter')}, "
        f"{plural(res['clusters'], 'unique pattern')} (bandwidth {res['bandwidth']:.4g}, "
        f"{res['bandwidth_rule']}); sizes {{{sizes}}}"
    )
    if res["inactive"]:
        print(f"inactive filters {res['inactive']} in pattern(s) {res['inactive_clusters']}")
    else:
        print("no inactive filters")
    if res["out"]:
        print(f"wrote {res['out']}")


def _run(args: argparse.Namespace) -> None:
    from .census import census
    from .figures import filter_grid
    from .patterns import filter_patterns
    from .plotting import plural
    from .threshold import DEFAULT_THETAS, format_sweep, threshold_sweep
    from .trajectory import plot_trajectory

    if args.command == "census":
        res = census(
            args.path, thresholds=args.thresholds, all_layers=args.all_layers, layer=args.layer
        )
        _print_census(res, args.json)
    elif args.command == "threshold":
        size = (args.input_size, args.input_size) if args.input_size else None
        res = threshold_sweep(
            args.path,
            args.data,
            thetas=args.thetas or DEFAULT_THETAS,
            n=args.num_images,
            batch_size=args.batch_size,
            layer=args.layer,
            network=args.network,
            size=size,
        )
        print(json.dumps(res, indent=2) if args.json else format_sweep(res))
    elif args.command == "grid":
        res = filter_grid(
            args.path,
            args.out,
            layer=args.layer,
            cols=args.cols,
            descending=not args.ascending,
            threshold=args.threshold,
            reactivations=args.reactivations,
            **_fig_kwargs(args),
        )
        print(f"wrote {res['out']} ({res['layer']}, {plural(res['filters'], 'filter')})")
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
        _print_patterns(res, args.json)
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
                f"wrote {res['out']} ({res['layer']}: {plural(res['records'], 'record')}, "
                f"{plural(res['reactivation_events'], 'reactivation event')}, "
                f"{len(res['inactive_final'])} inactive at the end)"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``craft-analyze``; returns the exit status: 0 ok, 2 for a usage error
    or an input it cannot use (missing or unreadable file, bad number), with one line on
    stderr naming what is wrong."""
    parser = build_parser()
    args = parser.parse_args(_join_negative_numbers(sys.argv[1:] if argv is None else argv))
    problem = _check_numbers(args)
    if problem is not None:
        print(f"{PROG} {args.command}: error: {problem}", file=sys.stderr)
        return 2
    try:
        _run(args)
    except (
        FileNotFoundError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
        AnalysisError,
    ) as exc:
        print(f"{PROG} {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    return 0


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (torch / pickle messages can span several)."""
    return " ".join(str(exc).split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
