"""The Python API: what `import retrain` offers, each name from the module that owns it."""
from __future__ import annotations

from .config import HeadConfig, TrainConfig
from .evaluation import evaluate_folder as evaluate
from .pipeline import TrainedModel, train
from .prediction import load, predict

__all__ = ["HeadConfig", "TrainConfig", "TrainedModel", "evaluate", "load", "predict", "train"]
