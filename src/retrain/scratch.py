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
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from .backbones import Backbone
from .config import Checkpoint, FinetuneConfig, scratch_batch_size, scratch_epochs
from .errors import UserError
from .data import DecodedImages
from .finetune import EpochHook, FinetuneResult, Network, fit
from .preprocess import Preprocessing
from .scan import SampleTable


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2))


class ScratchFeatures(nn.Module):
    """Convolution blocks, flattened, then optional fully-connected layers: pixels (N, 3, S, S) -> (N, D)."""

    def __init__(self, size: int, channels: list[int], hidden: list[int], grayscale: bool, dropout: float):
        super().__init__()
        self.grayscale = grayscale
        widths = [1 if grayscale else 3, *channels]
        self.blocks = nn.ModuleList(_conv_block(a, b) for a, b in zip(widths, widths[1:]))
        side = size
        for _ in channels:
            side //= 2
        dims = [channels[-1] * side * side, *hidden]
        self.dense = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.ReLU(inplace=True), nn.Dropout(dropout))
                                   for a, b in zip(dims, dims[1:]))
        self.dropout = nn.Dropout(dropout)  # before the classifier layer, which Network adds
        self.dim = dims[-1]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.mean(dim=1, keepdim=True) if self.grayscale else pixels  # any image works; colour is averaged
        for block in self.blocks:
            x = block(x)
        x = torch.flatten(x, 1)
        for layer in self.dense:
            x = layer(x)
        return self.dropout(x)

    def stages(self) -> list[nn.Module]:
        return [*self.blocks, *self.dense]


# name -> (preprocessing, conv channels, hidden fully-connected units, grayscale, shift in pixels)
ARCHITECTURES = {
    "scratch-small": (Preprocessing(size=28, crop_fraction=1.0), [32, 64, 128], [], True, 2),
    "scratch-color": (Preprocessing(size=64, crop_fraction=0.875), [32, 64, 128, 256, 256], [256], False, 0),
}
DROPOUT = 0.3


def build_features(name: str) -> ScratchFeatures:
    prep, channels, hidden, grayscale, _ = ARCHITECTURES[name]
    return ScratchFeatures(prep.size, channels, hidden, grayscale, DROPOUT)


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
                       quiet: bool = False) -> tuple[FinetuneResult, dict[str, str]]:
    """Train `backbone`'s network and a new classifier layer from random weights.

    Returns the result and {digest: reason} for images that could not be decoded.
    """
    prep, *_, shift = ARCHITECTURES[backbone.name]
    check_options(cfg, backbone)
    data = DecodedImages(splits, prep, shift, cfg.batch_size, cfg.seed, cfg.workers or os.cpu_count() or 1, quiet)
    if not data.n_train:
        raise UserError("none of the training images could be decoded")
    stretch = not cfg.epochs  # epochs left to us: a time budget may lengthen the schedule, not only shorten it
    cfg = replace(cfg, epochs=cfg.epochs or scratch_epochs(data.n_train),
                  batch_size=cfg.batch_size or scratch_batch_size(data.n_train))
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
