"""The one place that defines how pixels become network input.

Geometry (resize the shorter side, centre-crop a square) runs in Python on decoded images;
normalisation ((pixel - mean) / std, NHWC uint8 -> NCHW float) is baked into every exported
ONNX graph by `normalizer_graph`, and `normalize_torch` mirrors it for training in PyTorch.
Training, export and prediction all read these definitions, so they cannot drift apart.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

# Bump when anything here changes what a backbone sees: cached features are keyed by it.
PREPROCESS_VERSION = 2

INPUT_NAME = "Placeholder"  # retrain.py's input name, so label_image's classic flags still match
FEATURES_NAME = "features"
PIXELS_NAME = "pixels"


@dataclass(frozen=True)
class Preprocessing:
    """How a backbone wants its pixels; recorded in every exported model's metadata."""

    size: int = 224  # square input side, pixels
    crop_fraction: float = 0.875  # centre crop covers this fraction of the shorter side
    mean: float = 127.0  # EfficientNet-Lite weights expect (pixel - 127) / 128
    std: float = 128.0

    def to_dict(self) -> dict:
        return asdict(self) | {"version": PREPROCESS_VERSION, "layout": "NHWC uint8 RGB"}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(size=int(d["size"]), crop_fraction=float(d["crop_fraction"]),
                   mean=float(d["mean"]), std=float(d["std"]))

    def resize_target(self) -> int:
        """Length the shorter side is scaled to before the centre crop."""
        return int(round(self.size / self.crop_fraction))


def fit_to_square(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """Centre square of side crop_fraction * shorter side, resized to (size, size, 3) uint8.

    The same as scaling the shorter side to `resize_target` and centre-cropping, but only the
    crop is ever resampled: a 2 x 60000 strip costs no more memory than a 2 x 2 image.
    """
    w, h = img.size
    side = min(w, h) * prep.crop_fraction
    left, top = (w - side) / 2, (h - side) / 2
    # reducing_gap: a cheap box pre-shrink for big photos, then an antialiased bilinear pass.
    img = img.resize((prep.size, prep.size), Image.Resampling.BILINEAR,
                     box=(left, top, left + side, top + side), reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)


def normalize_torch(batch_nhwc_uint8, prep: Preprocessing):
    """PyTorch twin of `normalizer_graph`: (N, H, W, 3) uint8 -> (N, 3, H, W) float32."""
    return batch_nhwc_uint8.permute(0, 3, 1, 2).float().sub(prep.mean).div(prep.std)


def normalizer_graph(prep: Preprocessing, opset: int):
    """ONNX graph: uint8 NHWC `Placeholder` -> normalised float NCHW `pixels`."""
    from onnx import TensorProto, helper

    s = prep.size
    nodes = [
        helper.make_node("Cast", [INPUT_NAME], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["as_float"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Sub", ["nchw", "pixel_mean"], ["centred"]),
        helper.make_node("Div", ["centred", "pixel_std"], [PIXELS_NAME]),
    ]
    inits = [
        helper.make_tensor("pixel_mean", TensorProto.FLOAT, [], [prep.mean]),
        helper.make_tensor("pixel_std", TensorProto.FLOAT, [], [prep.std]),
    ]
    graph = helper.make_graph(
        nodes, "normalize",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["N", s, s, 3])],
        [helper.make_tensor_value_info(PIXELS_NAME, TensorProto.FLOAT, ["N", 3, s, s])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
