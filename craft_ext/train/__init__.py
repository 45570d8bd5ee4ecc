"""``craft-train``: ArcFace/CosFace face-recognition training with CRAFT filter reactivation."""

from .config import TrainConfig, build_parser, parse_config
from .errors import RunError, TrainingDiverged, TrainingInterrupted
from .report import format_summary
from .trainer import EpochBatches, Trainer, train

__all__ = [
    "EpochBatches",
    "RunError",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "build_parser",
    "format_summary",
    "parse_config",
    "train",
]
