"""Every training setting, with its default, in one place: the head, live-image training, the whole run.

Kept apart from the stages so that reading a setting (the command line builds its parsers and
help from these defaults) imports neither ONNX Runtime nor PyTorch. Every config checks its
numbers where it is made (validate.py), so the API refuses what the command line refuses.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UserError
from .validate import EXPORT_RULES, FINETUNE_RULES, HEAD_RULES, check, check_engine, check_kinds, check_train

DEFAULT_BACKBONE = "auto"  # lite0, or a larger Lite where cross-validation on a small folder prefers it
OUTPUT_NAME = "final_result"  # retrain.py's default --final_tensor_name
MODES = ("head", "finetune", "auto")
AUTO_BUDGET_SECONDS = 10 * 60  # fine-tuning in the default run without --time_budget: see the README for why
CPU_IMAGES_PER_SECOND = 35.0  # whole-network fine-tuning of Lite0 at 160 px on 2 cores: 35-41 measured, validation aside
CPU_TRAIN_SIZE = 160  # fine-tuning resolution on the CPU: ~3x cheaper per image than 224


@dataclass(frozen=True)
class Augment:
    size: int  # side of the square training crop
    flip: bool = True
    crop_scale: tuple[float, float] = (0.25, 1.0)  # random resized crop: fraction of the area
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.25  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.25
    saturation: float = 0.25
    legacy_crop: float = 0.0  # retrain.py --random_crop / 100
    legacy_scale: float = 0.0  # retrain.py --random_scale / 100
    legacy: bool = False  # use retrain.py's recipe (only the flags given) instead of the modern one

    @classmethod
    def from_retrain_flags(cls, size: int, flip_left_right: bool, random_crop: int, random_scale: int,
                           random_brightness: int) -> "Augment":
        """retrain.py's distortions: margin crop, scale up, flip, brightness multiply; nothing else."""
        return cls(size=size, flip=flip_left_right, brightness=random_brightness / 100, contrast=0.0,
                   saturation=0.0, legacy_crop=random_crop / 100, legacy_scale=random_scale / 100, legacy=True)


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
        self.validate()

    def validate(self) -> None:
        check("FinetuneConfig", self, FINETUNE_RULES)

    def to_dict(self) -> dict:
        return asdict(self)


# FinetuneConfig's settings that have a command-line flag and that only training on live images reads
LIVE_IMAGE_SETTINGS = ("epochs", "unfreeze", "train_size", "learning_rate", "batch_size", "device", "compile",
                       "hold_images")


@dataclass(frozen=True)
class GentlerIfCut:
    """Rates fine-tuning switches to early in its first epoch where that epoch's pace leaves `epochs` or
    fewer within the time budget (a machine slower than the plan's estimate): a schedule that short
    needs them, and by the end of the first epoch it would be too late."""
    epochs: int
    learning_rate: float
    backbone_lr_ratio: float


@dataclass(frozen=True)
class Checkpoint:
    """Where a live-image run saves itself after every epoch, and what makes it the same run (checked on --resume)."""
    path: Path
    identity: dict


def finetune_batch_size(n_train: int, gpu: bool) -> int:
    """32 (the recipe measured on the CPU); on a GPU, up to 256 once that still leaves ~100 steps per epoch."""
    return max(32, min(256, n_train // 100)) if gpu else 32


def finetune_geometry(cfg: FinetuneConfig, backbone_size: int, n_train: int, gpu: bool) -> tuple[int, int]:
    """(train_size, batch_size) as given, else the recipe's: the backbone's size on a GPU, 160 px on the CPU."""
    return (cfg.train_size or (backbone_size if gpu else CPU_TRAIN_SIZE),
            cfg.batch_size or finetune_batch_size(n_train, gpu))


def scratch_schedule(cfg: FinetuneConfig, n_train: int) -> tuple[int, int]:
    """(epochs, batch_size) as given, else chosen from the data size."""
    return cfg.epochs or scratch_epochs(n_train), cfg.batch_size or scratch_batch_size(n_train)


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


@dataclass
class HeadConfig:
    steps: int = 4000  # most optimisation steps; early stopping usually ends sooner
    learning_rate: float = 0.003
    batch_size: int = 100
    hidden_units: int = 0  # 0: a single softmax layer
    dropout: float = 0.2  # before the hidden layer's output layer only
    weight_decay: float = 0.01
    label_smoothing: float = 0.0
    eval_interval: int = 50  # steps between validation checks (and progress lines)
    patience: int = 20  # validation checks without improvement before stopping
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        check("HeadConfig", self, HEAD_RULES)


@dataclass
class TrainConfig:
    backbone: str = DEFAULT_BACKBONE
    head: HeadConfig = field(default_factory=HeadConfig)
    validation_percentage: float = 10.0
    testing_percentage: float = 10.0
    val_dir: str | None = None
    test_dir: str | None = None
    cache_dir: str | None = None  # backbones and (unless bottleneck_dir) features
    bottleneck_dir: str | None = None
    input_mean: float | None = None  # ONNX-file backbones only
    input_std: float | None = None
    output_name: str = OUTPUT_NAME
    unknown_threshold: float | str | None = None  # baked into the model: a probability, "auto" or None (off)
    # auto (the default): the head's model first, then fine-tuning within time_budget where a gain can show;
    # head: cached features only (the instant path); finetune: fine-tune whatever the data
    mode: str = "auto"
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    scratch: FinetuneConfig = field(default_factory=scratch_defaults)  # backbones with random weights
    time_budget: float | None = None  # seconds of fine-tuning in mode auto (None: AUTO_BUDGET_SECONDS), or scratch
    resume: bool = False  # continue an interrupted fine-tuning run
    workers: int = 2  # decode threads
    batch_size: int = 32  # images per backbone call
    engine: str = "local"  # where cached features are extracted: local (this process) or ray (a Ray cluster)
    ray_address: str | None = None  # engine ray: the cluster to attach to (default: start or find a local one)
    quiet: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Every setting checked, those inside head, finetune and scratch too. train() calls it again:
        a setting changed after the config was made must not slip past (a config is a plain dataclass)."""
        check_kinds("TrainConfig", self, TRAIN_KINDS)
        for part in (self.head, self.finetune, self.scratch):
            part.validate()
        if self.mode not in MODES:
            raise UserError(f"unknown mode '{self.mode}': choose head, finetune or auto")
        check_engine(self.engine, self.ray_address)
        check_train(self)  # NaN, inf, negative or absurd numbers: refused before any work


_PATH = (str, os.PathLike, type(None))
TRAIN_KINDS = {"head": (HeadConfig,), "finetune": (FinetuneConfig,), "scratch": (FinetuneConfig,),
               "backbone": (str,), "output_name": (str,), "mode": (str,), "engine": (str,),
               "val_dir": _PATH, "test_dir": _PATH, "cache_dir": _PATH, "bottleneck_dir": _PATH,
               "ray_address": (str, type(None)), "resume": (bool,), "quiet": (bool,)}


DEFAULT_TOLERANCE = 0.5  # accuracy points the int8 model may lose on validation or test
CALIBRATION_IMAGES = 64  # training photos; the issue's 64 moved Lite0's accuracy by under a point


@dataclass
class ExportConfig:
    int8: bool = False
    any_size: bool = False
    ort: bool = False  # also write each .onnx as .ort
    tolerance: float = DEFAULT_TOLERANCE  # accuracy points
    calibration_images: int = CALIBRATION_IMAGES
    image_dir: str | None = None  # default: the folder the model was trained on (its provenance)
    workers: int = 2  # decoding threads
    overwrite: bool = False

    def __post_init__(self) -> None:
        check("ExportConfig", self, EXPORT_RULES)  # a NaN tolerance would let any int8 loss through
        given = [flag for flag, value, default in (("--tolerance", self.tolerance, DEFAULT_TOLERANCE),
                                                   ("--calibration_images", self.calibration_images, CALIBRATION_IMAGES),
                                                   ("--image_dir", self.image_dir, None)) if value != default]
        if given and not self.int8:
            raise UserError(f"{', '.join(given)}: only for --int8 (the photos that calibrate and check the int8 "
                            "model); --any-size and --ort convert the model as it is")
