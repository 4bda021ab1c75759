"""metrics.json's schema: typed sections survive the JSON round trip; other versions and damage get a clear error."""
from __future__ import annotations

import json

import numpy as np
import pytest

from retrain.calibrate import calibrate
from retrain.errors import UserError
from retrain.evaluation import accuracy_evidence, classification_metrics
from retrain.metrics import (SCHEMA_VERSION, FinetuneRecord, HeadRecord, PredictionRecord, RunMetrics, SkippedFile,
                             read_metrics)


def run_metrics(with_test: bool = True) -> RunMetrics:
    """A run's metrics built by the stages that build them in train(), on made-up labels and logits."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    z = np.eye(3)[y] * 3 + rng.normal(0, 1.5, (300, 3))
    cal = calibrate(z[:200], y[:200], z[200:] if with_test else z[:0], y[200:] if with_test else y[:0], "auto")
    test = classification_metrics(y[200:], z[200:].argmax(1), ["a", "b", "c"]) if with_test else None
    return RunMetrics(
        classes=["a", "b", "c"], backbone="lite0", mode="head", plan={"mode": "head", "epochs": 0},
        num_images={"train": 200, "validation": 0, "test": 100}, class_counts={"train": {"a": 70, "b": 60, "c": 70}},
        skipped_files=[SkippedFile("x/broken.jpg", "not an image")], calibration=cal.report,
        validation_accuracy=None, test_accuracy=test.accuracy if test else None, num_validation=0,
        validation_evidence=accuracy_evidence(None, 0),
        test_evidence=accuracy_evidence(test.accuracy if test else None, 100 if test else 0), test=test,
        verdict=["Right on ..."], test_predictions=[PredictionRecord("t/1.jpg", 0, 2, 0.5)] if test else None,
        head=HeadRecord(best_step=40, steps_run=60, history=[{"step": 20, "train_accuracy": 0.5}]),
        finetune=FinetuneRecord(best_epoch=1, history=[{"epoch": 0, "validation_accuracy": 0.25}], device="cpu",
                                train_size=224),
        seconds={"scan": 0.5}, provenance={"created": "2026-11-30T09:00:00+00:00"})


def through_a_file(metrics: RunMetrics) -> dict:
    return json.loads(json.dumps(metrics.to_json()))


@pytest.mark.parametrize("with_test", [True, False])
def test_metrics_survive_the_json_round_trip(with_test):
    metrics = run_metrics(with_test)
    data = through_a_file(metrics)
    assert data["schema_version"] == SCHEMA_VERSION
    assert RunMetrics.from_json(data, "metrics.json") == metrics


def test_sections_that_are_not_there_leave_no_key():
    """The keys stay those readers of older files know: no test photos, no test section and no test_* figures."""
    data = through_a_file(run_metrics(with_test=False))
    assert "test_predictions" not in data and data["test"] is None
    assert not any(key.startswith("test_") for key in data["calibration"])
    assert "unknown_threshold" in data["calibration"]


def test_an_unversioned_or_version_1_file_reads_as_the_current_version():
    data = through_a_file(run_metrics())
    del data["schema_version"]
    assert RunMetrics.from_json(data, "metrics.json") == run_metrics()
    assert RunMetrics.from_json(data | {"schema_version": 1}, "metrics.json") == run_metrics()


def test_a_newer_version_is_refused_with_what_to_do(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(through_a_file(run_metrics()) | {"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(UserError, match=f"schema version {SCHEMA_VERSION + 1}; this retrain reads up to "
                                        f"{SCHEMA_VERSION}: upgrade retrain"):
        read_metrics(path)


def test_keys_it_does_not_know_are_ignored():
    """A field added later (with a default) does not need a new version: older readers skip it."""
    data = through_a_file(run_metrics())
    data["finetune"]["time_budget_seconds"] = 60
    assert RunMetrics.from_json(data, "metrics.json") == run_metrics()


@pytest.mark.parametrize("damage, message", [
    (lambda d: d.pop("classes"), "'classes' is missing"),
    (lambda d: d["calibration"].pop("why"), "'calibration.why' is missing"),
    (lambda d: d.update(test_accuracy="high"), "test_accuracy should be float"),
    (lambda d: d["head"].update(best_step=2.5), "head.best_step should be int"),
    (lambda d: d.update(skipped_files={}), "skipped_files should be a JSON array"),
    (lambda d: d["test"]["per_class"].update(a=[1]), r"test.per_class.a should be a JSON object"),
    (lambda d: d.update(schema_version="1"), "schema_version should be a whole number"),
])
def test_a_damaged_file_names_what_is_wrong(damage, message, tmp_path):
    data = through_a_file(run_metrics())
    damage(data)
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message):
        read_metrics(path)


@pytest.mark.parametrize("text, message", [("{not json", "is not valid JSON"), ("[1, 2]", "should hold a JSON object")])
def test_a_file_that_is_not_metrics_is_refused(text, message, tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        read_metrics(path)
    with pytest.raises(UserError, match="cannot read"):
        read_metrics(tmp_path / "missing.json")
