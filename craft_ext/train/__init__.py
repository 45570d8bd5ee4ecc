"""``craft-train``: ArcFace/CosFace face-recognition training with CRAFT filter reactivation."""

from .config import TrainConfig, build_parser, parse_config
from .trainer import EpochBatches, Trainer, TrainingDiverged, format_summary, train

__all__ = [
    "EpochBatches",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "build_parser",
    "format_summary",
    "parse_config",
    "train",
]
