"""Training settings for live-image training, kept apart from finetune.py so that reading them does not import PyTorch."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .augment import Augment
from .validate import FINETUNE_RULES, check

CPU_TRAIN_SIZE = 160  # fine-tuning resolution on the CPU: ~3x cheaper per image than 224


@dataclass
class FinetuneConfig:
    epochs: int = 6  # 0: chosen from the data size (from-scratch training)
    train_size: int | None = None  # None: 160 on the CPU, the backbone's own size on a GPU
    batch_size: int = 0  # 0: chosen from the device and data size (finetune_batch_size, scratch_batch_size)
    learning_rate: float = 2e-3  # the head's; unfrozen stages get backbone_lr_ratio of it
    backbone_lr_ratio: float = 0.5
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.1
    unfreeze: int = -1  # stages from the top to train: -1 all, 0 the head only
    patience: int | None = 2  # epochs without validation improvement before stopping; None: never stop early
    augment: Augment | None = None  # None: the modern default; its size is set to train_size
    device: str = "auto"  # auto, cpu, cuda
    compile: bool = False  # torch.compile (GPU)
    hold_images: bool | None = None  # decode once, distort on the device; None: on a GPU, when they fit
    workers: int = 0  # decode threads; 0: one per CPU core
    seed: int = 0

    def __post_init__(self) -> None:
        check("FinetuneConfig", self, FINETUNE_RULES)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Checkpoint:
    """Where a live-image run saves itself after every epoch, and what makes it the same run (checked on --resume)."""
    path: Path
    identity: dict


def finetune_batch_size(n_train: int, gpu: bool) -> int:
    """32 (the recipe measured on the CPU); on a GPU, up to 256 once that still leaves ~100 steps per epoch."""
    return max(32, min(256, n_train // 100)) if gpu else 32


def scratch_defaults() -> FinetuneConfig:
    """The recipe for networks trained from random weights (one-cycle, larger batches and rates).

    On Fashion-MNIST (54k training images), scratch-small with peak rate 3e-3, a 25% warm-up and batch
    128 reached 0.913 test accuracy in 8 epochs and 0.919 in 12; the schedule gives it 16. The best
    validation epoch is kept, so there is no early stop.
    """
    return FinetuneConfig(epochs=0, batch_size=0, learning_rate=3e-3, weight_decay=5e-4, warmup_fraction=0.25,
                          patience=None)


def scratch_epochs(n_train: int) -> int:
    """Epochs for from-scratch training: ~850k image presentations, between 8 and 40 passes."""
    return max(8, min(40, round(850_000 / max(1, n_train))))


def scratch_batch_size(n_train: int) -> int:
    """128, but at least ~20 steps per epoch on small data (16 images per batch at the least)."""
    return max(16, min(128, n_train // 20))
