"""The one place that defines how pixels become network input.

Geometry (resize the shorter side, centre-crop a square) runs in Python on decoded images
(`fit_to_square`; `geometry_graph` is its ONNX twin for models that take any size of image);
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
IMAGE_NAME = "image"  # the any-size model's input: one decoded (H, W, 3) uint8 RGB image


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


def geometry_graph(prep: Preprocessing, opset: int):
    """ONNX twin of `fit_to_square`: one uint8 (H, W, 3) `image` of any size -> uint8 (1, S, S, 3) `Placeholder`.

    PIL's antialiased bilinear resize is separable, so it is written here as two matrix products
    with PIL's own weights: for output pixel i along an axis, input pixel j gets the triangle
    filter max(0, 1 - |j + 0.5 - centre_i| / support), rows normalised to 1, where
    centre_i = offset + (i + 0.5) * side / S and support = max(side / S, 1). Like PIL, the
    horizontal pass runs first and each pass rounds to uint8. PIL's extra integer pre-shrink
    (reducing_gap) for crops over 6x the output is not reproduced; retrain decodes JPEGs that big
    at a reduced scale anyway. ONNX Resize cannot do this: its crop-and-resize mode maps pixel
    centres differently from PIL's box.
    """
    from onnx import TensorProto, helper, numpy_helper

    s = prep.size

    def const(name: str, value, dtype=np.float32):
        return numpy_helper.from_array(np.array(value, dtype), f"geo_{name}")

    def node(op: str, inputs: list[str], output: str, **attrs):
        names = [i if i in (IMAGE_NAME, INPUT_NAME) else f"geo_{i}" for i in inputs]
        return helper.make_node(op, names, [output if output == INPUT_NAME else f"geo_{output}"], **attrs)

    def axis_weights(axis: str, index: int, offset: str) -> list:  # (S, L) weights along one axis
        p = axis + "_"
        return [node("Gather", ["hw", f"i{index}"], p + "len"),  # scalar length L
                node("Range", ["zero", p + "len", "one"], p + "j"),  # (L,) input pixel indices
                node("Add", [p + "j", "half"], p + "jc"),  # their centres
                node("Mul", ["out_centres", "ratio"], p + "oc"),  # (S, 1)
                node("Add", [p + "oc", offset], p + "centre"),
                node("Sub", [p + "jc", p + "centre"], p + "dist"),  # (S, L)
                node("Div", [p + "dist", "support"], p + "x"),
                node("Abs", [p + "x"], p + "ax"),
                node("Sub", ["one", p + "ax"], p + "tri"),
                node("Relu", [p + "tri"], p + "raw"),
                node("ReduceSum", [p + "raw", "axis1"], p + "sum", keepdims=1),
                node("Div", [p + "raw", p + "sum"], p + "w")]

    def to_uint8_levels(x: str, out: str) -> list:  # PIL rounds half up and clips after each pass
        return [node("Add", [x, "half"], out + "_h"), node("Floor", [out + "_h"], out + "_f"),
                node("Clip", [out + "_f", "zero", "max255"], out)]

    nodes = [node("Shape", [IMAGE_NAME], "hw_i", end=2),
             node("Cast", ["hw_i"], "hw", to=TensorProto.FLOAT),  # (2,): H, W
             node("ReduceMin", ["hw"], "short", keepdims=0),
             node("Mul", ["short", "crop_fraction"], "side"),  # the crop's side, input pixels
             node("Sub", ["hw", "side"], "spare"),
             node("Mul", ["spare", "half"], "corner"),  # (2,): top, left
             node("Gather", ["corner", "i0"], "top"), node("Gather", ["corner", "i1"], "left"),
             node("Div", ["side", "size"], "ratio"),  # input pixels per output pixel
             node("Max", ["ratio", "one"], "support"),
             *axis_weights("y", 0, "top"), *axis_weights("x", 1, "left"),
             node("Cast", [IMAGE_NAME], "image_f", to=TensorProto.FLOAT),
             node("Transpose", ["image_f"], "chw", perm=[2, 0, 1]),  # (3, H, W)
             node("Transpose", ["x_w"], "x_wt", perm=[1, 0]),  # (W, S)
             node("MatMul", ["chw", "x_wt"], "horizontal"),  # (3, H, S)
             *to_uint8_levels("horizontal", "rows"),
             node("MatMul", ["y_w", "rows"], "vertical"),  # (3, S, S)
             *to_uint8_levels("vertical", "square"),
             node("Cast", ["square"], "square_u8", to=TensorProto.UINT8),
             node("Transpose", ["square_u8"], "hwc", perm=[1, 2, 0]),
             node("Unsqueeze", ["hwc", "axis0"], INPUT_NAME)]  # (1, S, S, 3)
    inits = [const("crop_fraction", prep.crop_fraction), const("half", 0.5), const("one", 1.0),
             const("zero", 0.0), const("max255", 255.0), const("size", float(s)),
             const("i0", 0, np.int64), const("i1", 1, np.int64), const("axis0", [0], np.int64),
             const("axis1", [1], np.int64), const("out_centres", (np.arange(s) + 0.5).reshape(s, 1))]
    graph = helper.make_graph(
        nodes, "geometry",
        [helper.make_tensor_value_info(IMAGE_NAME, TensorProto.UINT8, ["H", "W", 3])],
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [1, s, s, 3])],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
