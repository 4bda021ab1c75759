"""Temperature scaling, calibration error, and the "none of these" threshold, in the model too."""
from __future__ import annotations

import numpy as np
import pytest

import retrain
from retrain.api import TrainConfig
from retrain.calibrate import (MIN_EVIDENCE, auto_threshold, calibrate, calibration_error_text, fit_temperature, nll,
                               reliability, unknown_threshold_text)
from retrain.cli import label_image_main
from retrain.head import HeadConfig, softmax
from retrain.prediction import Classifier

from conftest import draw_shape, make_dataset


def _sampled(temperature: float, n: int = 4000, classes: int = 5, seed: int = 0):
    """Logits and labels drawn from softmax(z / temperature): the true temperature is known."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (n, classes))
    p = softmax(z, temperature)
    y = np.array([rng.choice(classes, p=row) for row in p])
    return z, y


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_true_one(true_t):
    z, y = _sampled(true_t)
    t = fit_temperature(z, y)
    assert abs(t - true_t) / true_t < 0.1
    assert nll(z, y, t) <= nll(z, y, 1.0) + 1e-9


def test_temperature_scaling_lowers_ece_of_overconfident_logits():
    z, y = _sampled(3.0, seed=1)  # the raw logits are 3x too confident
    cal = calibrate(z[:2000], y[:2000], z[2000:], y[2000:], threshold=None)
    assert cal.report.test_ece_after < cal.report.test_ece_before / 2
    assert cal.unknown_threshold == 0.0 and cal.report.test_false_rejection == 0.0


def test_reliability_of_a_perfect_forecaster_is_near_zero():
    rng = np.random.default_rng(2)
    conf = rng.uniform(0.5, 1.0, 20000)
    y = (rng.uniform(size=conf.size) < conf).astype(int)  # right with probability conf
    probs = np.stack([conf, 1 - conf], axis=1)
    assert reliability(probs, np.zeros_like(y) + (1 - y))["ece"] < 0.02


def test_auto_threshold_rejects_the_requested_fraction():
    probs = softmax(np.random.default_rng(3).normal(0, 2, (1000, 4)))
    t = auto_threshold(probs, 0.05)
    assert abs((probs.max(axis=1) < t).mean() - 0.05) < 0.01


def test_threshold_is_baked_into_the_model_and_honoured(shapes, cache_dir, tmp_path, capsys):
    cfg = TrainConfig(cache_dir=str(cache_dir), quiet=True, head=HeadConfig(steps=200), unknown_threshold=0.999)
    retrain.train(shapes, cfg).save(tmp_path / "m", report=False)
    clf = Classifier(tmp_path / "m" / "model.onnx")
    assert clf.unknown_threshold == pytest.approx(0.999)
    from retrain.decode import load_image

    images = sorted(shapes.glob("*/*.jpg"))
    batch = np.stack([load_image(p, clf.prep) for p in images])
    probs, unknown = clf.session.run(None, {"Placeholder": batch})
    assert unknown.shape == (len(images),)
    np.testing.assert_array_equal(unknown, probs.max(axis=1) < np.float32(0.999))
    least = int(probs.max(axis=1).argmin())  # the least confident photo
    image, top = images[least], float(probs[least].max())
    assert top < 1.0
    [pred] = retrain.predict(tmp_path / "m", [image], min_confidence=min(1.0, top + 1e-4))
    assert pred.unknown
    [pred] = retrain.predict(tmp_path / "m", [image], min_confidence=0.0)
    assert not pred.unknown
    capsys.readouterr()
    assert label_image_main([f"--graph={tmp_path / 'm' / 'model.onnx'}", f"--image={image}",
                             f"--min_confidence={min(1.0, top + 1e-4)}"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == "unknown" and "below the confidence threshold" in err
    assert len(lines) > 1 and all(len(line.split()) == 2 for line in lines[1:])  # then `label score` lines


def test_auto_threshold_flags_a_class_never_seen(tmp_path, cache_dir):
    """Hold one class out of training: its photos should be rejected far more often than in-class ones."""
    # 70 a class: over the 100 held-out predictions `auto` needs. lite0 named: the Lite sizes' competition on a
    # small folder is not under test here.
    root = make_dataset(tmp_path / "d", per_class=70, classes=("circles", "squares"))
    cfg = TrainConfig(cache_dir=str(cache_dir), quiet=True, backbone="lite0", head=HeadConfig(steps=300),
                      unknown_threshold="auto", validation_percentage=30, testing_percentage=20)
    model = retrain.train(root, cfg)
    model.save(tmp_path / "m", report=False)
    cal = model.metrics.calibration
    assert 0 < cal.unknown_threshold == cal.suggested_unknown_threshold and cal.held_out_predictions >= 100
    assert cal.unknown_threshold_why == f"auto: rejects about 5% of {cal.held_out_predictions} held-out in-class predictions"
    rng = np.random.default_rng(5)
    for i in range(20):
        draw_shape("stripes", rng, 120).save(tmp_path / f"stripes_{i}.png")
    preds = retrain.predict(tmp_path / "m", sorted(tmp_path.glob("stripes_*.png")))
    rejected = np.mean([p.unknown for p in preds])
    assert rejected > cal.test_false_rejection + 0.2, (rejected, cal)


def test_too_little_evidence_leaves_confidence_alone_and_says_so():
    z, y = _sampled(3.0, n=40, seed=4)
    cal = calibrate(z, y, z, y, threshold=None)
    assert cal.temperature == 1.0 and not cal.report.calibrated
    assert "40 held-out predictions are too few" in cal.report.why
    assert cal.report.test_ece_after == cal.report.test_ece_before


def test_auto_sets_no_threshold_on_too_few_held_out_predictions_and_says_so():
    # What an auditor met: 10 held-out predictions, all near 1.0, gave a threshold of 0.9995 that
    # flagged 9 of 16 new in-class photos as unknown.
    z, y = _sampled(0.2, n=400, seed=3)
    few = calibrate(z[:40], y[:40], z, y, threshold="auto")
    assert few.unknown_threshold == 0.0 and few.report.test_false_rejection == 0.0
    assert few.report.unknown_threshold_why.startswith("no unknown threshold set: 40 held-out predictions are too few")
    assert unknown_threshold_text(few.report, 400) == few.report.unknown_threshold_why
    enough = calibrate(z, y, z[:40], y[:40], threshold="auto")
    assert enough.unknown_threshold == enough.suggested_threshold > 0
    text = unknown_threshold_text(enough.report, 40)
    flagged = round(enough.report.test_false_rejection * 40)
    assert text.startswith(f"Unknown threshold {enough.unknown_threshold:.3f} (auto: rejects about 5% of 400 held-out")
    assert f"it flags {flagged}/40 in-class test photos as unknown" in text and "95% CI" in text
    assert calibrate(z[:40], y[:40], z, y, threshold=0.5).unknown_threshold == 0.5  # a given value is the user's call
    assert unknown_threshold_text(calibrate(z, y, z, y, threshold=None).report, 400) is None


def test_a_temperature_that_does_not_help_held_out_halves_is_not_kept():
    z, y = _sampled(1.0, n=400, seed=6)  # already calibrated: fitting T can only chase noise
    cal = calibrate(z, y, z, y, threshold=None)
    assert cal.temperature == 1.0 and "did not lower the calibration error" in cal.report.why


def test_the_small_folder_case_that_once_tripled_the_error(head_model):
    """16 photos a class: the held-out evidence (validation + out-of-fold) decides, and is too little for a
    temperature; the few test photos carry no calibration error (once stated as a precise figure on 6)."""
    model = head_model.model
    cal, n_test = model.metrics.calibration, model.metrics.num_images["test"]
    assert cal.held_out_predictions > model.metrics.num_images["validation"]  # out-of-fold rows joined
    assert cal.held_out_predictions < MIN_EVIDENCE and cal.temperature == 1.0 and not cal.calibrated
    assert cal.test_ece_before is cal.test_ece_after is cal.reliability_after is None
    assert calibration_error_text(cal, n_test) == f"expected calibration error: not measurable on {n_test} photos"


def test_a_calibration_error_is_stated_only_on_as_many_photos_as_a_temperature_needs():
    """10-99 test photos gave a precise-looking ECE; a temperature needs MIN_EVIDENCE held-out predictions."""
    z, y = _sampled(3.0, n=600, seed=7)  # overconfident: a temperature is kept
    for n_test in (12, 60, MIN_EVIDENCE - 1):
        report = calibrate(z[:400], y[:400], z[400:400 + n_test], y[400:400 + n_test], threshold=None).report
        assert report.calibrated and report.test_ece_before is None and report.test_ece_after is None
        assert report.test_nll_after is None and report.reliability_after is None
        assert calibration_error_text(report, n_test) == f"expected calibration error: not measurable on {n_test} photos"
    report = calibrate(z[:400], y[:400], z[400:], y[400:], threshold=None).report
    text = calibration_error_text(report, 200, "test photos")
    assert text == (f"expected calibration error on 200 test photos: {100 * report.test_ece_before:.1f}% before, "
                    f"{100 * report.test_ece_after:.1f}% after temperature scaling")


def test_without_a_temperature_the_calibration_error_is_said_once():
    """Not '5.5% before, 5.5% without temperature scaling': one figure, as trained."""
    z, y = _sampled(1.0, n=600, seed=6)
    report = calibrate(z[:400], y[:400], z[400:], y[400:], threshold=None).report
    assert not report.calibrated and report.test_ece_after == report.test_ece_before
    assert calibration_error_text(report, 200) == (f"expected calibration error on 200 photos: "
                                                   f"{100 * report.test_ece_after:.1f}% (confidence as trained)")


def test_figures_without_their_evidence_are_left_out_of_metrics_json():
    """54 held-out predictions and 6 test photos: no suggested threshold, no rejection rate at it, no test ECE."""
    from retrain.metrics import to_json

    z, y = _sampled(1.0, n=400, seed=8)
    few = calibrate(z[:54], y[:54], z[54:60], y[54:60], threshold="auto")
    assert few.suggested_threshold == few.report.suggested_unknown_threshold == 0.0  # what auto picks: none
    saved = to_json(few.report)
    for key in ("test_false_rejection_at_suggested", "test_ece_before", "test_ece_after", "test_nll_before",
                "reliability_after"):
        assert key not in saved, key
    assert saved["test_false_rejection"] == 0.0  # at the chosen threshold (none): a count, shown as one
    enough = calibrate(z[:200], y[:200], z[200:], y[200:], threshold="auto").report
    assert enough.suggested_unknown_threshold > 0 and enough.test_false_rejection_at_suggested is not None
    assert enough.test_ece_after is not None
