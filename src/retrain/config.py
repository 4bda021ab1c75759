"""Fine-tuning settings, kept apart from finetune.py so that reading them does not import PyTorch."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .augment import Augment

CPU_TRAIN_SIZE = 160  # fine-tuning resolution on the CPU: ~3x cheaper per image than 224


@dataclass
class FinetuneConfig:
    epochs: int = 6
    train_size: int | None = None  # None: 160 on the CPU, the backbone's own size on a GPU
    batch_size: int = 32
    learning_rate: float = 2e-3  # the head's; unfrozen stages get backbone_lr_ratio of it
    backbone_lr_ratio: float = 0.5
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.1
    unfreeze: int = -1  # stages from the top to train: -1 all, 0 the head only
    patience: int = 2  # epochs without validation improvement before stopping
    augment: Augment | None = None  # None: the modern default; its size is set to train_size
    device: str = "auto"  # auto, cpu, cuda
    compile: bool = False  # torch.compile (GPU)
    workers: int = 0  # decode threads; 0: one per CPU core
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)
