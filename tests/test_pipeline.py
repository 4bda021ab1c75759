"""pipeline.py: on a small folder the default run lets the Lite sizes compete by cross-validation."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import onnx.numpy_helper
import pytest

import retrain
from retrain.backbones import get_backbone
from retrain.config import HeadConfig, TrainConfig
from retrain.plan import MIN_VALIDATION

from conftest import real_subset, shared_dataset


@pytest.fixture(scope="module")
def few_ants_and_bees(tmp_path_factory) -> Path:
    """30 photos a class of hymenoptera's training folder: 3 validation photos each, far too few to fine-tune on."""
    return real_subset(shared_dataset("hymenoptera") / "train", tmp_path_factory.mktemp("few") / "hymenoptera", 30,
                       "*.jpg")


def default_config(cache_dir: Path, **kw) -> TrainConfig:
    return TrainConfig(cache_dir=str(cache_dir), quiet=True, head=HeadConfig(steps=400, seed=0), **kw)


def counted(function, calls: list):
    """`function`, appending its arguments to `calls` on each call."""
    def wrapper(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)
    return wrapper


def fold_runs(calls: list) -> list:
    """k of each counted out_of_fold_logits call; 'calibration' where the k was left at its default."""
    return [args[5] if len(args) > 5 else "calibration" for args in calls]


def weights(model) -> dict[str, bytes]:
    return {tensor.name: onnx.numpy_helper.to_array(tensor).tobytes() for tensor in model.graph.initializer}


def test_the_backbone_with_the_most_cross_validated_hits_is_exported(few_ants_and_bees, cache_dir, tmp_path,
                                                                    monkeypatch):
    import retrain.pipeline

    published, folds = [], []
    monkeypatch.setattr(retrain.pipeline, "out_of_fold_logits", counted(retrain.pipeline.out_of_fold_logits, folds))
    model = retrain.train(few_ants_and_bees, default_config(cache_dir), publish=published.append)
    metrics = model.metrics
    # One k-fold run per candidate, and one for the first model's calibration; the final model's
    # calibration reuses the winner's (every training and validation photo held out once).
    assert fold_runs(folds) == ["calibration", 5, 5, 5]
    assert metrics.calibration.held_out_predictions == metrics.num_images["train"] + metrics.num_images["validation"]
    scores = metrics.backbone_comparison
    labelled = metrics.num_images["train"] + metrics.num_images["validation"]
    assert [s.name for s in scores] == ["lite0", "lite1", "lite2"]
    assert all(s.photos == labelled and 0 <= s.correct <= labelled for s in scores)
    best = max(scores, key=lambda s: s.correct)  # max keeps the first of equals: the smaller backbone
    assert metrics.backbone == best.name and f"{best.name} kept" in metrics.plan["reason"]
    # The exported graph is the chosen backbone's: its input has that backbone's size.
    size = get_backbone(best.name).prep.size
    dims = [d.dim_value for d in model.model.graph.input[0].type.tensor_type.shape.dim]
    assert size in dims
    # The first model was published before the other backbones were extracted: lite0's head.
    assert [m.metrics.backbone for m in published] == ["lite0"] and published[0].metrics.backbone_comparison is None
    assert metrics.test_evidence.n == metrics.num_images["test"] > 0
    # The report shows the counts that chose it.
    report = (model.save(tmp_path / "model") / "report.html").read_text(encoding="utf-8")
    for score in scores:
        assert f"<td>{score.name}</td><td>{score.correct}/{score.photos}</td>" in report
    assert f"{best.name} kept" in report


def test_a_backbone_named_by_the_user_is_kept(few_ants_and_bees, cache_dir):
    model = retrain.train(few_ants_and_bees, default_config(cache_dir, backbone="lite0"))
    assert model.metrics.backbone == "lite0" and model.metrics.backbone_comparison is None


def test_a_rerun_reuses_the_comparison_and_exports_the_same_model(few_ants_and_bees, cache_dir, monkeypatch):
    import retrain.pipeline

    runs, trained_heads, folds = [], [], []
    for _ in range(2):
        said, published = [], []
        model = retrain.train(few_ants_and_bees, default_config(cache_dir), log=said.append, publish=published.append)
        runs.append((model, said, published))
        monkeypatch.setattr(retrain.pipeline, "train_head", counted(retrain.pipeline.train_head, trained_heads))
        monkeypatch.setattr(retrain.pipeline, "out_of_fold_logits", counted(retrain.pipeline.out_of_fold_logits, folds))
    (one, said_one, _), (two, said_two, published_two) = runs
    assert any("Reusing the backbone comparison" in line for line in said_two)
    # The rerun trains only the first head (the plan needs its validation accuracy), neither the
    # winner's nor any fold's again, and publishes no early model: its final one follows in seconds.
    assert len(trained_heads) == 1 and folds == [] and published_two == []
    assert two.metrics.calibration == one.metrics.calibration
    assert weights(two.model) == weights(one.model)  # the same backbone and the same head, bit for bit
    assert two.metrics.backbone_comparison == one.metrics.backbone_comparison
    assert two.metrics.backbone == one.metrics.backbone
    assert two.metrics.test_accuracy == one.metrics.test_accuracy


def test_a_comparison_cached_without_its_winners_head_or_features_is_completed(few_ants_and_bees, cache_dir,
                                                                                tmp_path, monkeypatch):
    import retrain.pipeline

    first = retrain.train(few_ants_and_bees, default_config(cache_dir))
    assert first.metrics.backbone != "lite0", "the case under test: the winner's head is not the first head"
    scores = [asdict(score) for score in first.metrics.backbone_comparison]
    stored = next(path for path in (cache_dir / "tuned").glob("*.backbones.json")
                  if json.loads(path.read_text())["scores"] == scores)
    record = json.loads(stored.read_text())
    stored.write_text(json.dumps({k: v for k, v in record.items() if k != "head"}))  # as an older retrain wrote it
    # Features in a store that holds lite0's only: the winner's must be extracted again.
    lite0 = get_backbone("lite0").identity
    shutil.copytree(cache_dir / "features" / lite0, tmp_path / "features" / lite0)
    config = default_config(cache_dir, bottleneck_dir=str(tmp_path / "features"))
    trained_heads, folds = [], []
    monkeypatch.setattr(retrain.pipeline, "train_head", counted(retrain.pipeline.train_head, trained_heads))
    monkeypatch.setattr(retrain.pipeline, "out_of_fold_logits", counted(retrain.pipeline.out_of_fold_logits, folds))
    published = []
    again = retrain.train(few_ants_and_bees, config, publish=published.append)
    # Extracting and training take a while: the first model is published, as on a first run. The
    # winner's folds run again (and the first model's calibration runs its own).
    assert len(trained_heads) == 2 and [m.metrics.backbone for m in published] == ["lite0"]
    assert fold_runs(folds) == ["calibration", 5]
    assert weights(again.model) == weights(first.model) and again.metrics.calibration == first.metrics.calibration
    trained_heads.clear(), published.clear(), folds.clear()
    third = retrain.train(few_ants_and_bees, config, publish=published.append)  # the head was stored this time
    assert len(trained_heads) == 1 and folds == [] and published == [] and weights(third.model) == weights(first.model)


def test_a_comparison_cached_with_its_winners_head_but_not_its_logits_is_completed(few_ants_and_bees, cache_dir,
                                                                                  monkeypatch):
    import retrain.pipeline
    from retrain.tuned import Winner, load_scores, save_scores

    first = retrain.train(few_ants_and_bees, default_config(cache_dir))
    scores = [asdict(score) for score in first.metrics.backbone_comparison]
    stored = next(path for path in (cache_dir / "tuned").glob("*.backbones.json")
                  if json.loads(path.read_text())["scores"] == scores)
    identity = json.loads(stored.read_text())["identity"]
    counts, winner = load_scores(stored, identity)
    save_scores(stored, counts, identity, Winner(winner.backbone, winner.head))  # as the previous retrain wrote it
    trained_heads, folds = [], []
    monkeypatch.setattr(retrain.pipeline, "train_head", counted(retrain.pipeline.train_head, trained_heads))
    monkeypatch.setattr(retrain.pipeline, "out_of_fold_logits", counted(retrain.pipeline.out_of_fold_logits, folds))
    again = retrain.train(few_ants_and_bees, default_config(cache_dir))
    assert len(trained_heads) == 1 and fold_runs(folds) == [5]  # the stored head is used; its folds run
    assert weights(again.model) == weights(first.model) and again.metrics.calibration == first.metrics.calibration
    stored_winner = load_scores(stored, identity)[1]
    assert stored_winner.held_out is not None and len(stored_winner.held_out) == scores[0]["photos"]
    folds.clear()
    retrain.train(few_ants_and_bees, default_config(cache_dir))
    assert folds == []


@pytest.mark.slow
def test_when_fine_tuning_does_not_beat_the_head_the_lite_sizes_compete(few_ants_and_bees, cache_dir):
    from retrain.config import FinetuneConfig

    # 50 validation photos (25 a class), just enough to fine-tune, and a head below 99% on them (94%); a
    # learning rate too small to move the network, so no fine-tuned epoch can beat the head and its model stays.
    # The other tests of this folder have cached its features through all three Lite sizes.
    config = default_config(cache_dir, validation_percentage=84, time_budget=60.0,
                            finetune=FinetuneConfig(epochs=1, learning_rate=1e-7, device="cpu"))
    metrics = retrain.train(few_ants_and_bees, config).metrics
    assert metrics.num_images["validation"] == MIN_VALIDATION
    assert metrics.plan["epochs"] == 1 and metrics.finetune.best_epoch == 0
    scores = metrics.backbone_comparison
    assert [s.name for s in scores] == ["lite0", "lite1", "lite2"]
    assert metrics.backbone == max(scores, key=lambda s: s.correct).name
    assert "no fine-tuned epoch beat the head" in metrics.plan["reason"]


def test_the_closing_lines_carry_their_evidence_and_name_unused_settings():
    from dataclasses import replace

    from retrain.pipeline import result_lines

    from test_metrics import run_metrics

    metrics = run_metrics()  # "auto" threshold on 200 held-out predictions, 100 test photos
    lines = result_lines(metrics)
    assert lines[0].startswith("Final test accuracy = ") and "(N=100" in lines[0]
    assert any(line.startswith("Unknown threshold ") and "in-class test photos as unknown" in line for line in lines)
    calibrated = replace(metrics.calibration, calibrated=True, test_ece_before=0.1, test_ece_after=0.05)
    few = replace(metrics, calibration=calibrated, test=replace(metrics.test, num_images=4))
    line = next(line for line in result_lines(few) if line.startswith("Calibration: "))
    assert line.endswith("; expected calibration error: not measurable on 4 test photos")
    line = next(line for line in result_lines(replace(metrics, calibration=calibrated)) if line.startswith("Calib"))
    assert line.endswith("; expected calibration error on 100 test photos: 10.0% before, 5.0% after temperature "
                         "scaling")
    copied = replace(metrics, test_evidence=replace(metrics.test_evidence, copies_of_training=95))
    assert result_lines(copied)[0].startswith("Final test accuracy = not measurable on 100 test photos, 5 of them not "
                                              "trained on (")
    as_trained = replace(metrics, calibration=replace(metrics.calibration, calibrated=False, test_ece_after=0.07))
    line = next(line for line in result_lines(as_trained) if line.startswith("Calib"))
    assert line.endswith("; expected calibration error on 100 test photos: 7.0% (confidence as trained)")
    unused = replace(metrics, plan={"mode": "head", "unused": ["--epochs (epochs)"], "reason": "too few photos"})
    assert result_lines(unused)[-1] == "Note: not fine-tuning, so --epochs (epochs) go unused (too few photos)"
    assert result_lines(replace(unused, plan={"unused": ["--epochs (epochs)"]}))[-1].endswith("go unused")


def test_split_percentages_a_split_folder_overrides_are_said_to_go_unused(tmp_path):
    from retrain.config import TrainConfig
    from retrain.pipeline import _overridden_percentages
    from retrain.scan import scan_dataset

    for split in ("train", "val"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            (tmp_path / split / c / "1.jpg").write_bytes(f"{split} {c}".encode())  # scanning never decodes
    dataset = scan_dataset(tmp_path, quiet=True)
    notes = _overridden_percentages(dataset, TrainConfig(validation_percentage=30, testing_percentage=20))
    assert notes == [f"Note: --validation_percentage 30 goes unused: the validation photos are those in {tmp_path / 'val'}"]
    assert _overridden_percentages(dataset, TrainConfig()) == []  # the defaults were not asked for


def test_checkpoints_of_other_runs_beyond_the_most_recent_are_removed(tmp_path):
    import os

    from retrain.pipeline import CHECKPOINTS_KEPT, _checkpoint_path

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    others = [folder / f"finetune-{i:016x}.pt" for i in range(CHECKPOINTS_KEPT + 2)]
    for i, path in enumerate(others):
        path.write_bytes(b"x")
        os.utime(path, (1000 + i, 1000 + i))
    (folder / "notes.txt").write_text("a user's file")
    mine = _checkpoint_path(tmp_path, {"dataset_fingerprint": "abc"})
    mine.write_bytes(b"x")
    _checkpoint_path(tmp_path, {"dataset_fingerprint": "abc"})  # this run's own checkpoint is never counted
    assert mine.exists() and (folder / "notes.txt").exists()
    assert sorted(p for p in folder.glob("finetune-*.pt") if p != mine) == others[-CHECKPOINTS_KEPT:]
