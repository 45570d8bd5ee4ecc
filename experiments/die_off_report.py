"""Aggregate the die-off experiment (``experiments/die_off.py``): tables, tests and figures.

Per run (arm, seed), from its run directory:

* ``dead_folded_final`` / ``dead_weight_final``: first-layer channels dead at the end of
  training (the last epoch end, where no reactivation runs) by the folded criterion
  (max |w * gamma / sqrt(var + eps)| <= 1e-3) and by the paper's weight criterion;
* ``reactivated_total``: filters reactivated over the run;
* ``redeaths``: reactivation events (channel, epoch end) after which the channel is dead again
  at a later check (an epoch end) by the arm's own criterion; ``redeaths_folded`` by the folded
  criterion whatever the arm (a conv-only reactivation under a dead BN never comes alive);
* ``revived_folded``: reactivation events after which the channel is alive through BN right
  away (the epoch end's "after" statistics); ``reactivated_channels`` distinct channels ever
  reactivated, ``reactivated_alive_end`` of them alive through BN at the end;
* ``accuracy`` and ``tar_at_far_1e-2`` on the disjoint ``pairsDevTest.txt`` (1,000 pairs, 10
  folds), from the final backbone, evaluated again here (flip-augmented embeddings).

Across seeds: mean and std per arm, and for each arm a paired test against ``none`` over the
seeds (paired t-test and exact Wilcoxon signed-rank; with 5 seeds the smallest two-sided
Wilcoxon p-value is 0.0625). Figures: the die-off over training per arm (paper Fig. 2 as
counts), per-filter trajectories of seed 0 (Fig. 2), final filter grids (Fig. 4) and pattern
counts (Fig. 5).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

ARM_LABELS = {
    "none": "no reactivation",
    "random": "random (weight rule)",
    "scaled_gaussian": "scaled Gaussian (weight rule)",
    "craft": "CRAFT (weight rule, conv only)",
    "craft_folded": "CRAFT, folded rule + BN-aware",
}
ARM_COLOURS = {
    "none": "#4d4d4d",
    "random": "#e69f00",
    "scaled_gaussian": "#56b4e9",
    "craft": "#d55e00",
    "craft_folded": "#009e73",
}
_METRICS = (
    "dead_folded_final",
    "dead_weight_final",
    "reactivated_total",
    "redeaths",
    "redeaths_folded",
    "revived_folded",
    "reactivated_channels",
    "reactivated_alive_end",
    "accuracy",
    "tar_at_far_1e-2",
    "patterns",
)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _dead(record: dict[str, Any], criterion: str) -> set[int]:
    key = "folded_max_abs" if criterion == "folded" else "max_abs"
    thr = float(record.get("threshold", 1e-3))
    return {i for i, v in enumerate(record[key]) if isinstance(v, (int, float)) and v <= thr}


def load_run(path: Path, layer: str = "conv1.weight") -> dict[str, Any]:
    """The per-run quantities of the module docs (accuracy filled in by :func:`evaluate_run`)."""
    summary = json.loads((path / "summary.json").read_text())
    cfg = summary["config"]
    stats = [r for r in _read_jsonl(path / "filter_stats.jsonl") if r["layer"] == layer]
    checks = {r["epoch"]: r for r in stats if r["when"] == "before"}
    afters = {r["epoch"]: r for r in stats if r["when"] == "after"}
    events = [e for e in _read_jsonl(path / "reactivations.jsonl") if e["param"] == layer]
    own = "folded" if cfg.get("criterion") == "folded" else "weight"
    redeaths = {"weight": 0, "folded": 0}
    revived = []  # (epoch, filter)
    for ev in events:
        for f in ev["filters"]:
            revived.append((int(ev["epoch"]), int(f)))
    for criterion in ("weight", "folded"):
        for epoch, f in revived:
            later = [c for e, c in checks.items() if e > epoch]
            if any(f in _dead(c, criterion) for c in later):
                redeaths[criterion] += 1
    last = checks[max(checks)]
    # alive through BN right after the reactivation (the "after" record of its epoch end)
    revived = [(e, f) for e, f in revived if e in afters]
    revived_folded = sum(f not in _dead(afters[e], "folded") for e, f in revived)
    ever = {f for _, f in revived}
    alive_end = len(ever - _dead(last, "folded"))
    return {
        "path": str(path),
        "seed": int(cfg["seed"]),
        "criterion": own,
        "dead_folded_final": len(_dead(last, "folded")),
        "dead_weight_final": len(_dead(last, "weight")),
        "reactivated_total": int(summary["reactivated_total"]),
        "redeaths": redeaths[own],
        "redeaths_folded": redeaths["folded"],
        "revived_folded": revived_folded,
        "reactivated_alive_end": alive_end,
        "reactivated_channels": len(ever),
        "decay_budget": float(summary.get("decay_budget", float("nan"))),
        "trainer_accuracy": _trainer_accuracy(summary),
        "steps": int(summary["steps"]),
    }


def _trainer_accuracy(summary: dict[str, Any]) -> float:
    for epoch in reversed(summary["epochs"]):
        for key, value in epoch.items():
            if key.endswith("/accuracy"):
                return float(value)
    return float("nan")


def evaluate_run(path: Path, data: Path, image_size: int) -> dict[str, float]:
    """Accuracy (10-fold) and TAR@FAR=1e-2 of the run's final backbone on pairsDevTest."""
    import torch

    from craft_ext.analysis.io import load_model
    from craft_ext.eval import evaluate, load_verification_set

    model = load_model(path / "backbone.pth").eval()
    spec = f"{data / 'pairsDevTest.txt'}:{data / 'images'}"
    vs = load_verification_set(spec, image_size=image_size, progress=False)
    with torch.no_grad():
        res = evaluate(model, vs, batch_size=128, device="cpu", flip=True, progress=False)
    return {"accuracy": float(res["accuracy"]), "tar_at_far_1e-2": float(res["tar_at_far"][0.01])}


def _sha1(path: Path) -> str:
    import hashlib

    return hashlib.sha1(path.read_bytes()).hexdigest()


def write_runs(out: Path, runs: dict[str, list[dict[str, Any]]]) -> Path:
    """``runs.json``: every run's numbers and its die-off curves (steps, dead by the folded
    and the weight criterion), so the results outlive the (uncommitted) run directories."""
    record = {}
    for arm, rs in runs.items():
        for r in sorted(rs, key=lambda r: r["seed"]):
            steps, folded = _dead_curve(Path(r["path"]), "folded")
            _, weight = _dead_curve(Path(r["path"]), "weight")
            entry = {k: v for k, v in r.items() if k != "path"}
            entry["curve"] = {"step": steps, "dead_folded": folded, "dead_weight": weight}
            record[f"{arm}_s{r['seed']}"] = {"arm": arm, **entry}
    path = out / "runs.json"
    path.write_text(json.dumps(record) + "\n")
    return path


def _patterns(path: Path) -> int:
    from craft_ext.analysis import filter_patterns

    return int(filter_patterns(path / "backbone.pth")["clusters"])


def _paired_tests(a: list[float], b: list[float]) -> dict[str, float]:
    """Paired t-test and exact two-sided Wilcoxon signed-rank of a vs b (same seeds)."""
    from scipy import stats

    diff = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    out = {"mean_diff": float(diff.mean()) if diff.size else float("nan")}
    if diff.size < 2 or not np.any(diff != 0):
        return {**out, "t_p": float("nan"), "wilcoxon_p": float("nan")}
    out["t_p"] = float(stats.ttest_rel(a, b).pvalue)
    out["wilcoxon_p"] = float(stats.wilcoxon(a, b, method="exact").pvalue)
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def aggregate(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per-arm lists (the issue's summary.json shape) plus means, stds and tests vs none."""
    arms: dict[str, Any] = {}
    base = {r["seed"]: r for r in runs.get("none", [])}
    for arm, rs in runs.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in rs]}
        for m in _METRICS:
            entry[m] = [r.get(m) for r in rs]
        entry["mean"] = {m: _mean_std([v for v in entry[m] if v is not None])[0] for m in _METRICS}
        entry["std"] = {m: _mean_std([v for v in entry[m] if v is not None])[1] for m in _METRICS}
        if arm != "none" and base:
            paired = [r for r in rs if r["seed"] in base]
            entry["vs_none"] = {
                m: _paired_tests([r[m] for r in paired], [base[r["seed"]][m] for r in paired])
                for m in ("dead_folded_final", "dead_weight_final", "accuracy", "tar_at_far_1e-2")
            }
        arms[arm] = entry
    return arms


def _fmt(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(arms: dict[str, Any], filters: int) -> str:
    """Markdown table of the per-arm means ± std (counts out of ``filters``)."""
    head = (
        f"| arm | seeds | dead, folded (/{filters}) | dead, weight (/{filters}) | reactivated "
        "| alive through BN right after | re-deaths (own rule) | re-deaths (folded) "
        "| reactivated channels alive at the end | pairsDevTest acc. | TAR@FAR=1e-2 "
        "| patterns | acc. vs none (paired t p / Wilcoxon p) |"
    )
    lines = [head, "|" + "---|" * 13]
    for arm, e in arms.items():
        m, s = e["mean"], e["std"]
        test = e.get("vs_none", {}).get("accuracy")
        vs = ""
        if test:
            vs = f"{test['mean_diff']:+.4f} ({test['t_p']:.3f} / {test['wilcoxon_p']:.3f})"
        lines.append(
            f"| {arm} | {len(e['seeds'])}"
            f" | {_fmt(m['dead_folded_final'], s['dead_folded_final'], 1)}"
            f" | {_fmt(m['dead_weight_final'], s['dead_weight_final'], 1)}"
            f" | {_fmt(m['reactivated_total'], s['reactivated_total'], 1)}"
            f" | {_fmt(m['revived_folded'], s['revived_folded'], 1)}"
            f" | {_fmt(m['redeaths'], s['redeaths'], 1)}"
            f" | {_fmt(m['redeaths_folded'], s['redeaths_folded'], 1)}"
            f" | {_fmt(m['reactivated_alive_end'], s['reactivated_alive_end'], 1)}"
            f" / {_fmt(m['reactivated_channels'], s['reactivated_channels'], 1)}"
            f" | {_fmt(m['accuracy'], s['accuracy'], 4)}"
            f" | {_fmt(m['tar_at_far_1e-2'], s['tar_at_far_1e-2'], 3)}"
            f" | {_fmt(m['patterns'], s['patterns'], 1)} | {vs} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _dead_curve(path: Path, criterion: str, layer: str = "conv1.weight") -> tuple[list, list]:
    """(steps, dead counts) over training from the dense and epoch-end "before" records."""
    pts = {}
    for r in _read_jsonl(path / "filter_stats.jsonl"):
        if r["layer"] == layer and r["when"] in ("step", "before"):
            pts[int(r["step"])] = len(_dead(r, criterion))
    steps = sorted(pts)
    return steps, [pts[s] for s in steps]


def plot_die_off(out: Path, runs: dict[str, list[dict[str, Any]]], filters: int) -> Path:
    """Dead first-layer channels over training, mean ± std over seeds, per arm (two panels:
    folded and weight criterion)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, constrained_layout=True)
    for ax, criterion in zip(axes, ("folded", "weight"), strict=True):
        for arm, rs in runs.items():
            curves = [_dead_curve(Path(r["path"]), criterion) for r in rs]
            n = min(len(c[0]) for c in curves)
            steps = np.asarray(curves[0][0][:n])
            ys = np.asarray([c[1][:n] for c in curves], dtype=float)
            mean, std = ys.mean(0), ys.std(0)
            ax.plot(steps, mean, color=ARM_COLOURS[arm], label=ARM_LABELS[arm], lw=1.6)
            ax.fill_between(steps, mean - std, mean + std, color=ARM_COLOURS[arm], alpha=0.15)
        ax.set_title(
            "dead by the folded criterion (max |w·γ/√(var+ε)| ≤ 1e-3)"
            if criterion == "folded"
            else "dead by the weight criterion (max |w| ≤ 1e-3)",
            fontsize=10,
        )
        ax.set_xlabel("optimizer step")
        ax.set_ylim(0, filters)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"dead first-layer channels (of {filters})")
    axes[1].legend(fontsize=8, loc="upper left")
    seeds = len(next(iter(runs.values())))
    fig.suptitle(
        f"Die-off of conv1 channels on LFW (mean ± std over {seeds} seed{'s' * (seeds != 1)}; "
        "reactivation at epoch ends)",
        fontsize=11,
    )
    path = out / "die_off_curves.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_trajectories(out: Path, runs: dict[str, list[dict[str, Any]]], seed: int = 0) -> Path:
    """Per-filter folded max |w| over training (seed ``seed``), one panel per arm, with the
    threshold and the reactivations (paper Fig. 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in runs if any(r["seed"] == seed for r in runs[a])]
    fig, axes = plt.subplots(
        1, len(arms), figsize=(3.4 * len(arms), 3.6), sharey=True, constrained_layout=True
    )
    axes = np.atleast_1d(axes)
    for ax, arm in zip(axes, arms, strict=True):
        path = Path(next(r["path"] for r in runs[arm] if r["seed"] == seed))
        recs = [
            r
            for r in _read_jsonl(path / "filter_stats.jsonl")
            if r["layer"] == "conv1.weight" and r["when"] in ("step", "before", "after")
        ]
        # "after" a reactivation sits just right of its "before" at the same step
        xs = np.asarray([r["step"] + (0.4 if r["when"] == "after" else 0.0) for r in recs])
        ys = np.asarray([r["folded_max_abs"] for r in recs], dtype=float)
        order = np.argsort(xs, kind="stable")
        xs, ys = xs[order], np.clip(ys[order], 1e-8, None)
        ax.plot(xs, ys, lw=0.5, alpha=0.6)
        ax.axhline(1e-3, color="k", ls="--", lw=0.8)
        for ev in _read_jsonl(path / "reactivations.jsonl"):
            ax.axvline(ev["step"], color=ARM_COLOURS[arm], lw=0.8, alpha=0.6)
        ax.set_yscale("log")
        ax.set_title(ARM_LABELS[arm], fontsize=9)
        ax.set_xlabel("optimizer step")
    axes[0].set_ylabel("folded max |w·γ/√(var+ε)| per filter")
    fig.suptitle(
        f"conv1 filter trajectories, seed {seed} (dashed: 1e-3; vertical lines: reactivations)",
        fontsize=10,
    )
    path = out / f"trajectories_seed{seed}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_patterns(out: Path, arms: dict[str, Any]) -> Path:
    """Unique filter patterns (PCA + mean-shift) per arm, mean ± std (paper Fig. 5 counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.4), constrained_layout=True)
    names = list(arms)
    means = [arms[a]["mean"]["patterns"] for a in names]
    stds = [arms[a]["std"]["patterns"] for a in names]
    ax.bar(range(len(names)), means, yerr=stds, color=[ARM_COLOURS[a] for a in names], capsize=3)
    ax.set_xticks(range(len(names)), [ARM_LABELS[a] for a in names], rotation=20, ha="right")
    ax.set_ylabel("unique conv1 filter patterns")
    ax.set_title("Filter patterns at the end (mean ± std over seeds)", fontsize=10)
    path = out / "patterns.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_grids(out: Path, runs: dict[str, list[dict[str, Any]]], seed: int = 0) -> list[Path]:
    """Final conv1 filter grid of seed ``seed`` per arm (paper Fig. 4)."""
    from craft_ext.analysis import filter_grid

    paths = []
    for arm, rs in runs.items():
        match = [r for r in rs if r["seed"] == seed]
        if not match:
            continue
        run = Path(match[0]["path"])
        path = out / f"grid_{arm}_seed{seed}.png"
        filter_grid(run, path, title=f"conv1 at the end: {ARM_LABELS[arm]} (seed {seed})")
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------


def report(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Aggregate every finished run under ``out/runs``: writes ``summary.json``, ``table.md``
    and the figures; returns the summary."""
    from die_off import ARMS

    runs: dict[str, list[dict[str, Any]]] = {}
    cache_path = out / "evaluations.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    config: dict[str, Any] = {}
    for arm in ARMS:
        for path in sorted((out / "runs").glob(f"{arm}_s*")):
            if not (path / "summary.json").is_file() or not path.name.startswith(f"{arm}_s"):
                continue
            if not path.name[len(arm) + 2 :].isdigit():
                continue  # e.g. craft_s* must not match craft_folded_s*
            run = load_run(path)
            digest = _sha1(path / "backbone.pth")  # a rerun of the same name is evaluated again
            if cache.get(path.name, {}).get("backbone_sha1") != digest:
                cache[path.name] = {
                    **evaluate_run(path, args.data, args.image_size),
                    "patterns": _patterns(path),
                    "backbone_sha1": digest,
                }
                cache_path.write_text(json.dumps(cache, indent=1) + "\n")
            run.update({k: v for k, v in cache[path.name].items() if k != "backbone_sha1"})
            runs.setdefault(arm, []).append(run)
            config = json.loads((path / "summary.json").read_text())["config"]
    if not runs:
        print("die_off: no finished runs yet")
        return {}
    filters = int(config["widths"][0]) if config.get("widths") else 64
    arms = aggregate(runs)
    d = next(r["decay_budget"] for rs in runs.values() for r in rs)
    summary = {
        "config": {
            **{k: config[k] for k in ("network", "widths", "embedding_size", "image_size")},
            **{k: config[k] for k in ("epochs", "batch_size", "lr", "momentum", "weight_decay")},
            "min_images": config["min_images"],
            "threshold": config["threshold"],
            "plant_inactive": config["plant_inactive"],
            "decay_budget": d,
            "first_layer_filters": filters,
            "train": "LFW View 1 peopleDevTrain.txt (identities with >= 4 images)",
            "verify": "pairsDevTest.txt (1,000 pairs, disjoint people)",
            "reactivation": "every epoch end but the last",
        },
        "arms": arms,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_runs(out, runs)
    (out / "table.md").write_text(table(arms, filters))
    plot_die_off(out, runs, filters)
    plot_trajectories(out, runs)
    plot_patterns(out, arms)
    plot_grids(out, runs)
    print(table(arms, filters))
    return summary
