"""Building ONNX graphs: the cached feature extractor and the head on top of it."""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, compose, helper, numpy_helper

from .backbones import Backbone
from .config import OUTPUT_NAME
from .errors import UserError
from .files import cached_file
from .preprocess import (FEATURES_NAME, IMAGE_NAME, INPUT_NAME, PIXELS_NAME, Preprocessing, geometry_graph,
                         normalizer_graph)

UNKNOWN_NAME = "unknown"  # (N,) bool: top probability below the model's unknown threshold


def _matching(model: onnx.ModelProto, like: onnx.ModelProto) -> onnx.ModelProto:
    """Give `model` the IR version and opset of `like`, as merge_models requires."""
    model.ir_version = like.ir_version
    del model.opset_import[:]
    model.opset_import.extend(like.opset_import)
    return model


def tidy_opsets(model: onnx.ModelProto) -> onnx.ModelProto:
    """Keep one entry per opset domain: merge_models repeats them, and ONNX Runtime's quantizer
    refuses a model that lists the default domain more than once."""
    unique = {o.domain: o for o in model.opset_import}
    del model.opset_import[:]
    model.opset_import.extend(unique.values())
    return model


def default_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def extractor_path(backbone: Backbone, cache_dir: Path) -> Path:
    """The backbone's feature extractor (uint8 NHWC image -> features) as ONNX, built once, verified on use."""
    path = Path(cache_dir) / "backbones" / f"{backbone.identity}.onnx"
    return cached_file(path, lambda: _build_extractor(backbone, path), onnx_problem)


def _build_extractor(backbone: Backbone, path: Path) -> bytes:
    raw = path.with_suffix(f".network.{os.getpid()}.onnx")
    try:
        backbone.write_network(raw)
        network = onnx.load(str(raw))
    finally:
        raw.unlink(missing_ok=True)
    return extractor_model(network, backbone.prep).SerializeToString()


def onnx_problem(path: Path) -> str | None:
    """None if `path` parses as an ONNX model with a graph, else why not (the check for cached models)."""
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError and friends
        return f"not a valid ONNX file: {type(e).__name__}"
    return None if len(model.graph.node) else "an ONNX file without a graph"


def extractor_model(network: onnx.ModelProto, prep: Preprocessing) -> onnx.ModelProto:
    """Put the normaliser in front of a network (pixels -> features): uint8 image -> features."""
    prefix = _matching(normalizer_graph(prep, default_opset(network)), network)
    merged = compose.merge_models(prefix, network, io_map=[(PIXELS_NAME, PIXELS_NAME)])
    onnx.checker.check_model(merged)
    return merged


def head_graph(layers: list[tuple[np.ndarray, np.ndarray]], *, temperature: float = 1.0,
               unknown_threshold: float = 0.0, output_name: str = OUTPUT_NAME) -> onnx.ModelProto:
    """features (N, D) -> dense layers with ReLU between -> softmax(logits / T) as `output_name`,
    plus `unknown`: whether the top probability falls below `unknown_threshold`."""
    nodes, inits = [], []
    x = FEATURES_NAME
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w.astype(np.float32), f"head_w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"head_b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"head_w{i}"], [f"head_mm{i}"]),
                  helper.make_node("Add", [f"head_mm{i}", f"head_b{i}"], [f"head_z{i}"])]
        x = f"head_z{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"head_h{i}"]))
            x = f"head_h{i}"
    inits.append(numpy_helper.from_array(np.array(temperature, np.float32), "head_temperature"))
    inits += [numpy_helper.from_array(np.array(unknown_threshold, np.float32), "head_unknown_threshold"),
              numpy_helper.from_array(np.array([1], np.int64), "head_one"),
              numpy_helper.from_array(np.array([-1], np.int64), "head_flat")]
    # TopK and Reshape keep their signatures across opsets, unlike ReduceMax and Squeeze.
    nodes += [helper.make_node("Div", [x, "head_temperature"], ["logits"]),
              helper.make_node("Softmax", ["logits"], [output_name], axis=-1),
              helper.make_node("TopK", [output_name, "head_one"], ["head_top", "head_top_index"], axis=-1),
              helper.make_node("Reshape", ["head_top", "head_flat"], ["head_top_flat"]),
              helper.make_node("Less", ["head_top_flat", "head_unknown_threshold"], [UNKNOWN_NAME])]
    d, c = layers[0][0].shape[0], layers[-1][0].shape[1]
    graph = helper.make_graph(
        nodes, "head",
        [helper.make_tensor_value_info(FEATURES_NAME, TensorProto.FLOAT, ["N", d])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["N", c]),
         helper.make_tensor_value_info(UNKNOWN_NAME, TensorProto.BOOL, ["N"])],
        initializer=inits)
    return helper.make_model(graph)


def check_output_name(name: str, *parts: onnx.ModelProto) -> None:
    """Refuse an output name the exported models already use inside (the head's, the preprocessing's,
    the any-size geometry's, and those of `parts`, e.g. the backbone's extractor): merging them would
    fail at the very end of the run. Called before any work, and again once the extractor is known."""
    inside = _own_names().union(*(_names(m) for m in parts)) - {OUTPUT_NAME}
    if not name or name in inside:
        raise UserError(f"--final_tensor_name (output_name) {name!r} is a name the model uses inside: choose another, "
                        f"such as {OUTPUT_NAME}")


@functools.cache
def _own_names() -> frozenset[str]:
    """The names in the graphs retrain builds around a backbone: head (with a hidden layer), preprocessing, geometry."""
    tiny = [(np.zeros((1, 1), np.float32), np.zeros(1, np.float32))] * 2
    prep = Preprocessing()
    return frozenset().union(*(_names(m) for m in (head_graph(tiny), normalizer_graph(prep, 17),
                                                   geometry_graph(prep, 17))))


def _names(model: onnx.ModelProto) -> set[str]:
    graph = model.graph
    return ({n for node in graph.node for n in [*node.input, *node.output]} | {t.name for t in graph.initializer}
            | {v.name for v in [*graph.input, *graph.output]})


def model_metadata(backbone: Backbone, classes: list[str], provenance: dict) -> dict[str, str]:
    """The metadata every exported classifier carries (predict.Classifier reads it back)."""
    size = backbone.prep.size
    return {"retrain:labels": json.dumps(classes, ensure_ascii=False),
            "retrain:preprocessing": json.dumps(backbone.prep.to_dict()),
            "retrain:backbone": backbone.name,
            "retrain:input": f"uint8 RGB, NHWC, {size}x{size}: resize the shorter side, centre-crop "
                             "(see retrain:preprocessing)",
            "retrain:provenance": json.dumps(provenance, ensure_ascii=False)}


def classifier_model(extractor: onnx.ModelProto, layers: list[tuple[np.ndarray, np.ndarray]],
                     metadata: dict[str, str], *, temperature: float = 1.0, unknown_threshold: float = 0.0,
                     output_name: str = OUTPUT_NAME) -> onnx.ModelProto:
    """One self-contained model: uint8 RGB image -> preprocessing -> backbone -> head -> softmax."""
    head = _matching(head_graph(layers, temperature=temperature, unknown_threshold=unknown_threshold,
                                output_name=output_name), extractor)
    model = compose.merge_models(extractor, head, io_map=[(FEATURES_NAME, FEATURES_NAME)])
    assert [i.name for i in model.graph.input] == [INPUT_NAME]
    metadata = metadata | {"retrain:temperature": repr(float(temperature)),
                           "retrain:unknown_threshold": repr(float(unknown_threshold))}
    for key, value in metadata.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    model.producer_name = "retrain"
    tidy_opsets(model)
    onnx.checker.check_model(model)
    return model


def any_size_model(classifier: onnx.ModelProto, prep: Preprocessing) -> onnx.ModelProto:
    """The classifier behind `geometry_graph`: input one decoded uint8 RGB `image` (H, W, 3) of any size,
    outputs and metadata as the classifier's (with a batch of one)."""
    classifier = tidy_opsets(onnx.ModelProto.FromString(classifier.SerializeToString()))
    prefix = _matching(geometry_graph(prep, default_opset(classifier)), classifier)
    model = compose.merge_models(prefix, classifier, io_map=[(INPUT_NAME, INPUT_NAME)])
    del model.metadata_props[:]
    for entry in classifier.metadata_props:
        value = entry.value
        if entry.key == "retrain:input":
            value = (f"uint8 RGB, HWC, any size: one decoded image '{IMAGE_NAME}'; the shorter-side resize and "
                     f"{prep.size}x{prep.size} centre crop happen inside (see retrain:preprocessing)")
        model.metadata_props.append(onnx.StringStringEntryProto(key=entry.key, value=value))
    model.producer_name = classifier.producer_name
    tidy_opsets(model)
    onnx.checker.check_model(model)
    return model
