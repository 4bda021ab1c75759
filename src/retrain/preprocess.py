"""The one place that defines how pixels become network input.

Geometry (resize the shorter side, centre-crop a square) runs in Python on decoded images
(`fit_to_square`; `geometry_graph` is its ONNX twin for models that take any size of image);
normalisation ((pixel - mean) / std, NHWC uint8 -> NCHW float) is baked into every exported
ONNX graph by `normalizer_graph`, and `normalize_torch` mirrors it for training in PyTorch.
Training, export and prediction all read these definitions, so they cannot drift apart.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

# Bump when anything here changes what a backbone sees: cached features are keyed by it.
# 3: fit_to_square resizes in two single-axis passes, horizontal first, without reducing_gap.
# 4: a floating-point image whose values all lie in [0, 1] is scaled to 0-255 (it decoded black; decode.py).
PREPROCESS_VERSION = 4

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
    crop is ever resampled: a 2 x 60000 strip costs no more memory than a 2 x 2 image. PIL's
    antialiased bilinear filter, as two single-axis resizes, horizontal first: in one call, PIL
    13 chooses the order of its two passes from the scale factors, and the order changes how
    the intermediate rounds (a grey level in about a sixth of the pixels); fixed, `geometry_graph`
    reproduces every pixel. Only the rows the vertical pass reads are resized horizontally.
    """
    w, h = img.size
    side = min(w, h) * prep.crop_fraction
    left, top = (w - side) / 2, (h - side) / 2
    reach = max(side / prep.size, 1.0) + 1  # the vertical filter's support, and a row to spare
    first, last = max(0, math.floor(top - reach)), min(h, math.ceil(top + side + reach))
    # An integer crop first: PIL holds a box in float32, which cannot hold row numbers past 2^24.
    strip = img.crop((0, first, w, last))
    rows = strip.resize((prep.size, last - first), Image.Resampling.BILINEAR, box=(left, 0, left + side, last - first))
    square = rows.resize((prep.size, prep.size), Image.Resampling.BILINEAR,
                         box=(0, top - first, prep.size, top - first + side))
    return np.asarray(square, dtype=np.uint8)


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

    Pixel for pixel what `fit_to_square` computes with PIL. PIL's antialiased bilinear resize is
    separable, so each axis is a matrix product with PIL's own fixed-point weights: for output pixel
    i, input pixel j gets the triangle filter max(0, 1 - |((j - centre_i) + 0.5) / support|), where
    centre_i = offset + (i + 0.5) * scale, scale = crop side / S (the box as PIL holds it, in
    float32) and support = max(scale, 1); each row is normalised to 1 and rounded to 22-bit
    integers; a pass adds 2^21 to the integer sums and keeps their top bits (a floor after dividing
    by 2^22), clipped to 0-255; the horizontal pass runs first, as in `fit_to_square`. Every step
    is in float64 and in PIL's order of operations: the sums stay below 2^31, so they are exact (a
    float32 version was a grey level off in about 1% of pixels, which an int8 model turned into
    probabilities 0.02 apart). ONNX Resize cannot do this: its crop-and-resize mode maps pixel
    centres differently.
    """
    from onnx import TensorProto, helper, numpy_helper

    s = prep.size
    bits = 22  # PIL's PRECISION_BITS for 8-bit images: 32 - 8 - 2

    def const(name: str, value, dtype=np.float64):
        return numpy_helper.from_array(np.array(value, dtype), f"geo_{name}")

    def node(op: str, inputs: list[str], output: str, **attrs):
        names = [i if i in (IMAGE_NAME, INPUT_NAME) else f"geo_{i}" for i in inputs]
        return helper.make_node(op, names, [output if output == INPUT_NAME else f"geo_{output}"], **attrs)

    def axis_weights(axis: str, index: int, relative: bool) -> list:
        """(S, n) fixed-point weights for the n pixels in reach along one axis, as fit_to_square's PIL
        call sees them; relative: that call gets only the rows in reach, so its box starts there."""
        p = axis + "_"
        return [node("Gather", ["hw", f"i{index}"], p + "len"),  # scalar length L
                node("Gather", ["corner", f"i{index}"], p + "edge0"),  # the crop box's first edge
                # Only pixels within the filter's reach of the box can weigh (fit_to_square's first
                # and last): the rest of a big photo is sliced away before the matrix products.
                node("Sub", [p + "edge0", "reach"], p + "reach0"),
                node("Floor", [p + "reach0"], p + "lo_f"),
                node("Max", [p + "lo_f", "zero"], p + "lo"),
                node("Add", [p + "edge0", "side"], p + "edge1"),
                node("Add", [p + "edge1", "reach"], p + "reach1"),
                node("Ceil", [p + "reach1"], p + "hi_f"),
                node("Min", [p + "hi_f", p + "len"], p + "hi"),
                node("Identity", [p + "lo" if relative else "zero"], p + "origin"),
                node("Sub", [p + "edge0", p + "origin"], p + "e0"),
                node("Add", [p + "e0", "side"], p + "e1"),
                # PIL takes the box as float32 and subtracts its edges in float32
                node("Cast", [p + "e0"], p + "in0_f", to=TensorProto.FLOAT),
                node("Cast", [p + "e1"], p + "in1_f", to=TensorProto.FLOAT),
                node("Sub", [p + "in1_f", p + "in0_f"], p + "box_f"),
                node("Cast", [p + "in0_f"], p + "in0", to=TensorProto.DOUBLE),
                node("Cast", [p + "box_f"], p + "box", to=TensorProto.DOUBLE),
                node("Div", [p + "box", "size"], p + "scale"),  # input pixels per output pixel
                node("Max", [p + "scale", "one"], p + "support"),
                node("Div", ["one", p + "support"], p + "ss"),
                node("Sub", [p + "lo", p + "origin"], p + "j0"),
                node("Sub", [p + "hi", p + "origin"], p + "j1"),
                node("Range", [p + "j0", p + "j1", "one"], p + "j"),  # (n,) input pixel indices
                node("Mul", ["out_centres", p + "scale"], p + "oc"),  # (S, 1)
                node("Add", [p + "in0", p + "oc"], p + "centre"),
                node("Sub", [p + "j", p + "centre"], p + "dist"),  # (S, L)
                node("Add", [p + "dist", "half"], p + "dist_h"),
                node("Mul", [p + "dist_h", p + "ss"], p + "x"),
                node("Abs", [p + "x"], p + "ax"),
                node("Sub", ["one", p + "ax"], p + "tri"),
                node("Relu", [p + "tri"], p + "raw"),
                node("ReduceSum", [p + "raw", "axis1"], p + "sum", keepdims=1),
                node("Div", [p + "raw", p + "sum"], p + "k"),
                node("Mul", [p + "k", "fixed_one"], p + "k_fixed"),
                node("Add", [p + "k_fixed", "half"], p + "k_round"),
                node("Floor", [p + "k_round"], p + "w")]  # weights are >= 0: PIL's (int) cast is a floor

    def to_uint8_levels(sums: str, out: str) -> list:  # PIL: clip8((2^21 + sum) >> 22)
        return [node("Add", [sums, "fixed_half"], out + "_h"), node("Mul", [out + "_h", "fixed_unit"], out + "_s"),
                node("Floor", [out + "_s"], out + "_f"), node("Clip", [out + "_f", "zero", "max255"], out)]

    nodes = [node("Shape", [IMAGE_NAME], "hw_i", end=2),
             node("Cast", ["hw_i"], "hw", to=TensorProto.DOUBLE),  # (2,): H, W
             node("ReduceMin", ["hw"], "short", keepdims=0),
             node("Mul", ["short", "crop_fraction"], "side"),  # the crop's side, input pixels
             node("Sub", ["hw", "side"], "spare"),
             node("Mul", ["spare", "half"], "corner"),  # (2,): top, left
             node("Div", ["side", "size"], "ratio"),
             node("Max", ["ratio", "one"], "support"),
             node("Add", ["support", "one"], "reach"),  # fit_to_square's reach, a pixel to spare
             *axis_weights("y", 0, relative=True), *axis_weights("x", 1, relative=False),
             *[node("Unsqueeze", [f"{a}_{end}", "axis0"], f"{a}_{end}1") for a in "yx" for end in ("lo", "hi")],
             node("Concat", ["y_lo1", "x_lo1"], "starts_f", axis=0),
             node("Concat", ["y_hi1", "x_hi1"], "ends_f", axis=0),
             node("Cast", ["starts_f"], "starts", to=TensorProto.INT64),
             node("Cast", ["ends_f"], "ends", to=TensorProto.INT64),
             node("Slice", [IMAGE_NAME, "starts", "ends", "axes01"], "in_reach"),  # (n_y, n_x, 3)
             node("Cast", ["in_reach"], "image_f", to=TensorProto.DOUBLE),
             node("Transpose", ["image_f"], "chw", perm=[2, 0, 1]),  # (3, n_y, n_x)
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
             const("fixed_one", float(1 << bits)), const("fixed_half", float(1 << (bits - 1))),
             const("fixed_unit", 1.0 / (1 << bits)),
             const("i0", 0, np.int64), const("i1", 1, np.int64), const("axis0", [0], np.int64),
             const("axis1", [1], np.int64), const("axes01", [0, 1], np.int64), const("out_centres", (np.arange(s) + 0.5).reshape(s, 1))]
    graph = helper.make_graph(
        nodes, "geometry",
        [helper.make_tensor_value_info(IMAGE_NAME, TensorProto.UINT8, ["H", "W", 3])],
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [1, s, s, 3])],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
