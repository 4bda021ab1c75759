"""End-to-end behaviour of the Python API: train, save, load, predict, evaluate, caching."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

import retrain
from retrain.head import predict_proba
from retrain.prediction import Classifier

from conftest import draw_shape, make_dataset, quick_config, shared_dataset


def test_train_save_and_predict(shapes, cache_dir, tmp_path):
    model = retrain.train(shapes, quick_config(cache_dir, validation_percentage=20, testing_percentage=20))
    out = model.save(tmp_path / "model")
    assert {"labels.txt", "metrics.json", "model.onnx", "report.html"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_accuracy", "validation_accuracy", "classes", "num_images", "backbone", "seconds"):
        assert key in metrics
    assert metrics["classes"] == ["circles", "squares", "stripes"]
    assert sum(metrics["num_images"].values()) == 48
    assert set(metrics["seconds"]) >= {"scan", "features", "train", "evaluate", "export"}
    assert (out / "labels.txt").read_text().split() == metrics["classes"]

    rng = np.random.default_rng(99)
    for kind in ("circles", "stripes"):
        draw_shape(kind, rng, 120).save(tmp_path / f"new_{kind}.png")
    preds = retrain.predict(out, [tmp_path / "new_circles.png", tmp_path / "new_stripes.png"], top_k=3)
    assert [p.top[0][0] for p in preds] == ["circles", "stripes"]
    for p in preds:
        scores = [s for _, s in p.top]
        assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4


def test_exported_model_matches_features_and_head(head_model, shapes_data, cache_dir):
    """model.onnx (preprocessing + backbone + head) computes what training evaluated."""
    clf = Classifier(head_model.folder / "model.onnx")
    backbone = retrain.backbones.get_backbone("lite0")
    from retrain.decode import load_image
    from retrain.graphs import extractor_path

    paths = sorted((shapes_data / "squares").iterdir())[:4]
    batch = np.stack([load_image(p, backbone.prep) for p in paths])
    feats = ort.InferenceSession(str(extractor_path(backbone, cache_dir))).run(None, {"Placeholder": batch})[0]
    layers = _head_layers(head_model.folder / "model.onnx")
    temperature = float(clf.metadata["retrain:temperature"])
    np.testing.assert_allclose(clf.probabilities(batch), predict_proba(layers, feats, temperature), atol=1e-5)


def _head_layers(onnx_path):
    import onnx
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(onnx_path)).graph.initializer}
    n = sum(1 for k in inits if k.startswith("head_w"))
    return [(inits[f"head_w{i}"], inits[f"head_b{i}"]) for i in range(n)]


def test_same_seed_same_model(head_model, shapes, cache_dir):
    """Another copy of the same photos, trained again, gives the same model bit for bit."""
    a = head_model.model
    b = retrain.train(shapes, quick_config(cache_dir))
    assert a.metrics.head.history == b.metrics.head.history
    assert _inits(a.model) == _inits(b.model)


def _inits(model):
    return [t.SerializeToString() for t in model.graph.initializer if t.name.startswith("head_")]


def test_hidden_layer_head(shapes, cache_dir):
    cfg = quick_config(cache_dir)
    cfg.head.hidden_units = 32
    model = retrain.train(shapes, cfg)
    assert sum(1 for t in model.model.graph.initializer if t.name.startswith("head_w")) == 2
    assert model.metrics.validation_accuracy is not None


def test_bad_files_are_skipped_and_named(shapes, cache_dir):
    (shapes / "squares" / "notes.jpg").write_text("<html>not an image</html>")
    (shapes / "squares" / "empty.png").write_bytes(b"")
    model = retrain.train(shapes, quick_config(cache_dir))
    skipped = {item.path.rsplit("/", 1)[-1]: item.reason for item in model.metrics.skipped_files}
    assert set(skipped) == {"notes.jpg", "empty.png"}
    assert "empty" in skipped["empty.png"]


def test_class_with_only_bad_files_is_an_error(tmp_path, cache_dir):
    root = make_dataset(tmp_path / "d", per_class=6, classes=("a", "b"))
    shutil.rmtree(root / "b")
    (root / "b").mkdir()
    (root / "b" / "x.jpg").write_bytes(b"garbage")
    with pytest.raises(retrain.errors.UserError, match="no usable training images left for class.*b"):
        retrain.train(root, quick_config(cache_dir))


def test_evaluate_reports_metrics(head_model, tmp_path):
    held_out = make_dataset(tmp_path / "held_out", per_class=5, seed=42)
    m = retrain.evaluate(head_model.folder, held_out)
    assert m["num_images"] == 15 and m["accuracy"] >= 0.8
    assert set(m["per_class"]["circles"]) == {"precision", "recall", "f1", "support"}
    assert np.array(m["confusion_matrix"]).sum() == 15


@pytest.mark.slow
def test_hymenoptera_accuracy(real_model, tmp_path):
    """The issue's bar: train on hymenoptera/train, evaluate on val, >= 0.94 with the default backbone."""
    root = shared_dataset("hymenoptera")
    real_model("hymenoptera", "train").save(tmp_path / "hym", report=False)
    metrics = retrain.evaluate(tmp_path / "hym", root / "val")
    assert metrics["num_images"] == 153
    assert metrics["accuracy"] >= 0.94, metrics["accuracy"]


def test_training_identity_ignores_output_and_logging_but_not_training_settings(shapes):
    from dataclasses import replace

    from retrain.config import TrainConfig
    from retrain.pipeline import training_identity
    from retrain.backbones import get_backbone
    from retrain.head import HeadConfig
    from retrain.scan import scan_dataset

    ds, net = scan_dataset(shapes, quiet=True), get_backbone("lite0")
    base = TrainConfig(mode="finetune")
    same = replace(base, quiet=True, resume=True, workers=1, cache_dir="/elsewhere", unknown_threshold="auto",
                   finetune=replace(base.finetune, workers=3, compile=True))
    assert training_identity(same, ds, net) == training_identity(base, ds, net)
    for other in (replace(base, head=HeadConfig(seed=1)), replace(base, finetune=replace(base.finetune, epochs=2)),
                  replace(base, mode="auto")):
        assert training_identity(other, ds, net) != training_identity(base, ds, net)


def test_a_cached_fine_tuning_is_keyed_by_the_device_the_plan_resolved_not_the_flag(shapes):
    from dataclasses import replace

    from retrain.backbones import get_backbone
    from retrain.config import TrainConfig
    from retrain.pipeline import _planned_identity, training_identity
    from retrain.plan import Mode, TrainingPlan
    from retrain.scan import scan_dataset

    ds, net = scan_dataset(shapes, quiet=True), get_backbone("lite0")
    auto, cpu = TrainConfig(), TrainConfig(finetune=replace(TrainConfig().finetune, device="cpu"))
    on_cpu, on_gpu = TrainingPlan(Mode.FINETUNE, "r", device="cpu"), TrainingPlan(Mode.FINETUNE, "r", device="cuda")
    key = lambda config, plan: _planned_identity(training_identity(config, ds, net), plan)  # noqa: E731
    assert key(auto, on_cpu) == key(cpu, on_cpu)  # what ran is the same run, whichever way it was asked for
    assert key(auto, on_cpu) != key(auto, on_gpu)


def test_the_resolved_plan_is_recorded(head_model):
    model = head_model.model
    plan = model.metrics.plan
    assert plan["mode"] == "head" and plan["reason"] == "as asked" and plan["epochs"] is None
    assert model.metrics.provenance["plan"] == plan


def test_the_default_run_says_why_it_does_not_fine_tune(shapes_data, cache_dir):
    import retrain

    model = retrain.train(shapes_data, quick_config(cache_dir, mode="auto"))  # a handful of validation photos
    plan, n_val = model.metrics.plan, model.metrics.num_validation
    assert plan["mode"] == "head" and plan["epochs"] is None and 0 < n_val < 50
    assert plan["reason"].startswith(f"not fine-tuning: {n_val} validation photos are too few to tell a gain from")


def test_a_test_folder_that_overlaps_the_training_photos_is_not_called_unseen(shapes_data, cache_dir):
    said = []
    model = retrain.train(shapes_data, quick_config(cache_dir, test_dir=str(shapes_data)), log=said.append)
    evidence, n_test = model.metrics.test_evidence, model.metrics.test.num_images
    seen = model.metrics.num_images["train"] + model.metrics.num_images["validation"]
    # Every training and validation photo is in the test folder too (the test split is the whole folder).
    assert evidence.copies_of_training == seen > 0 and n_test == seen and not evidence.measurable
    assert model.metrics.verdict[0].startswith(f"{seen} of the {n_test} test photos are copies of photos the model "
                                               "trained on")
    assert not any("never trained on" in line for line in model.metrics.verdict)
    assert any(line.startswith("Warning: ") and "test accuracy is inflated" in line for line in said)


def test_a_test_split_of_the_folder_itself_is_unseen(shapes_data, cache_dir):
    metrics = retrain.train(shapes_data, quick_config(cache_dir, testing_percentage=25)).metrics
    assert metrics.test_evidence.copies_of_training == 0 and metrics.test_evidence.measurable
    assert any("test photos the model never trained on" in line for line in metrics.verdict)
