"""Evaluation: the verdict, per-class rows, what small splits that disagree are told."""
import numpy as np
import pytest

from retrain.evaluation import classification_metrics, format_metrics, verdict

from conftest import make_dataset


def scored(y_true, y_pred, classes=("ants", "bees")):
    return classification_metrics(np.array(y_true), np.array(y_pred), list(classes))


def test_verdict_compares_with_chance_and_the_largest_class():
    m = scored([0] * 30 + [1] * 10, [0] * 30 + [1] * 6 + [0] * 4)
    lines = verdict(m, None, 0, ["ants", "bees"], [])
    assert lines[0].startswith("Right on 90.0% (N=40, 95% CI") and "always answering 'ants' 75%" in lines[0]
    assert lines[1] == "Most confused: bees taken for ants (4 photos)."


def test_verdict_names_tiny_splits_and_classes_without_test_photos():
    lines = verdict(scored([0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]), None, 0, ["ants", "bees"], ["wasps"])
    assert lines[0] == ("Only 6 test photos: too few to measure accuracy (5/6 right; 95% CI 43-97%). "
                        "Add photos to every class.")
    assert any(line.startswith("No test photos of bees") for line in lines)
    assert any("all were used for training" in line and "wasps" in line for line in lines)


def test_a_verdict_on_test_photos_mostly_copied_from_training_claims_no_figure():
    m = scored([0] * 6 + [1] * 6, [0] * 6 + [1] * 6)
    lines = verdict(m, None, 0, ["ants", "bees"], [], copies_of_training=5)
    assert lines[0].startswith("5 of the 12 test photos are copies of photos the model trained on")
    assert lines[1].startswith("Only 12 test photos (7 not trained on): too few to measure accuracy (12/12 right")
    assert verdict(m, None, 0, ["ants", "bees"], [], copies_of_training=2)[1].startswith("Right on 100.0% (N=12")
    assert format_metrics(m, copies_of_training=5).startswith("Accuracy = not measurable on 12 photos, 7 of them not "
                                                              "trained on (12/12 right")


def test_a_class_without_support_has_no_recall_not_zero():
    m = classification_metrics(np.array([0, 0, 0]), np.array([0, 0, 1]), ["ants", "bees"])
    assert m.per_class["bees"].recall is None and m.per_class["bees"].f1 is None
    assert "no photos of this class" in format_metrics(m)


def test_a_folder_evaluation_with_predictions_is_json_and_agrees_with_itself(head_model, shapes_data):
    import json

    import retrain

    result = retrain.evaluate(head_model.folder, shapes_data, quiet=True, with_predictions=True)
    rows = json.loads(json.dumps(result))["predictions"]
    assert len(rows) == 48 and {r["label"] for r in rows} == {0, 1, 2}
    for row in rows:
        probs = np.array(row["probabilities"])
        assert probs.shape == (3,) and probs.sum() == pytest.approx(1.0, abs=1e-4)
        assert row["predicted"] == int(probs.argmax()) and row["confidence"] == pytest.approx(float(probs.max()))
    right = sum(r["predicted"] == r["label"] for r in rows)
    assert result["accuracy"] == pytest.approx(right / len(rows))


def test_small_splits_that_disagree_are_told_in_counts_not_percentages():
    from retrain.evaluation import small_splits_disagree

    line = small_splits_disagree(1.0, 6, 5 / 6, 6)
    assert line.startswith("Validation (6/6 right) and test (5/6 right) disagree") and "%" not in line
    assert small_splits_disagree(1.0, 60, 5 / 6, 60) is None  # enough photos: the figures stand on their own
    assert small_splits_disagree(0.9, 6, 0.85, 6) is None  # close enough: nothing to explain


def test_a_class_never_predicted_has_no_precision_not_zero():
    m = scored([0, 0, 1, 1], [0, 0, 0, 0])
    assert m.per_class["bees"].precision is None and m.per_class["bees"].recall == 0.0
    assert m.per_class["ants"].precision == 0.5
    text = format_metrics(m)
    bees = next(line for line in text.splitlines() if line.startswith("bees"))
    assert bees.split()[1] == "-" and "never predicted this class" in text


def test_evaluating_the_folder_the_model_was_trained_from_warns_that_it_is_inflated(head_model, shapes_data,
                                                                                    tmp_path, capsys):
    import json
    import shutil

    from retrain.cli import retrain_main

    assert retrain_main(["evaluate", str(head_model.folder), str(shapes_data)]) == 0
    out, err = capsys.readouterr()
    assert f"Warning: {shapes_data} is the folder this model was trained from" in err and "Accuracy =" in out
    assert retrain_main(["evaluate", str(head_model.folder), str(shapes_data / "circles" / ".."), "--json"]) == 0
    assert "inflated" in json.loads(capsys.readouterr().out)["warning"]
    copy = shutil.copytree(shapes_data, tmp_path / "elsewhere")  # the same photos elsewhere: known by content
    assert retrain_main(["evaluate", str(head_model.folder), str(copy), "--json"]) == 0
    assert "are copies of photos the model trained on" in json.loads(capsys.readouterr().out)["warning"]


def test_a_tiny_other_folder_is_named_in_plain_words():
    lines = verdict(scored([0, 0, 1], [0, 0, 1]), None, 0, ["ants", "bees"], [], photos="photos in testmiss")
    assert lines[0].startswith("Only 3 photos in testmiss: too few to measure accuracy (3/3 right")


def test_a_test_folder_beside_train_is_not_taken_for_training_photos(cache_dir, tmp_path, capsys):
    import json

    import retrain
    from retrain.cli import retrain_main

    from conftest import make_dataset, quick_config

    root = tmp_path / "dataset"
    make_dataset(root / "train", per_class=8)
    make_dataset(root / "test", per_class=4, seed=7)
    model = retrain.train(root, quick_config(cache_dir)).save(tmp_path / "model", report=False)
    capsys.readouterr()
    assert retrain_main(["evaluate", str(model), str(root / "test"), "--json"]) == 0
    assert "warning" not in json.loads(capsys.readouterr().out)
    assert retrain_main(["evaluate", str(model), str(root / "train"), "--json"]) == 0
    assert "was trained from" in json.loads(capsys.readouterr().out)["warning"]


def test_evaluate_names_each_file_it_could_not_read(head_model, tmp_path, capsys):
    from conftest import make_dataset
    from retrain.cli import retrain_main

    folder = make_dataset(tmp_path / "d", per_class=4, seed=3)
    (folder / "squares" / "empty.jpg").write_bytes(b"")
    assert retrain_main(["evaluate", str(head_model.folder), str(folder)]) == 0
    captured = capsys.readouterr()
    assert "Skipped 1 unreadable file(s): squares/empty.jpg (" in captured.err and "N=12" in captured.out


def test_a_file_name_that_is_not_utf8_is_reported_in_valid_json_on_a_strict_stream(head_model, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import make_dataset

    folder = make_dataset(tmp_path / "d", per_class=3, seed=4)
    odd = os.path.join(os.fsencode(folder / "squares"), b"odd\xff.jpg")
    with open(odd, "wb") as f:
        f.write(b"not a photo")
    done = subprocess.run([sys.executable, "-m", "retrain", "evaluate", str(head_model.folder), str(folder), "--json"],
                          capture_output=True, env=os.environ | {"PYTHONIOENCODING": "utf-8"}, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    report = json.loads(done.stdout.decode("utf-8"))  # valid UTF-8 and valid JSON
    assert [f["path"] for f in report["skipped_files"]] == [os.fsdecode(odd)]


def test_a_copy_of_the_training_folder_is_caught_by_content_not_path(head_model, shapes_data, tmp_path):
    import shutil

    from conftest import make_dataset
    from retrain.evaluation import evaluation_of_folder

    shutil.copytree(shapes_data, tmp_path / "copy")
    evaluation = evaluation_of_folder(head_model.folder, tmp_path / "copy", quiet=True)
    seen = head_model.model.metrics.num_images
    trained = seen["train"] + seen["validation"]  # validation chose its training length: seen, as training counts
    assert evaluation.warning == (f"{trained} of the {evaluation.metrics.num_images} test photos are copies of photos "
                                  "the model trained on (the test folder overlaps the training photos): the test "
                                  "accuracy is inflated; `retrain doctor` lists them.")
    fresh = make_dataset(tmp_path / "fresh", per_class=4, seed=11)
    assert evaluation_of_folder(head_model.folder, fresh, quiet=True).warning is None


def test_per_class_figures_on_few_photos_are_counts_in_the_text_table():
    """1-3 photos of a class gave bare 3-decimal figures: the counts instead, and why."""
    from retrain.evaluation import FEW_PHOTOS

    m = scored([0] * 12 + [1] * 3, [0] * 11 + [1] + [1, 1, 0])  # ants: 12 photos; bees: 3, predicted 3 times
    lines = format_metrics(m).splitlines()
    ants = next(line for line in lines if line.startswith("ants"))
    bees = next(line for line in lines if line.startswith("bees"))
    assert ants.split()[1:] == ["0.917", "0.917", "0.917", "12"]  # 11/12 predicted as ants, 11/12 found
    assert bees.split()[1:] == ["2/3", "2/3", "n/a", "3"]
    assert FEW_PHOTOS in lines and "0.667" not in format_metrics(m)


def test_the_text_confusion_matrix_tells_classes_with_a_long_common_prefix_apart():
    m = scored([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], ["sunflowers_short", "sunflowers_tall"])
    lines = format_metrics(m).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Confusion matrix"))
    header, short, tall = lines[start + 1:start + 4]
    assert header.split() == ["0", "1"] and "numbered as the rows" in lines[start]
    assert short.split() == ["0", "sunflowers_short", "1", "1"] and tall.split() == ["1", "sunflowers_tall", "1", "2"]
    assert header.rindex("1") == short.rindex("1") == tall.rindex("2")  # the columns line up


def test_evaluate_json_carries_the_accuracys_evidence(head_model, shapes_data, tmp_path, capsys):
    """A 100% on 2 photos and a measured one read alike in the JSON without N, interval and measurable."""
    import json

    from retrain.cli import retrain_main

    def evidence(folder) -> dict:
        capsys.readouterr()
        assert retrain_main(["evaluate", str(head_model.folder), str(folder), "--json"]) == 0
        return json.loads(capsys.readouterr().out)["evidence"]

    fresh = evidence(make_dataset(tmp_path / "fresh", per_class=4, seed=11))
    assert fresh["n"] == 12 and fresh["measurable"] and fresh["copies_of_training"] == 0
    assert 0 <= fresh["interval"][0] <= fresh["accuracy"] <= fresh["interval"][1] <= 1
    two = evidence(make_dataset(tmp_path / "two", per_class=1, classes=("circles", "squares"), seed=12))
    assert two["n"] == 2 and not two["measurable"] and two["interval"][0] < 0.5
    own = evidence(shapes_data)  # the training folder itself: its copies of training photos are counted too
    trained = head_model.model.metrics.num_images["train"] + head_model.model.metrics.num_images["validation"]
    assert own["n"] == 48 and own["copies_of_training"] == trained and own["measurable"] == (48 - trained >= 10)


def test_a_folder_of_only_unreadable_photos_is_refused_naming_them_and_why(head_model, tmp_path):
    from retrain.errors import UserError
    from retrain.evaluation import evaluation_of_folder

    for name in head_model.model.classes[:2]:
        (tmp_path / "bad" / name).mkdir(parents=True)
        (tmp_path / "bad" / name / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(UserError, match=r"none of the images in .* could be read: Skipped 2 unreadable file\(s\): "
                                        r".*broken\.png \("):
        evaluation_of_folder(head_model.folder, tmp_path / "bad", quiet=True)
