"""Configuration of ``craft-train``: a dataclass, its command line and config files.

Every problem with a setting ends in one line naming the option (and, for a ``--config``
file, the file and its line) and exit status 2: the parser's errors are one line (no usage
block), a negative number after a numeric option is read as a value (``--threshold -1e-3``)
and then refused by :meth:`TrainConfig.validate`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import tomllib

__all__ = ["TrainConfig", "build_parser", "default_val", "parse_config"]

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
    # the state released models are in (channels dead through BatchNorm, filters above
    # 1e-3), found and revived by BN-aware CRAFT
    "plant_through": "bn",
    "criterion": "folded",
    "output": "craft_runs/demo",
    "log_every": 5,
}
# With --optimizer adamw, options the user did not set take arcface_torch's AdamW values.
ADAMW_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "weight_decay": 0.1}

REACTIVATION_METHODS = ("none", "craft", "scaled_gaussian", "random")
CRITERIA = ("weight", "folded")
AMP_MODES = ("none", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")


def is_toy(data: str) -> bool:
    """Whether ``--data`` names the built-in toy identities (``toy`` or ``toy:C:N``)."""
    return data == "toy" or data.startswith("toy:")


def default_val(data: str) -> list[str]:
    """The verification sets of a run whose ``--val`` is not given: the held-out toy pairs
    for toy data; none for anything else (toy pairs would measure nothing about real faces)."""
    return ["toy"] if is_toy(data) else []


@dataclass
class TrainConfig:
    """Everything a ``craft-train`` run depends on (saved in every checkpoint)."""

    # data
    data: str = "toy"
    identities: str | None = None
    min_images: int = 1
    on_error: str = "raise"
    image_size: int = 112
    #: verification sets; None: :func:`default_val` of ``data``; [] (``--val none``): none
    val: list[str] | None = None
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
    optimizer: str = "sgd"
    epochs: int = 20
    max_steps: int | None = None
    batch_size: int = 128
    grad_accum: int = 1
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
        """Raise ValueError naming the first bad option (as its ``--flag``) and what it
        expects. Comparisons are written so that NaN fails them."""
        for ok, message in self._checks():
            if not ok:
                raise ValueError(message)

    def _checks(self) -> list[tuple[bool, str]]:
        def opt(ok: bool, name: str, rule: str) -> tuple[bool, str]:
            return ok, f"--{name.replace('_', '-')} must be {rule}, got {getattr(self, name)}"

        def optional(name: str, rule: str = ">= 1") -> tuple[bool, str]:
            value = getattr(self, name)
            return opt(value is None or value >= 1, name, f"{rule} or unset")

        return [
            opt(self.epochs >= 1, "epochs", ">= 1"),
            opt(self.batch_size >= 1, "batch_size", ">= 1"),
            opt(self.grad_accum >= 1, "grad_accum", ">= 1 (micro-batches per optimizer step)"),
            opt(self.lr > 0 and math.isfinite(self.lr), "lr", "> 0"),
            opt(0 <= self.momentum < 1, "momentum", "in [0, 1)"),
            opt(self.weight_decay >= 0, "weight_decay", ">= 0"),
            opt(self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}"),
            *self._margin_checks(),
            opt(self.scale > 0 and math.isfinite(self.scale), "scale", "> 0"),
            opt(0 < self.sample_rate <= 1, "sample_rate", "in (0, 1]"),
            optional("max_steps"),
            opt(
                self.reactivation in REACTIVATION_METHODS,
                "reactivation",
                f"one of {REACTIVATION_METHODS}",
            ),
            opt(self.amp in AMP_MODES, "amp", f"one of {AMP_MODES}"),
            opt(self.threshold >= 0 and math.isfinite(self.threshold), "threshold", ">= 0"),
            opt(self.criterion in CRITERIA, "criterion", f"one of {CRITERIA}"),
            optional("stats_every", ">= 1 (steps)"),
            opt(self.val_every_epochs >= 0, "val_every_epochs", ">= 0"),
            optional("reactivate_every", ">= 1 (steps; unset: epoch ends)"),
            opt(self.log_every >= 1, "log_every", ">= 1"),
            optional("val_every"),
            optional("save_every"),
            opt(self.workers >= 0, "workers", ">= 0"),
            opt(self.image_size >= 16, "image_size", ">= 16 (pixels)"),
            opt(self.width > 0 and math.isfinite(self.width), "width", "> 0"),
            opt(
                self.widths is None or (len(self.widths) == 4 and min(self.widths) >= 1),
                "widths",
                "four positive stage widths",
            ),
            opt(self.embedding_size >= 1, "embedding_size", ">= 1"),
            opt(0 <= self.dropout < 1, "dropout", "in [0, 1)"),
            opt(self.min_images >= 1, "min_images", ">= 1"),
            opt(self.plant_inactive >= 0, "plant_inactive", ">= 0"),
            opt(self.plant_through in ("weight", "bn"), "plant_through", "'weight' or 'bn'"),
            opt(
                0 <= self.warmup_epochs <= self.epochs,
                "warmup_epochs",
                f"in [0, --epochs {self.epochs}]",
            ),
            opt(self.poly_power >= 0, "poly_power", ">= 0"),
            opt(
                self.clip_grad is None or (self.clip_grad > 0 and math.isfinite(self.clip_grad)),
                "clip_grad",
                "> 0 (0 disables)",
            ),
            opt(self.on_error in ("raise", "skip"), "on_error", "'raise' or 'skip'"),
            opt(self.seed >= 0, "seed", ">= 0"),
        ]

    def _margin_checks(self) -> list[tuple[bool, str]]:
        """``--margin M1 M2 M3`` of cos(m1 * theta + m2) - m3, each within the range where
        the margin makes the target harder to reach and can still be reached."""
        if len(self.margin) != 3:
            return [(False, f"--margin takes three numbers M1 M2 M3, got {list(self.margin)}")]
        m1, m2, m3 = self.margin
        shown = " ".join(f"{m:g}" for m in self.margin)
        return [
            (
                1 <= m1 <= 4,
                f"--margin {shown}: M1 (multiplicative angular margin) must be in [1, 4] "
                f"(1 for ArcFace and CosFace; below 1 it makes the target easier), got {m1:g}",
            ),
            (
                0 <= m2 < math.pi / 2,
                f"--margin {shown}: M2 (additive angular margin, ArcFace 0.5) must be in "
                f"[0, pi/2) radians, got {m2:g}",
            ),
            (
                0 <= m3 < 1,
                f"--margin {shown}: M3 (additive cosine margin, CosFace 0.4) must be in "
                f"[0, 1), got {m3:g}: cos(theta) - {m3:g} <= 0 at every angle, the target "
                "class could never win",
            ),
        ]

    def to_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-friendly dict (saved in checkpoints and summary.json)."""
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = typing.get_type_hints(TrainConfig)


class ConfigFileError(ValueError):
    """A ``--config`` file that cannot be used; the message names the file and the line."""


def _line_of(text: str, key: str) -> int | None:
    """The line of ``text`` (TOML or JSON) that sets ``key``, or None."""
    pattern = re.compile(rf'^\s*(?:"{re.escape(key)}"\s*:|{re.escape(key)}\s*=)')
    for lineno, line in enumerate(text.splitlines(), 1):
        if pattern.search(line):
            return lineno
    return None


def _type_problem(kind: Any, value: Any) -> str | None:
    """What is wrong with ``value`` for a field of type ``kind``, or None if it fits."""
    args = typing.get_args(kind)
    if isinstance(kind, types.UnionType):
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        return _type_problem(kinds[0], value) if len(kinds) == 1 else None
    origin = typing.get_origin(kind) or kind
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            return f"expected a list, got {value!r}"
        if origin is tuple and len(value) != len(args):
            return f"expected {len(args)} values, got {len(value)}"
        for item in value:
            problem = _type_problem(args[0], item)
            if problem:
                return problem
        return None
    if kind is bool:
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"expected an integer, got {value!r}"
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else f"expected a number, got {value!r}"
    if kind is str:
        return None if isinstance(value, str) else f"expected a string, got {value!r}"
    return None


def _decode(p: Path, text: str) -> Any:
    """Parse ``text`` as TOML (``.toml``) or JSON; errors name the file and the line."""
    if p.suffix == ".toml":
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            msg = str(exc)
            at = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
            if at:
                where = f"{p}, line {at.group(1)}, column {at.group(2)}"
                msg = msg[: at.start()]
            else:  # "(at end of document)"
                where = f"{p}, line {max(1, len(text.splitlines()))} (end of file)"
                msg = re.sub(r"\s*\(at end of document\)$", "", msg)
            raise ConfigFileError(f"--config {where}: invalid TOML: {msg}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        kind = "JSON" if p.suffix == ".json" else "JSON (name a TOML file *.toml)"
        raise ConfigFileError(
            f"--config {p}, line {exc.lineno}, column {exc.colno}: invalid {kind}: {exc.msg}"
        ) from None


def _load_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"--config {p}: cannot read it as text ({exc})") from None
    data = _decode(p, text)
    if not isinstance(data, dict):
        raise ConfigFileError(f"--config {p} must hold a table/object of options")
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        line = _line_of(text, unknown[0])
        where = f"{p}, line {line}" if line else str(p)
        raise ConfigFileError(
            f"--config {where}: unknown options {unknown}; known: {sorted(_FIELDS)}"
        )
    for key, value in data.items():
        problem = _type_problem(_TYPES[key], value)
        if problem:
            line = _line_of(text, key)
            where = f"{p}, line {line}" if line else str(p)
            raise ConfigFileError(f"--config {where}: {key}: {problem}")
    return data


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``craft-train: error: ...``, exit 2) that reads a
    negative number after an option as its value, exponents included (``-1e-3``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value) if value else "none"
    return str(value)


#: help-text defaults that a dataclass default cannot say
_DEFAULT_TEXT = {
    "val": "the held-out toy pairs with --data toy; no verification with other data",
    "identities": "every identity folder",
    "widths": "from --width",
    "reactivate_layers": "the first conv layer, e.g. conv1.weight (the paper's)",
    "resume": "start afresh",
    "clip_grad": "5.0",
    "progress": "a progress bar on",
    "max_steps": "--epochs x steps per epoch",
    "residual_scale": "none",
    "stats_every": "epoch ends only",
    "reactivate_every": "at each epoch end but the last",
    "val_every": "epoch ends only",
    "save_every": "epoch ends only",
}


def _add_defaults(parser: argparse.ArgumentParser) -> None:
    """Append every option's default to its help, from :class:`TrainConfig` and the presets
    (``--data toy``, ``--optimizer adamw``), so ``--help`` shows them all."""
    base = TrainConfig()
    for action in parser._actions:
        name = action.dest
        if name not in _FIELDS or action.help == argparse.SUPPRESS:
            continue
        text = _DEFAULT_TEXT.get(name) or _shown(getattr(base, name))
        extra = [
            f"{_shown(preset[name])} {label}"
            for preset, label in ((TOY_DEFAULTS, "with --data toy"), (ADAMW_DEFAULTS, "with adamw"))
            if name in preset
        ]
        text = "; ".join([text, *extra])
        action.help = f"{action.help or ''} (default: {text})".strip().replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    """The ``craft-train`` argument parser (every option's default in its help)."""
    p = _Parser(
        prog="craft-train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Train an ArcFace/CosFace face-recognition model (insightface iresnet backbone) with "
            "CRAFT filter reactivation (Bhatta et al., arXiv 2312.00072).\n\n"
            "With no arguments it runs a short demo on a built-in synthetic identity data set: "
            "a small r18, CRAFT on the first conv layer at every epoch end, verification on "
            "held-out synthetic identities. With --data toy (the default) options you do not set "
            f"take the demo's values: {TOY_DEFAULTS}.\n\n"
            "A table row is printed as each epoch ends; every run is verified at its end (also "
            "when --max-steps stops it), and the LR schedule spans the steps that really run: "
            "min(--epochs x steps per epoch, --max-steps). Ctrl-C saves checkpoint_last.pt at "
            "the next step boundary and exits 130 (a second Ctrl-C stops without saving); "
            "--resume then continues bit-identically. Errors print one line and exit 2."
        ),
        epilog=(
            "examples (times on a 2-core CPU):\n"
            "  craft-train                                   # built-in demo, ~10 min\n"
            "  craft-train --data ../shared/data/lfw112/images \\\n"
            "      --identities ../shared/data/lfw112/peopleDevTrain.txt --min-images 4 \\\n"
            "      --val ../shared/data/lfw112/pairsDevTest.txt:"
            "../shared/data/lfw112/images \\\n"
            "      --widths 64 16 32 64 --embedding-size 128 --image-size 48 \\\n"
            "      --epochs 2 --batch-size 64 --workers 0 --output runs/lfw-cpu   # ~10 min\n"
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
        help="'toy' or 'toy:CLASSES:IMAGES' (built-in synthetic identities), 'synthetic' "
        "(random images, for throughput), an image folder (one sub-folder per identity) or an "
        "insightface RecordIO dir (train.rec + train.idx)",
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
        help="unreadable image in --data: stop with one line naming it (raise), or skip it "
        "(skipped files are said at the end and listed in summary.json)",
    )
    g.add_argument("--image-size", type=int, help="input size in pixels")
    g.add_argument(
        "--val",
        nargs="+",
        help="verification sets: 'toy', insightface .bin files, or "
        "'PAIRS_FILE:IMAGES_DIR' (LFW pairs.txt / pairsDevTest.txt); 'NAME=' before any of "
        "them renames it in the logs; 'none': no verification. The first decides "
        "checkpoint_best.pt",
    )
    g.add_argument("--workers", type=int, help="data loader worker processes")
    g = p.add_argument_group("model")
    g.add_argument("--network", help="r18 | r34 | r50 | r100 | r200 | mbf | mbf_large")
    g.add_argument("--width", type=float, help="width multiplier (1.0 = insightface)")
    g.add_argument(
        "--widths",
        type=int,
        nargs=4,
        metavar="C",
        help="explicit stage widths (overrides --width), e.g. 64 32 64 128 keeps the 64 "
        "first-layer filters of the paper in a narrow CPU-sized network",
    )
    g.add_argument("--embedding-size", type=int, help="embedding dimension")
    g.add_argument("--dropout", type=float, help="dropout before the embedding layer")
    g.add_argument("--activation", choices=("prelu", "leaky_relu", "relu"), help="activation")
    g.add_argument(
        "--residual-scale",
        help="residual branch scale: a number or 'trainable' (TRSF, Peng et al. 2020)",
    )
    g = p.add_argument_group("loss")
    g.add_argument(
        "--margin",
        type=float,
        nargs=3,
        metavar=("M1", "M2", "M3"),
        help="combined margin cos(m1*theta + m2) - m3: ArcFace 1 0.5 0, CosFace 1 0 0.4 (the "
        "CRAFT paper's); M1 in [1, 4], M2 in [0, pi/2), M3 in [0, 1)",
    )
    g.add_argument("--scale", type=float, help="logit scale s")
    g.add_argument("--sample-rate", type=float, help="partial-FC negative class sampling rate")
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="sgd (the paper's; ReactivatingSGD) or adamw (torch AdamW with a "
        "craft_ext.Reactivator attached; its exp_avg / exp_avg_sq rows of reactivated filters "
        "are reset)",
    )
    g.add_argument("--epochs", type=int, help="passes over the training data")
    g.add_argument(
        "--max-steps",
        type=int,
        help="stop after this many optimizer steps (the LR schedule spans them)",
    )
    g.add_argument("--batch-size", type=int, help="images per process per micro-batch")
    g.add_argument(
        "--grad-accum",
        type=int,
        help="micro-batches per optimizer step: the effective batch is N x --batch-size x "
        "processes; steps, the LR schedule and the decay budget D count optimizer steps; "
        "checkpoints (and Ctrl-C) fall on optimizer-step boundaries. BatchNorm sees each "
        "micro-batch alone",
    )
    g.add_argument("--lr", type=float, help="peak learning rate")
    g.add_argument("--momentum", type=float, help="SGD momentum; AdamW's beta1")
    g.add_argument(
        "--weight-decay",
        type=float,
        help="SGD: coupled L2; AdamW: decoupled decay",
    )
    g.add_argument("--warmup-epochs", type=float, help="linear warmup before the poly decay")
    g.add_argument("--clip-grad", type=float, help="backbone gradient norm clip, 0 disables")
    g.add_argument(
        "--amp", choices=AMP_MODES, help="mixed precision (bf16, or fp16 with loss scaling on CUDA)"
    )
    g.add_argument(
        "--channels-last", action="store_true", default=None, help="channels-last memory format"
    )
    g = p.add_argument_group("CRAFT reactivation")
    g.add_argument(
        "--reactivation",
        choices=REACTIVATION_METHODS,
        help="method, run at every epoch end but the last",
    )
    g.add_argument(
        "--reactivate-layers",
        nargs="+",
        help="parameter names to watch",
    )
    g.add_argument(
        "--criterion",
        choices=CRITERIA,
        help="'weight': a filter is inactive when every |w| <= --threshold (the paper's); "
        "'folded': when every |w * gamma / sqrt(running_var + eps)| is, with the BatchNorm "
        "after the layer folded in (finds channels dead through BN), and the whole channel "
        "(conv row + BN + PReLU entries) is reactivated",
    )
    g.add_argument("--threshold", type=float, help="inactive when every |w| <= this")
    g.add_argument(
        "--reactivate-every", type=int, help="reactivate every N steps instead of at epoch ends"
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
        "5e-3 (dead only through BN, as in released models)",
    )
    g = p.add_argument_group("run")
    g.add_argument("--output", help="run directory")
    g.add_argument(
        "--resume",
        nargs="?",
        const="",
        help="resume from a checkpoint or run directory (no value: --output's checkpoint_last.pt)",
    )
    g.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--seed", type=int, help="seed of data order, flips, init and reactivation")
    g.add_argument("--log-every", type=int, help="steps between metric records")
    g.add_argument(
        "--stats-every",
        type=int,
        help="also record the watched layers' filter statistics (raw and BN-folded max |w|, "
        "L1) every N steps in filter_stats.jsonl",
    )
    g.add_argument("--val-every", type=int, help="also verify every N steps (printed and logged)")
    g.add_argument(
        "--val-every-epochs",
        type=int,
        help="verify every N epoch ends (0: only at the end of the run)",
    )
    g.add_argument("--save-every", type=int, help="also checkpoint every N steps")
    g.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        default=None,
        help="no progress bar (table rows and messages are still printed)",
    )
    _add_defaults(p)
    return p


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults, then ``--config`` file, then command-line flags; validated. Any problem
    exits with status 2 and one line naming it."""
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
        data = str(values.get("data", TrainConfig.data))
        if is_toy(data):
            for key, value in TOY_DEFAULTS.items():
                values.setdefault(key, value)
        if values.get("optimizer") == "adamw":
            for key, value in ADAMW_DEFAULTS.items():
                values.setdefault(key, value)
        val = values.get("val")  # None: the data's default (see default_val)
        if val is not None and [v.lower() for v in val] == ["none"]:
            values["val"] = []
        elif val is not None and any(v.lower() == "none" for v in val):
            raise ValueError(f"--val none cannot be combined with other sets, got {val}")
        cfg = TrainConfig(**values)
        cfg.validate()
    except (ValueError, FileNotFoundError, TypeError) as exc:
        parser.error(str(exc))
    return cfg
