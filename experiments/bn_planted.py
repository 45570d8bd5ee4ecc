"""Channels planted dead through BatchNorm: does CRAFT bring them back, and do they stay alive?

A short CPU training (``craft-train``'s built-in toy identities; r18 with stage widths
32/16/32/64, so 32 first-layer filters, at 32 px, batch 32, 6 epochs, weight decay 5e-2 for a
decay budget D of about 7: with the default 5e-4 the planted channels simply regrow from their
gradients within an epoch, reactivated or not) in which, at the end of the first epoch,
12 first-layer channels are killed *through BN* (``--plant-inactive 12 --plant-through bn``:
gamma 1e-4 and filters scaled to max |w| = 5e-3, above the paper's 1e-3), the state the
census finds in released ArcFace MobileFaceNets. Arms, same seeds:

* ``none``: no reactivation;
* ``craft``: the paper's CRAFT (weight rule, conv row only): it cannot see these channels;
* ``craft_folded``: folded criterion + BN-aware reactivation of the whole channel.

Reported per arm and epoch end: channels dead by the folded criterion before the epoch-end
reactivation, channels reactivated, and whether the planted channels are alive at the end.
Runs are reused when finished (``summary.json``)::

    python experiments/bn_planted.py            # a few CPU minutes per run, 9 runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ARMS = {
    "none": ("none", "weight"),
    "craft": ("craft", "weight"),
    "craft_folded": ("craft", "folded"),
}


def run(out: Path, arm: str, seed: int, threads: int) -> Path:
    path = out / "runs" / f"{arm}_s{seed}"
    if (path / "summary.json").is_file():
        return path
    reactivation, criterion = ARMS[arm]
    argv = [
        "--widths", "32", "16", "32", "64", "--image-size", "32", "--embedding-size", "64",
        "--batch-size", "32", "--epochs", "6", "--weight-decay", "5e-2",
        "--plant-inactive", "12", "--plant-through", "bn", "--stats-every", "5",
        "--reactivation", reactivation, "--criterion", criterion, "--seed", str(seed),
        "--workers", "0", "--device", "cpu", "--no-progress", "--output", str(path),
    ]  # fmt: skip
    if (path / "checkpoint_last.pt").is_file():
        argv += ["--resume", str(path)]
    path.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with (path / "train.log").open("a") as log:
        cmd = [sys.executable, "-m", "craft_ext.train.cli", *argv]
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, check=True)
    return path


def planted_rows(seed: int, n: int = 32, count: int = 12) -> list[int]:
    """The rows craft-train plants (its generator: seed + 99)."""
    g = torch.Generator().manual_seed(seed + 99)
    return sorted(torch.randperm(n, generator=g)[:count].tolist())


def analyse(path: Path, seed: int) -> dict[str, Any]:
    stats = [json.loads(x) for x in (path / "filter_stats.jsonl").read_text().splitlines()]
    summary = json.loads((path / "summary.json").read_text())
    rows = planted_rows(seed)
    per_epoch = []
    for r in stats:
        if r["when"] != "before":
            continue
        dead = [i for i, v in enumerate(r["folded_max_abs"]) if v <= r["threshold"]]
        per_epoch.append(
            {
                "epoch": r["epoch"],
                "dead_folded": len(dead),
                "planted_dead": len(set(dead) & set(rows)),
            }
        )
    events = [json.loads(x) for x in (path / "reactivations.jsonl").read_text().splitlines() if x]
    accuracy = next(v for k, v in summary["epochs"][-1].items() if k.endswith("/accuracy"))
    return {
        "per_epoch": per_epoch,
        "reactivated": sum(len(e["filters"]) for e in events),
        "planted_dead_at_end": per_epoch[-1]["planted_dead"],
        "dead_folded_at_end": per_epoch[-1]["dead_folded"],
        "accuracy": accuracy,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=HERE / "results" / "bn_planted")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    for seed in args.seeds:
        for arm in ARMS:
            path = run(args.out, arm, seed, args.threads)
            results.setdefault(arm, {})[str(seed)] = analyse(path, seed)
    (args.out / "summary.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [
        "| arm | planted channels still dead at the end (of 12) | dead by folded rule at the end "
        "(of 32) | reactivated | toy verification accuracy |",
        "|---|---|---|---|---|",
    ]
    for arm, by_seed in results.items():
        vals = list(by_seed.values())

        def col(key: str, fmt: str, vals: list[dict[str, Any]] = vals) -> str:
            return ", ".join(format(v[key], fmt) for v in vals)

        lines.append(
            f"| {arm} | {col('planted_dead_at_end', 'd')} | {col('dead_folded_at_end', 'd')} | "
            f"{col('reactivated', 'd')} | {col('accuracy', '.3f')} |"
        )
    table = "\n".join(lines) + f"\n\n(one value per seed: {', '.join(map(str, args.seeds))})\n"
    (args.out / "table.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
