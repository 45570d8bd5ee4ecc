"""Die-off experiment: first-layer channels that die by themselves, and what reactivation does.

Trains the same small iresnet on LFW View-1 training people (``peopleDevTrain.txt``) in a
regime where first-layer channels die *naturally* (no planting): a decay budget
D = sum(lr_t) * weight_decay / (1 - momentum) of about 9 (see README; arcface_torch's recipes
have D >= 17). Arms, identical schedules and seeds:

* ``none``: no reactivation;
* ``random``: inactive filters re-drawn He-normal (weight rule, conv row only);
* ``scaled_gaussian``: drawn from N(mean, std) of the strongest filter (weight rule, conv only);
* ``craft``: the paper's CRAFT (weight rule ``max |w| <= 1e-3``, conv row only);
* ``craft_folded``: CRAFT with the folded criterion (``max |w * gamma / sqrt(var + eps)|``)
  and BN-aware reactivation of the whole channel (conv row + BN + PReLU entries).

Reactivation runs at every epoch end but the last. Filter statistics (raw and BN-folded) are
logged every ``--stats-every`` steps; verification on the disjoint ``pairsDevTest.txt``.

Resumable: a finished run (``summary.json``) is reused; a run killed part-way continues from
its last checkpoint (``--save-every`` steps), bit-identically. Run it again to continue::

    nohup python experiments/die_off.py > die_off.log 2>&1 &
    python experiments/die_off.py --report-only      # tables and figures from finished runs

Results: ``experiments/results/die_off/`` (summary.json, table.md, figures); the per-run
directories under ``runs/`` are not committed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = Path(os.environ.get("CRAFT_LFW_DIR", HERE.parent.parent / "shared/data/lfw112"))

#: arm -> (craft-train --reactivation, --criterion)
ARMS: dict[str, tuple[str, str]] = {
    "none": ("none", "weight"),
    "random": ("random", "weight"),
    "scaled_gaussian": ("scaled_gaussian", "weight"),
    "craft": ("craft", "weight"),
    "craft_folded": ("craft", "folded"),
}

#: configuration fields a reused run must match (the rest, e.g. paths, may differ)
_MATCH = (
    "network",
    "widths",
    "embedding_size",
    "image_size",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "min_images",
    "reactivation",
    "criterion",
    "threshold",
    "seed",
    "plant_inactive",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="LFW 112x112 folder")
    p.add_argument("--out", type=Path, default=HERE / "results" / "die_off", help="results")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--jobs", type=int, default=2, help="runs at once (one thread each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--network", default="r18")
    p.add_argument(
        "--widths",
        type=int,
        nargs=4,
        default=[64, 16, 32, 64],
        help="iresnet stage widths; the first is the number of first-layer filters (64)",
    )
    p.add_argument("--embedding-size", type=int, default=128)
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=3.5e-2)
    p.add_argument("--min-images", type=int, default=4)
    p.add_argument("--stats-every", type=int, default=10, help="filter statistics every N steps")
    p.add_argument("--save-every", type=int, default=50, help="checkpoint every N steps")
    p.add_argument("--report-only", action="store_true", help="only aggregate finished runs")
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration (tests)")
    return p


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / "runs" / f"{arm}_s{seed}"


def train_argv(args: argparse.Namespace, arm: str, seed: int) -> list[str]:
    """The craft-train arguments of one run."""
    reactivation, criterion = ARMS[arm]
    data = args.data
    argv = [
        "--data", str(data / "images"),
        "--identities", str(data / "peopleDevTrain.txt"),
        "--min-images", str(args.min_images),
        "--val", f"{data / 'pairsDevTest.txt'}:{data / 'images'}",
        "--network", args.network,
        "--widths", *map(str, args.widths),
        "--embedding-size", str(args.embedding_size),
        "--image-size", str(args.image_size),
        "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size),
        "--lr", str(args.lr),
        "--weight-decay", str(args.weight_decay),
        "--reactivation", reactivation,
        "--criterion", criterion,
        "--seed", str(seed),
        "--workers", "0",
        "--device", "cpu",
        "--stats-every", str(args.stats_every),
        "--save-every", str(args.save_every),
        "--val-every-epochs", "0",
        "--log-every", "20",
        "--no-progress",
        "--output", str(run_dir(args.out, arm, seed)),
    ]  # fmt: skip
    return argv


def _finished(path: Path, argv: list[str]) -> bool:
    """Whether ``path`` holds a finished run of ``argv``'s configuration (raises if it holds a
    run of another configuration: results are never silently mixed)."""
    summary = path / "summary.json"
    if not summary.is_file():
        return False
    from craft_ext.train import parse_config

    want = parse_config(argv).to_dict()
    got = json.loads(summary.read_text())["config"]
    diff = {k: (got.get(k), want[k]) for k in _MATCH if got.get(k) != want[k]}
    if diff:
        raise SystemExit(
            f"die_off: {path} holds a run of another configuration {diff}; use another --out"
        )
    return True


def run_one(args: argparse.Namespace, arm: str, seed: int) -> dict[str, Any]:
    """Train (or resume, or reuse) one run; returns its summary."""
    path = run_dir(args.out, arm, seed)
    argv = train_argv(args, arm, seed)
    if not _finished(path, argv):
        path.mkdir(parents=True, exist_ok=True)
        if (path / "checkpoint_last.pt").is_file():
            argv = [*argv, "--resume", str(path)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": "1"}
        t0 = time.time()
        with (path / "train.log").open("a") as log:
            print(f"die_off: {arm} seed {seed}: {' '.join(argv[-2:])}", flush=True)
            proc = subprocess.run(
                [sys.executable, "-m", "craft_ext.train.cli", *argv],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                check=False,
            )
        if proc.returncode != 0:
            raise RuntimeError(f"die_off: {arm} seed {seed} failed; see {path / 'train.log'}")
        minutes = (time.time() - t0) / 60
        print(f"die_off: {arm} seed {seed} done in {minutes:.1f} min", flush=True)
    return json.loads((path / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.widths, args.image_size, args.epochs = [8, 8, 8, 8], 32, 2
        args.embedding_size, args.batch_size, args.stats_every = 16, 16, 5
    for need in ("images", "peopleDevTrain.txt", "pairsDevTest.txt"):
        if not (args.data / need).exists():
            print(f"die_off: --data {args.data}: {need} not found", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]  # seed-major
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for future in [pool.submit(run_one, args, arm, seed) for arm, seed in jobs]:
                future.result()
    from die_off_report import report  # experiments/ is on sys.path when run as a script

    report(args.out, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
