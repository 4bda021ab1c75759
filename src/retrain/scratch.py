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
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from .backbones import Backbone
from .config import FinetuneConfig, scratch_batch_size, scratch_epochs
from .errors import UserError
from .features import decoded_batches
from . import distributed
from .finetune import EpochHook, FinetuneResult, Network, fit, shard_batches
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


class DecodedImages:
    """Every split decoded once into uint8 arrays; training batches are random shifts and flips of them.

    Training images are stored a little larger than the input (edge padding for scratch-small, the
    uncropped centre square for scratch-color), so a random crop of the input size shifts the
    content while keeping the scale inference sees.
    """

    def __init__(self, splits: dict[str, SampleTable], prep: Preprocessing, shift: int, batch_size: int,
                 seed: int, workers: int, quiet: bool = False):
        self.prep, self.batch_size, self.seed = prep, batch_size, seed
        self.train_size, self.failures = prep.size, {}
        stored = Preprocessing(size=prep.resize_target(), crop_fraction=1.0, mean=prep.mean, std=prep.std)
        x, self.train_y = self._decode(splits["train"], stored, workers, quiet)
        self.train_x = np.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge")
        self.n_train = len(self.train_x)
        self.eval = {name: self._decode(splits[name], prep, workers, quiet) for name in ("validation", "test")}

    def _decode(self, samples: SampleTable, prep: Preprocessing, workers: int, quiet: bool
                ) -> tuple[np.ndarray, np.ndarray]:
        x = np.zeros((len(samples), prep.size, prep.size, 3), np.uint8)
        keep = np.zeros(len(samples), bool)
        bar = tqdm(total=len(samples), desc="Decoding into memory", unit="img", disable=quiet or not len(samples),
                   leave=False)
        for ok, batch, failed in decoded_batches(samples.paths, prep, 256, workers):
            x[ok], keep[ok] = batch, True
            self.failures |= {samples.digest_hex(i): why for i, why in failed}
            bar.update(len(ok) + len(failed))
        bar.close()
        return x[keep], samples.labels.astype(np.int64)[keep]

    def count(self, split: str) -> int:
        return self.n_train if split == "train" else len(self.eval[split][1])

    def train_batches(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Shuffled batches of random crops (and mirror images); reproducible from (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch, distributed.rank()])
        s, room = self.prep.size, self.train_x.shape[1] - self.prep.size
        for idx in shard_batches(self.n_train, self.batch_size, self.seed, epoch):
            offsets = rng.integers(0, room + 1, (len(idx), 2))
            batch = np.stack([self.train_x[i, a:a + s, b:b + s] for i, (a, b) in zip(idx, offsets)])
            flip = rng.random(len(idx)) < 0.5
            batch[flip] = batch[flip, :, ::-1]
            yield batch, self.train_y[idx]

    def eval_batches(self, split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        x, y = self.eval[split]
        for start in range(0, len(x), 512):
            yield x[start:start + 512], y[start:start + 512]


def check_options(cfg: FinetuneConfig, backbone: Backbone) -> None:
    """Fine-tuning options that mean nothing for a network trained from random weights are errors, not ignored."""
    prep, name = backbone.prep, backbone.name
    if cfg.train_size not in (None, prep.size):
        raise UserError(f"--train_size: {name} trains at its input size ({prep.size} px)")
    if cfg.unfreeze != -1:
        raise UserError(f"--unfreeze: {name} has no pretrained layers to keep frozen; every layer trains")
    if cfg.augment is not None:
        raise UserError(f"retrain.py's distortion flags apply to pretrained backbones; {name} trains on "
                        "random shifts and flips of its own")


def train_from_scratch(splits: dict[str, SampleTable], backbone: Backbone, n_classes: int, cfg: FinetuneConfig,
                       log: Callable[[str], None], *, checkpoint: Path | None = None, resume: bool = False,
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
