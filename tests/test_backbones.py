"""Every registered backbone, the preprocessing its weights need, and user ONNX backbones."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import retrain
from retrain.api import TrainConfig
from retrain.backbones import available, get_backbone
from retrain.decode import load_image
from retrain.errors import UserError
from retrain.graphs import extractor_path
from retrain.head import HeadConfig
from retrain.imagenet import imagenet_labels, imagenet_model_path
from retrain.prediction import Classifier

from conftest import real_photos, shared_dataset


@pytest.mark.parametrize("name", [n for n in available() if not n.startswith("scratch")])
def test_registered_backbone_extracts_features(name, cache_dir, shapes):
    backbone = get_backbone(name)
    session = ort.InferenceSession(str(extractor_path(backbone, cache_dir)))
    batch = np.stack([load_image(p, backbone.prep) for p in sorted((shapes / "circles").iterdir())[:3]])
    feats = session.run(None, {"Placeholder": batch})[0]
    assert feats.shape == (3, backbone.feature_dim) and np.isfinite(feats).all()
    assert feats.std(axis=0).mean() > 0  # different images give different features


@pytest.mark.slow
def test_lite_features_are_the_average_of_the_photo_and_its_mirror_image(cache_dir):
    from retrain.backbones import lite0

    both, one_view = get_backbone("lite0"), lite0(mirror=False)
    assert both.identity != one_view.identity  # their features are cached apart

    def features(backbone, batch):
        return ort.InferenceSession(str(extractor_path(backbone, cache_dir))).run(None, {"Placeholder": batch})[0]
    photos = np.stack([load_image(p, both.prep) for p in real_photos()[:3]])
    mirrored = np.ascontiguousarray(photos[:, :, ::-1])
    plain, flipped = features(one_view, photos), features(one_view, mirrored)
    assert np.abs(plain - flipped).max() > 0.1  # one view's features tell a photo from its mirror image
    np.testing.assert_allclose(features(both, photos), (plain + flipped) / 2, atol=1e-4)
    np.testing.assert_allclose(features(both, mirrored), features(both, photos), atol=1e-4)


def test_unknown_backbone_and_misplaced_flags():
    with pytest.raises(UserError, match="unknown backbone"):
        get_backbone("inception_v3")
    with pytest.raises(UserError, match="ONNX-file backbones only"):
        get_backbone("lite0", input_mean=128)


def _imagenet_hit_rate(clf: Classifier, root) -> float:
    wanted = {"ants": "ant", "bees": "bee"}
    hits = total = 0
    for folder, label in wanted.items():
        paths = sorted((root / folder).iterdir())
        hits += sum(p.top[0][0] == label for p in clf.predict_paths(paths, top_k=1))
        total += len(paths)
    return hits / total


@pytest.mark.slow
def test_lite0_preprocessing_matches_its_weights(cache_dir, tmp_path):
    """(x - 127) / 128 gives the exact ImageNet class for ~83% of hymenoptera val; mean/std ~68%."""
    val = shared_dataset("hymenoptera") / "val"
    clf = Classifier(imagenet_model_path(cache_dir))
    assert len(clf.labels) == 1000 and clf.labels == imagenet_labels()
    ours = _imagenet_hit_rate(clf, val)
    assert ours >= 0.80, ours

    # The same network fed ImageNet mean/std normalisation must do clearly worse.
    import json

    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(imagenet_model_path(cache_dir)))
    for init in model.graph.initializer:
        if init.name == "pixel_mean":
            init.CopyFrom(numpy_helper.from_array(np.array(0.449 * 255, np.float32), "pixel_mean"))
        if init.name == "pixel_std":
            init.CopyFrom(numpy_helper.from_array(np.array(0.226 * 255, np.float32), "pixel_std"))
    onnx.save(model, str(tmp_path / "meanstd.onnx"))
    wrong = _imagenet_hit_rate(Classifier(tmp_path / "meanstd.onnx"), val)
    assert wrong < ours - 0.05, (wrong, ours)
    assert json.loads(clf.metadata["retrain:preprocessing"])["mean"] == 127.0


def _tiny_onnx_backbone(path, size=64):
    """A small random CNN exported to ONNX: stands in for a user's own model (Inception, ResNet...)."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 32, 3, stride=2), torch.nn.ReLU()).eval()
    torch.onnx.export(net, (torch.zeros(1, 3, size, size),), str(path), input_names=["input"],
                      output_names=["out"], dynamic_axes={"input": {0: "N"}, "out": {0: "N"}},
                      opset_version=17, dynamo=False)
    return path


def test_onnx_file_backbone_trains_and_exports(shapes, cache_dir, tmp_path):
    onnx_path = _tiny_onnx_backbone(tmp_path / "mynet.onnx")
    cfg = TrainConfig(backbone=str(onnx_path), input_mean=128, input_std=64, cache_dir=str(cache_dir),
                      quiet=True, head=HeadConfig(steps=200))
    model = retrain.train(shapes, cfg)
    assert model.metrics.backbone == "onnx:mynet.onnx"
    model.save(tmp_path / "m", report=False)
    clf = Classifier(tmp_path / "m" / "model.onnx")
    assert (clf.prep.size, clf.prep.mean, clf.prep.std) == (64, 128.0, 64.0)
    assert clf.session.get_inputs()[0].shape[1:] == [64, 64, 3]
    preds = list(clf.predict_paths(sorted((shapes / "circles").iterdir())[:2]))
    assert all(len(p.top) == 3 and p.error is None for p in preds)


def test_broken_onnx_backbone_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not onnx")
    with pytest.raises(UserError, match="cannot read ONNX backbone"):
        get_backbone(str(bad))
    with pytest.raises(UserError, match="not found"):
        get_backbone(str(tmp_path / "missing.onnx"))


@pytest.mark.parametrize("spec, scratch", [("scratch-small", True), ("Scratch_Color", True), ("lite0", False),
                                           ("scratch_net.onnx", False), ("scratchy", False)])
def test_from_random_weights_knows_the_registry_without_building(spec, scratch):
    from retrain.backbones import from_random_weights

    assert from_random_weights(spec) is scratch
