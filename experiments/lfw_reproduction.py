"""Reproduce the CRAFT paper's comparison (Tables 2 and 4) on LFW with craft-train.

Trains the same network with first-layer reactivation ``none``, ``scaled_gaussian`` and
``craft`` for several seeds with identical schedules, on the people of LFW's View-1 training
list (``peopleDevTrain.txt``), verifies on the disjoint View-1 test pairs
(``pairsDevTest.txt``), and reports per method: inactive first-layer filters at the end
(threshold 1e-3 and 1e-6, mean and std), reactivations, verification accuracy (mean and std)
and unique filter patterns (PCA + mean-shift, as the paper's Fig. 5).

One command reproduces the committed results (CPU, reduced configuration; see README)::

    python experiments/lfw_reproduction.py --out experiments/results/lfw

Runs that already finished (``summary.json`` present) are reused, so an interrupted sweep
continues where it stopped. ``--quick`` is a tiny smoke configuration for tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import craft_ext.analysis as analysis
from craft_ext.train import parse_config
from craft_ext.train.cli import main as train_main

METHODS = ("none", "scaled_gaussian", "craft")
HERE = Path(__file__).resolve().parent
DEFAULT_DATA = Path(os.environ.get("CRAFT_LFW_DIR", HERE.parent.parent / "shared/data/lfw112"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="LFW 112x112 folder")
    p.add_argument("--out", type=Path, default=HERE / "results" / "lfw", help="results folder")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--network", default="r18")
    p.add_argument(
        "--widths",
        type=int,
        nargs=4,
        default=[32, 32, 64, 128],
        help="iresnet stage widths (the first is the number of first-layer filters)",
    )
    p.add_argument("--image-size", type=int, default=56, help="training/verification size")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--min-images", type=int, default=4, help="identities with fewer are left out")
    p.add_argument(
        "--plant-inactive",
        type=int,
        default=0,
        help="stress test: make this many first-layer filters inactive at the first epoch end "
        "(simulates the die-off of a long run, which a short CPU run does not reach)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (tests)")
    return p


def train_args(args: argparse.Namespace, method: str, seed: int, out: Path) -> list[str]:
    data = args.data
    argv = [
        "--data", str(data / "images"),
        "--identities", str(data / "peopleDevTrain.txt"),
        "--min-images", str(args.min_images),
        "--val", f"{data / 'pairsDevTest.txt'}:{data / 'images'}",
        "--network", args.network,
        "--widths", *map(str, args.widths),
        "--image-size", str(args.image_size),
        "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size),
        "--lr", str(args.lr),
        "--reactivation", method,
        "--seed", str(seed),
        "--device", args.device,
        "--workers", str(args.workers),
        "--output", str(out),
        "--plant-inactive", str(args.plant_inactive),
        "--no-progress",
    ]  # fmt: skip
    if args.quick:
        argv += ["--min-images", "40", "--epochs", "1", "--log-every", "1"]
    return argv


def run_one(args: argparse.Namespace, method: str, seed: int) -> dict[str, Any]:
    out = args.out / "runs" / f"{method}_seed{seed}"
    summary_path = out / "summary.json"
    argv = train_args(args, method, seed, out)
    if summary_path.is_file():  # a finished run is reused only if it used these settings
        done = dict(json.loads(summary_path.read_text()).get("config") or {})
        want = json.loads(json.dumps(parse_config(argv).to_dict()))
        done.pop("output", None), want.pop("output")  # the same folder, however it was spelled
        if done != want:
            raise SystemExit(
                f"{out} holds a run with other settings; remove it or pass another --out"
            )
    else:
        t0 = time.perf_counter()
        code = train_main(argv)
        if code != 0:
            raise SystemExit(f"craft-train failed for {method} seed {seed} (exit {code})")
        print(f"[{method} seed {seed}] {time.perf_counter() - t0:.0f} s", flush=True)
    summary = json.loads(summary_path.read_text())
    backbone = out / "backbone.pth"
    cen = analysis.census(backbone)
    pat = analysis.filter_patterns(backbone)
    final = summary["epochs"][-1] if summary["epochs"] else {}
    acc_keys = [k for k in final if k.endswith("/accuracy")]
    return {
        "method": method,
        "seed": seed,
        "steps": summary["steps"],
        "reactivated_total": summary["reactivated_total"],
        "inactive_1e-3": cen["inactive_1e-3"],
        "inactive_1e-6": cen["inactive_1e-6"],
        "filters": cen["filters"],
        "accuracy": final[acc_keys[0]] if acc_keys else None,
        "best_accuracy": max(summary["best"].values()) if summary["best"] else None,
        "clusters": pat["clusters"],
        "run": str(out.relative_to(args.out)),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        entry: dict[str, Any] = {"method": method, "runs": len(rs)}
        for key in ("inactive_1e-3", "inactive_1e-6", "reactivated_total", "accuracy", "clusters"):
            vals = [float(r[key]) for r in rs if r[key] is not None]
            entry[key + "_mean"], entry[key + "_std"] = _mean_std(vals)
        table.append(entry)
    return table


def markdown(table: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"LFW View-1 ({meta['identities']}), {meta['network']} widths {meta['widths']} at "
        f"{meta['image_size']}x{meta['image_size']}, {meta['epochs']} epochs, "
        f"seeds {meta['seeds']}, planted inactive filters {meta['plant_inactive']}; "
        "mean ± std over seeds.",
        "",
        "| reactivation | inactive (1e-3) | inactive (1e-6) | reactivated | "
        "pairsDevTest accuracy | filter patterns |",
        "|---|---|---|---|---|---|",
    ]

    def ms(e: dict[str, Any], key: str, fmt: str = ".1f") -> str:
        return f"{e[key + '_mean']:{fmt}} ± {e[key + '_std']:{fmt}}"

    for e in table:
        lines.append(
            f"| {e['method']} | {ms(e, 'inactive_1e-3')} | {ms(e, 'inactive_1e-6')} | "
            f"{ms(e, 'reactivated_total')} | {ms(e, 'accuracy', '.4f')} | {ms(e, 'clusters')} |"
        )
    return "\n".join(lines) + "\n"


def figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), dpi=100)
    for ax, key, title in zip(
        axes,
        ("inactive_1e-3", "accuracy", "clusters"),
        ("inactive first-layer filters (1e-3)", "pairsDevTest accuracy", "unique filter patterns"),
        strict=True,
    ):
        for i, m in enumerate(methods):
            vals = [r[key] for r in rows if r["method"] == m and r[key] is not None]
            ax.scatter([i] * len(vals), vals, color="tab:blue", alpha=0.6)
            if vals:
                mean, std = _mean_std([float(v) for v in vals])
                ax.errorbar(i + 0.15, mean, yerr=std, fmt="o", color="black", capsize=4)
        ax.set_xticks(range(len(methods)), methods)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.data / "peopleDevTrain.txt").is_file():
        print(f"error: --data {args.data} does not hold LFW (peopleDevTrain.txt)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run_one(args, m, s) for m in args.methods for s in args.seeds]
    table = aggregate(rows)
    meta = {
        "identities": f"peopleDevTrain.txt, >= {args.min_images} images each",
        "network": args.network,
        "widths": args.widths,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seeds": args.seeds,
        "plant_inactive": args.plant_inactive,
        "quick": args.quick,
    }
    (args.out / "results.json").write_text(
        json.dumps({"meta": meta, "runs": rows, "table": table}, indent=2) + "\n"
    )
    md = markdown(table, meta)
    (args.out / "results.md").write_text(md)
    figure(rows, args.out / "summary.png")
    for m in args.methods:  # the paper's Fig. 4 and Fig. 2 for the first seed of each method
        run = args.out / "runs" / f"{m}_seed{args.seeds[0]}"
        analysis.filter_grid(run / "backbone.pth", out=args.out / f"grid_{m}.png")
        analysis.plot_trajectory(run, out=args.out / f"trajectory_{m}.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
