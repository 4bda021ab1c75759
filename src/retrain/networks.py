"""Networks trained from random weights: the baselines transfer learning is measured against.

scratch-small is the classic 3-convolution + 1 fully-connected network for small grayscale
images (28x28); scratch-color has 5 convolution blocks and 2 fully-connected layers for colour
photos. Both use BatchNorm. This module holds the networks only; scratch.py trains them.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .preprocess import Preprocessing


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

    def views(self) -> int:
        """Views of each photo a forward pass runs (the Lite wrapper's may be two): one."""
        return 1


# name -> (preprocessing, conv channels, hidden fully-connected units, grayscale, shift in pixels)
ARCHITECTURES = {
    "scratch-small": (Preprocessing(size=28, crop_fraction=1.0), [32, 64, 128], [], True, 2),
    "scratch-color": (Preprocessing(size=64, crop_fraction=0.875), [32, 64, 128, 256, 256], [256], False, 0),
}
DROPOUT = 0.3


def build_features(name: str) -> ScratchFeatures:
    prep, channels, hidden, grayscale, _ = ARCHITECTURES[name]
    return ScratchFeatures(prep.size, channels, hidden, grayscale, DROPOUT)
