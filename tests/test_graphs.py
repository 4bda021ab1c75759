"""Tests for retrain.graphs: the cached feature extractor and the any-size classifier graph."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

import retrain
from retrain.graphs import any_size_model, extractor_path
from retrain.imagenet import imagenet_model_path
from retrain.prediction import load
from retrain.preprocess import IMAGE_NAME

from conftest import decoded, real_photos


def test_truncated_cached_backbone_from_before_digests_is_rebuilt(tiny, tmp_path, capsys):
    backbone = retrain.backbones.get_backbone(str(tiny))
    path = extractor_path(backbone, tmp_path)
    path.with_name(path.name + ".sha256").unlink()
    path.write_bytes(path.read_bytes()[:200])
    assert extractor_path(backbone, tmp_path) == path
    assert "damaged (not a valid ONNX file" in capsys.readouterr().err
    import onnx
    onnx.checker.check_model(str(path))


def test_sound_cached_backbone_from_before_digests_is_kept_and_gets_a_digest(tiny, tmp_path, monkeypatch):
    backbone = retrain.backbones.get_backbone(str(tiny))
    path = extractor_path(backbone, tmp_path)
    digest = path.with_name(path.name + ".sha256")
    recorded = digest.read_text()
    digest.unlink()

    def no_rebuild(*a, **k):
        raise AssertionError("a sound cached backbone must not be rebuilt")
    monkeypatch.setattr(retrain.graphs, "_build_extractor", no_rebuild)
    assert extractor_path(backbone, tmp_path) == path
    assert digest.read_text() == recorded


def test_any_size_model_agrees_with_retrain_predict_on_real_photos(cache_dir):
    """ImageNet's 1000 classes: a sharp test of probabilities."""
    clf = load(imagenet_model_path(cache_dir))
    model = any_size_model(onnx.load(str(clf.path)), clf.prep)
    assert [i.name for i in model.graph.input] == [IMAGE_NAME]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    photos = real_photos()
    agree, worst = 0, 0.0
    for path, pred in zip(photos, clf.probabilities_of(photos)):
        probs = session.run(None, {IMAGE_NAME: decoded(path)})[0][0]
        agree += int(probs.argmax() == pred[1].argmax())
        worst = max(worst, float(np.abs(probs - pred[1]).max()))
    assert agree / len(photos) >= 0.995 and worst <= 0.02, (agree, len(photos), worst)
