"""Configuration of ``craft-train``: a dataclass, its command line and config files."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

__all__ = ["TrainConfig", "build_parser", "parse_config"]

# With the built-in toy data (the default), options the user did not set take these values:
# a small r18 that trains for a few minutes on a 2-core CPU, starting (as a converged ArcFace
# model would end) with some inactive first-layer filters so that CRAFT has work to do.
TOY_DEFAULTS: dict[str, Any] = {
    "width": 0.5,
    "embedding_size": 128,
    "image_size": 64,
    "epochs": 4,
    "batch_size": 64,
    "plant_inactive": 12,
    "output": "craft_runs/demo",
    "log_every": 5,
}

REACTIVATION_METHODS = ("none", "craft", "scaled_gaussian", "random")
CRITERIA = ("weight", "folded")
AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything a ``craft-train`` run depends on (saved in every checkpoint)."""

    # data
    data: str = "toy"
    identities: str | None = None
    min_images: int = 1
    on_error: str = "raise"
    image_size: int = 112
    val: list[str] = field(default_factory=lambda: ["toy"])
    workers: int = 2
    # model
    network: str = "r18"
    width: float = 1.0
    widths: list[int] | None = None
    embedding_size: int = 512
    dropout: float = 0.0
    activation: str = "prelu"
    residual_scale: str | None = None
    # loss / head
    margin: tuple[float, float, float] = (1.0, 0.0, 0.4)
    scale: float = 64.0
    sample_rate: float = 1.0
    # optimisation
    epochs: int = 20
    max_steps: int | None = None
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 0.0
    poly_power: float = 2.0
    clip_grad: float | None = 5.0
    amp: str = "none"
    channels_last: bool = False
    # CRAFT
    reactivation: str = "craft"
    reactivate_layers: list[str] = field(default_factory=list)
    criterion: str = "weight"
    threshold: float = 1e-3
    reactivate_every: int | None = None
    plant_inactive: int = 0
    plant_through: str = "weight"
    # bookkeeping
    output: str = "craft_runs/latest"
    resume: str | None = None
    device: str = "auto"
    seed: int = 0
    log_every: int = 10
    stats_every: int | None = None
    val_every: int | None = None
    val_every_epochs: int = 1
    save_every: int | None = None
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first bad field and what it expects."""
        checks: list[tuple[bool, str]] = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (len(self.margin) == 3, f"margin takes three numbers m1 m2 m3, got {self.margin}"),
            (self.scale > 0, f"scale must be > 0, got {self.scale}"),
            (0 < self.sample_rate <= 1, f"sample_rate must be in (0, 1], got {self.sample_rate}"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (
                self.reactivation in REACTIVATION_METHODS,
                f"reactivation must be one of {REACTIVATION_METHODS}, got {self.reactivation!r}",
            ),
            (self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r}"),
            (self.threshold >= 0, f"threshold must be >= 0, got {self.threshold}"),
            (
                self.criterion in CRITERIA,
                f"criterion must be one of {CRITERIA}, got {self.criterion!r}",
            ),
            (
                self.stats_every is None or self.stats_every >= 1,
                "stats_every must be >= 1 (steps) or unset",
            ),
            (self.val_every_epochs >= 0, "val_every_epochs must be >= 0"),
            (
                self.reactivate_every is None or self.reactivate_every >= 1,
                "reactivate_every must be >= 1 (steps) or unset (epoch end)",
            ),
            (self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}"),
            (self.val_every is None or self.val_every >= 1, "val_every must be >= 1"),
            (self.save_every is None or self.save_every >= 1, "save_every must be >= 1"),
            (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (self.image_size >= 16, f"image_size must be >= 16, got {self.image_size}"),
            (self.width > 0, f"width must be > 0, got {self.width}"),
            (
                self.widths is None or (len(self.widths) == 4 and min(self.widths) >= 1),
                f"widths must be four positive stage widths, got {self.widths}",
            ),
            (self.embedding_size >= 1, "embedding_size must be >= 1"),
            (self.plant_inactive >= 0, "plant_inactive must be >= 0"),
            (
                self.plant_through in ("weight", "bn"),
                f"plant_through must be 'weight' or 'bn', got {self.plant_through!r}",
            ),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.clip_grad is None or self.clip_grad > 0, "clip_grad must be > 0 or unset"),
            (self.on_error in ("raise", "skip"), "on_error must be 'raise' or 'skip'"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _load_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config file not found: {p}")
    text = p.read_text()
    data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"--config {p} must hold a table/object of options")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ValueError(f"--config {p}: unknown options {unknown}; known: {sorted(_FIELDS)}")
    return data


def build_parser() -> argparse.ArgumentParser:
    """The ``craft-train`` argument parser."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="craft-train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train an ArcFace/CosFace face-recognition model (insightface iresnet backbone) with "
            "CRAFT filter reactivation (Bhatta et al., arXiv 2312.00072).\n\n"
            "With no arguments it runs a short demo on a built-in synthetic identity data set: "
            "a small r18, CRAFT on the first conv layer at every epoch end, verification on "
            "held-out synthetic identities. With --data toy (the default) options you do not set "
            f"take the demo's values: {TOY_DEFAULTS}."
        ),
        epilog=(
            "examples:\n"
            "  craft-train                                   # built-in demo, a few CPU minutes\n"
            "  craft-train --data ../shared/data/lfw112/images \\\n"
            "      --identities ../shared/data/lfw112/peopleDevTrain.txt \\\n"
            "      --val ../shared/data/lfw112/pairsDevTest.txt:"
            "../shared/data/lfw112/images \\\n"
            "      --network r18 --epochs 20 --output runs/lfw-craft\n"
            "  torchrun --nproc_per_node 8 -m craft_ext.train.cli --data /data/ms1m --network r100 "
            "--amp bf16\n"
            "outputs in --output: metrics.jsonl, tb/ (TensorBoard), filter_stats.jsonl, "
            "reactivations.jsonl, checkpoint_last.pt, checkpoint_best.pt, backbone.pth, "
            "summary.json"
        ),
    )
    a = p.add_argument
    a("--config", help="JSON or TOML file of options (names as below, with _); flags override it")
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        help="'toy' (built-in synthetic identities), 'synthetic' (random "
        "images, for throughput), an image folder (one sub-folder per identity) or an "
        f"insightface RecordIO dir (train.rec + train.idx). Default {d.data!r}",
    )
    g.add_argument(
        "--identities",
        help="file listing the identities to train on (e.g. LFW's "
        "peopleDevTrain.txt, or one name per line)",
    )
    g.add_argument("--min-images", type=int, help="skip identities with fewer images")
    g.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        help="unreadable image: stop with its name (raise) or skip and count it",
    )
    g.add_argument("--image-size", type=int, help=f"input size in pixels (default {d.image_size})")
    g.add_argument(
        "--val",
        nargs="+",
        help="verification sets: 'toy', insightface .bin files, or "
        "'PAIRS_FILE:IMAGES_DIR' (LFW pairs.txt / pairsDevTest.txt); 'NAME=' before any of "
        "them renames it in the logs",
    )
    g.add_argument("--workers", type=int, help=f"data loader workers (default {d.workers})")
    g = p.add_argument_group("model")
    g.add_argument("--network", help=f"r18 | r34 | r50 | r100 | r200 (default {d.network})")
    g.add_argument("--width", type=float, help="width multiplier (1.0 = insightface)")
    g.add_argument(
        "--widths",
        type=int,
        nargs=4,
        metavar="C",
        help="explicit stage widths (overrides --width), e.g. 64 32 64 128 keeps the 64 "
        "first-layer filters of the paper in a narrow CPU-sized network",
    )
    g.add_argument("--embedding-size", type=int, help=f"default {d.embedding_size}")
    g.add_argument("--dropout", type=float)
    g.add_argument("--activation", choices=("prelu", "leaky_relu", "relu"))
    g.add_argument(
        "--residual-scale",
        help="residual branch scale: a number or 'trainable' "
        "(TRSF, Peng et al. 2020); default none",
    )
    g = p.add_argument_group("loss")
    g.add_argument(
        "--margin",
        type=float,
        nargs=3,
        metavar=("M1", "M2", "M3"),
        help="combined margin cos(m1*theta + m2) - m3: ArcFace 1 0.5 0, CosFace "
        "1 0 0.4 (default, the CRAFT paper's)",
    )
    g.add_argument("--scale", type=float, help=f"logit scale s (default {d.scale})")
    g.add_argument("--sample-rate", type=float, help="partial-FC negative class sampling rate")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help=f"default {d.epochs}")
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    g.add_argument("--batch-size", type=int, help=f"per process (default {d.batch_size})")
    g.add_argument("--lr", type=float, help=f"default {d.lr}")
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--clip-grad", type=float, help="gradient norm clip (0 disables)")
    g.add_argument(
        "--amp", choices=AMP_MODES, help="mixed precision (bf16, or fp16 with loss scaling on CUDA)"
    )
    g.add_argument("--channels-last", action="store_true", default=None)
    g = p.add_argument_group("CRAFT reactivation")
    g.add_argument(
        "--reactivation",
        choices=REACTIVATION_METHODS,
        help=f"method, run at every epoch end but the last (default {d.reactivation})",
    )
    g.add_argument(
        "--reactivate-layers",
        nargs="+",
        help="parameter names to watch (default: the first conv, e.g. conv1.weight, the paper's)",
    )
    g.add_argument(
        "--criterion",
        choices=CRITERIA,
        help="'weight': a filter is inactive when every |w| <= --threshold (the paper's); "
        "'folded': when every |w * gamma / sqrt(running_var + eps)| is, with the BatchNorm "
        "after the layer folded in (finds channels dead through BN), and the whole channel "
        "(conv row + BN + PReLU entries) is reactivated. Default weight",
    )
    g.add_argument("--threshold", type=float, help="inactive when every |w| <= this (1e-3)")
    g.add_argument(
        "--reactivate-every", type=int, help="reactivate every N steps instead of at each epoch end"
    )
    g.add_argument(
        "--plant-inactive",
        type=int,
        help="demo: make this many first-layer filters inactive at the first epoch end, before "
        "reactivation (simulates filters that died in a long run)",
    )
    g.add_argument(
        "--plant-through",
        choices=("weight", "bn"),
        help="how --plant-inactive kills channels: 'weight' scales the filters by 1e-4 (dead "
        "by the paper's rule); 'bn' sets their BatchNorm gamma to 1e-4 with filters at max |w| "
        "5e-3 (dead only through BN, as in released models). Default weight",
    )
    g = p.add_argument_group("run")
    g.add_argument("--output", help=f"run directory (default {d.output})")
    g.add_argument(
        "--resume",
        nargs="?",
        const="",
        help="resume from a checkpoint or run directory (no value: --output's checkpoint_last.pt)",
    )
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--seed", type=int)
    g.add_argument("--log-every", type=int, help="steps between metric records")
    g.add_argument(
        "--stats-every",
        type=int,
        help="also record the watched layers' filter statistics (raw and BN-folded max |w|, "
        "L1) every N steps in filter_stats.jsonl (default: epoch ends only)",
    )
    g.add_argument("--val-every", type=int, help="also verify every N steps")
    g.add_argument(
        "--val-every-epochs",
        type=int,
        help="verify every N epoch ends (default 1; 0: only after the last epoch)",
    )
    g.add_argument("--save-every", type=int, help="also checkpoint every N steps")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    return p


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then ``--config`` file, then command-line flags; validated."""
    parser = build_parser()
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    try:
        if args.config:
            values.update(_load_file(args.config))
        for name, value in vars(args).items():
            if name != "config" and value is not None:
                values[name] = value
        if values.get("clip_grad") == 0:
            values["clip_grad"] = None
        if "margin" in values:
            values["margin"] = tuple(float(m) for m in values["margin"])
        if values.get("resume") == "":
            values["resume"] = str(Path(values.get("output", TrainConfig.output)))
        if str(values.get("data", TrainConfig.data)).startswith("toy"):
            for key, value in TOY_DEFAULTS.items():
                values.setdefault(key, value)
        cfg = TrainConfig(**values)
        cfg.validate()
    except (ValueError, FileNotFoundError, TypeError) as exc:
        parser.error(str(exc))
    return cfg
