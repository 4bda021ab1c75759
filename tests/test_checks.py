"""Tests for retrain.checks: the scan-only checks (counts, missing or tiny splits, exact duplicates)."""
from __future__ import annotations

import pytest
from PIL import Image

from retrain.checks import exact_duplicates, quick_summary, split_warnings, why_none_held_out
from retrain.scan import scan_dataset

from conftest import photo_folder, planted_folder


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """test_doctor.py's folders with one of every problem planted, without running the doctor: (root, None)."""
    return planted_folder(tmp_path_factory.mktemp("checks") / "data"), None


def test_classes_without_held_out_photos_are_flagged():
    counts = {"ants": {"train": 20, "validation": 3, "test": 3}, "bees": {"train": 4, "validation": 0, "test": 0}}
    warnings = split_warnings(counts)
    assert any(w.startswith("no validation photos of bees:") for w in warnings)
    assert any(w.startswith("no test photos of bees:") for w in warnings)
    assert sum("too few to measure" in w for w in warnings) == 2
    one = split_warnings({"a": {"train": 20, "validation": 1, "test": 0}})
    assert "the validation split has only 1 photo: too few" in one[0]
    assert split_warnings({"a": {"train": 80, "validation": 10, "test": 10},
                           "b": {"train": 80, "validation": 10, "test": 10}}) == []


def test_quick_summary_uses_the_scan_only(planted, monkeypatch):
    root, _ = planted
    dataset = scan_dataset(root, quiet=True)
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("quick_summary decoded an image"))
    lines = quick_summary(dataset)
    assert len(lines) == 5 and lines[-1].startswith("Run `retrain doctor`")
    assert "test split has only 6 photos" in lines[0]
    assert "two or more classes" in lines[1] and "s01.jpg" in lines[1]
    assert "leakage" in lines[2] and "c00.jpg" in lines[2]
    assert "one class" in lines[3]


def test_quick_summary_few_images_and_imbalance(tmp_path):
    photo_folder(tmp_path / "d", per_class=8, classes=("rare",))
    photo_folder(tmp_path / "d", per_class=40, seed=3, classes=("common",))
    lines = quick_summary(scan_dataset(tmp_path / "d", quiet=True))
    assert lines[0].startswith("Warning: few images (<20) for rare (8)")
    assert any(line.startswith("Warning: heavy imbalance: common has 40 images, rare only 8 (5x)") for line in lines)


def test_quick_summary_clean_dataset_says_nothing(tmp_path):
    assert quick_summary(scan_dataset(photo_folder(tmp_path / "d", per_class=40), quiet=True)) == []


def test_empty_files_are_not_reported_as_duplicates(tmp_path):
    root = photo_folder(tmp_path / "d", per_class=20, classes=("a", "b"))
    (root / "a" / "empty1.jpg").write_bytes(b"")
    (root / "b" / "empty2.jpg").write_bytes(b"")
    assert exact_duplicates(scan_dataset(root, quiet=True)) == []


def test_why_nothing_is_held_out_names_small_classes_or_else_the_recorded_split():
    assert why_none_held_out(["ants"]).startswith("a class needs 5+ photos before any of it is held out, and ants has")
    # Classes grown past the bar since a split was recorded: blaming their size would be false.
    assert why_none_held_out([]).startswith("the split recorded for this folder in the cache (splits/) keeps")


def test_held_out_percentages_that_leave_a_class_almost_nothing_to_learn_from_are_warned_of():
    thin = split_warnings({"ants": {"train": 1, "validation": 6, "test": 23}, "bees": {"train": 20, "validation": 5,
                                                                                         "test": 5}})
    assert any(w.startswith("only ants (1) training photo(s) beside the held-out ones") for w in thin) and "bees" not in " ".join(
        w for w in thin if w.startswith("only"))
    assert not [w for w in split_warnings({"a": {"train": 3, "validation": 1, "test": 1}}) if w.startswith("only")]
