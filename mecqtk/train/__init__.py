"""Training engine: optimizer/schedule construction and the epoch loops."""

from mecqtk.train.loop import (
    EpochStats,
    NonFiniteLossError,
    TrainStep,
    evaluate,
    train_one_epoch,
)
from mecqtk.train.optim import build_optimizer, build_scheduler, lr_factor

__all__ = [
    "EpochStats",
    "NonFiniteLossError",
    "TrainStep",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "lr_factor",
    "train_one_epoch",
]
