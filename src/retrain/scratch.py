"""Networks trained from random weights: the baselines transfer learning is measured against.

scratch-small is the classic 3-convolution + 1 fully-connected network for small grayscale
images (28x28); scratch-color has 5 convolution blocks and 2 fully-connected layers for colour
photos. Both use BatchNorm and train with the one-cycle recipe of config.scratch_defaults on
images decoded once into memory (small networks are fast enough that decoding every epoch
would dominate), augmented by random shifts and horizontal flips. They go through the same
evaluation, calibration and ONNX export as the pretrained backbones.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Callable

import torch
import torch.nn as nn

from .backbones import Backbone
from .config import Checkpoint, FinetuneConfig, scratch_schedule
from .errors import UserError
from .data import DecodedImages
from .finetune import EpochHook, FinetuneResult, Network, fit
from .networks import ARCHITECTURES
from .scan import SampleTable


def check_options(cfg: FinetuneConfig, backbone: Backbone) -> None:
    """Fine-tuning options that mean nothing for a network trained from random weights are errors, not ignored."""
    prep, name = backbone.prep, backbone.name
    if cfg.train_size not in (None, prep.size):
        raise UserError(f"--train_size: {name} trains at its input size ({prep.size} px)")
    if cfg.unfreeze != -1:
        raise UserError(f"--unfreeze: {name} has no pretrained layers to keep frozen; every layer trains")
    if cfg.hold_images is False:
        raise UserError(f"--no-hold_images: {name} always trains on images decoded once into memory")
    if cfg.augment is not None:
        raise UserError(f"retrain.py's distortion flags apply to pretrained backbones; {name} trains on "
                        "random shifts and flips of its own")


def train_from_scratch(splits: dict[str, SampleTable], backbone: Backbone, n_classes: int, cfg: FinetuneConfig,
                       log: Callable[[str], None], *, checkpoint: Checkpoint | None = None, resume: bool = False,
                       time_budget: float | None = None, after_epoch: EpochHook | None = None,
                       stretch_to_budget: bool | None = None, quiet: bool = False
                       ) -> tuple[FinetuneResult, dict[str, str]]:
    """Train `backbone`'s network and a new classifier layer from random weights.

    stretch_to_budget: whether a time budget may lengthen the schedule (default: when cfg.epochs is
    0, i.e. the epochs were left to us). Returns the result and {digest: reason} for images that
    could not be decoded.
    """
    prep, *_, shift = ARCHITECTURES[backbone.name]
    check_options(cfg, backbone)
    data = DecodedImages(splits, prep, shift, cfg.batch_size, cfg.seed, cfg.workers or os.cpu_count() or 1, quiet)
    if not data.n_train:
        raise UserError("none of the training images could be decoded")
    stretch = not cfg.epochs if stretch_to_budget is None else stretch_to_budget
    epochs, batch_size = scratch_schedule(cfg, data.n_train)
    cfg = replace(cfg, epochs=epochs, batch_size=batch_size)
    data.batch_size = cfg.batch_size
    torch.manual_seed(cfg.seed)
    features = backbone.torch_network()
    classifier = nn.Linear(features.dim, n_classes)  # torch's default initialisation, seeded above
    layers = [(classifier.weight.detach().numpy().T.copy(), classifier.bias.detach().numpy().copy())]
    result = fit(Network(features, layers), None, data, backbone, cfg, log, checkpoint=checkpoint, resume=resume,
                 warm_start=False, after_epoch=after_epoch, time_budget=time_budget, stretch_to_budget=stretch,
                 what=f"Training {backbone.name} from random weights",
                 detail=f"{sum(p.numel() for p in features.parameters()):,} parameters", quiet=quiet)
    return result, data.failures
