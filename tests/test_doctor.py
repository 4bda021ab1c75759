"""`retrain doctor`: counts, duplicates, leakage, near-duplicates, outliers, suspected mislabels.

One generated dataset with planted problems is examined once per module (features are cached
in the session cache); the hostile-file cases run through the doctor in test_intake.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import ImageOps

from retrain import doctor
from retrain.cli import retrain_main
from retrain.checks import ACROSS_CLASSES, ACROSS_SPLITS, WITHIN_CLASS
from retrain.doctor import diagnose, format_text

from conftest import photo, photo_folder, planted_folder, shared_dataset

CLASSES = ("circles", "squares", "stripes")


@pytest.fixture(scope="module")
def planted(tmp_path_factory, cache_dir):
    """train/ + val/ folders with one of every problem planted (conftest.planted_folder); returns (root, report)."""
    root = planted_folder(tmp_path_factory.mktemp("doctor") / "data")
    return root, diagnose(root, cache_dir=cache_dir, quiet=True)


def paths(entries) -> set[str]:
    return {e.path for e in entries}


def test_counts_per_class_and_split(planted):
    _, report = planted
    assert report.classes == list(CLASSES) and report.fixed_split
    assert {c: n["validation"] for c, n in report.counts.items()} == {"circles": 5, "squares": 5, "stripes": 6}
    assert sum(n["train"] + n["test"] for n in report.counts.values()) == 60 + 4  # three exact copies and one smaller copy
    assert {c: n["test"] for c, n in report.counts.items()} == {"circles": 2, "squares": 2, "stripes": 2}
    assert report.warnings == ["the test split has only 6 photos: too few to measure accuracy (a 95% interval "
                               "spans tens of points); aim for 50+ photos per class"]


def test_exact_duplicates_by_kind(planted):
    _, report = planted
    groups = {g.kind: paths(g.images) for g in report.exact_duplicates}
    assert len(report.exact_duplicates) == 3
    assert groups[WITHIN_CLASS] == {"train/circles/c00.jpg", "train/circles/c00 copy.jpg"}
    assert groups[ACROSS_CLASSES] == {"train/squares/s01.jpg", "train/stripes/s01 again.jpg"}
    assert groups[ACROSS_SPLITS] == {"val/circles/c00.jpg", "train/circles/leaked.jpg"}


def test_near_duplicates_resized_and_mirrored_copies(planted):
    _, report = planted
    pairs = {frozenset((p.a.path, p.b.path)): p for p in report.near_duplicates}
    assert set(pairs) == {frozenset({"train/squares/s02.jpg", "train/squares/s02 small.jpg"}),
                          frozenset({"train/stripes/s03.jpg", "val/stripes/s03 mirrored.png"})}
    small = pairs[frozenset({"train/squares/s02.jpg", "train/squares/s02 small.jpg"})]
    # train/ holds the test split too (carved by content hash): the smaller copy may land in the other one.
    assert small.kind == (WITHIN_CLASS if small.a.split == small.b.split else ACROSS_SPLITS)
    assert pairs[frozenset({"train/stripes/s03.jpg", "val/stripes/s03 mirrored.png"})].kind == ACROSS_SPLITS
    assert all(p.distance <= doctor.NEAR_DUPLICATE_BITS for p in report.near_duplicates)


def test_flipped_labels_are_the_top_suspects(planted):
    _, report = planted
    top = {s.image.path: s for s in report.suspects[:3]}
    assert {"train/squares/c05.jpg", "train/circles/s06.jpg"} <= set(top)
    assert top["train/squares/c05.jpg"].preferred == "circles"
    assert top["train/circles/s06.jpg"].preferred == "stripes"
    probs = [s.own_probability for s in report.suspects]
    assert probs == sorted(probs) and all(p < s.preferred_probability for p, s in zip(probs, report.suspects))


def test_text_report_names_every_problem(planted):
    root, report = planted
    text = format_text(report)
    for needle in ("exact, across classes: 1", "exact, across splits: 1", "exact, within class: 1",
                   "train/circles/leaked.jpg", "s02 small.jpg", "train/squares/c05.jpg",
                   "squares -> circles", "80 image files in 3 classes, 0 of them unreadable",
                   "Summary: 1 warning(s), 0 unreadable, 0 tiny and 0 huge image(s), 3 exact and 2 near duplicate(s)"):
        assert needle in text, needle


def test_cli_json_is_complete_and_deterministic(planted, cache_dir, capsys):
    root, report = planted
    runs = []
    for _ in range(2):
        assert retrain_main(["doctor", str(root), "--json", "--quiet", "--cache_dir", str(cache_dir)]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    for run in runs:
        run.pop("seconds")
    assert runs[0] == runs[1]
    expected = report.to_dict()
    expected.pop("seconds")
    assert runs[0] == expected
    assert set(runs[0]) >= {"counts", "unreadable", "formats", "modes", "exact_duplicates", "near_duplicates",
                            "outliers", "suspects"}


def test_folds_keep_identical_content_together_and_are_stratified():
    y = np.repeat([0, 1], 50)
    codes = np.arange(100) // 2  # every content twice
    fold = doctor.assign_folds(y, codes, folds=5, seed=0)
    assert (fold[0::2] == fold[1::2]).all()
    for label in (0, 1):
        assert sorted(np.bincount(fold[y == label], minlength=5)) == [10] * 5
    assert (doctor.assign_folds(y, codes, 5, 0) == fold).all()


def test_class_missing_from_training_folds_is_never_a_suspect():
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(0, 1, (40, 8)), rng.normal(3, 1, (40, 8)), rng.normal(-3, 1, (1, 8))]).astype(np.float32)
    y = np.array([0] * 40 + [1] * 40 + [2])
    probs = doctor.out_of_fold_probabilities(x, y, np.arange(81), 3)
    assert np.isnan(probs[80]).all() and not np.isnan(probs[:80]).any()
    assert 80 not in doctor.rank_suspects(probs, y)


def test_outliers_are_relative_to_the_dataset():
    nearest = np.r_[np.linspace(0.6, 0.7, 50), 0.1, -np.inf]
    relative = doctor.relative_similarity(nearest)
    assert np.flatnonzero(relative <= doctor.OUTLIER_RATIO).tolist() == [50]
    assert np.isnan(relative[-1])  # no other content to compare with: no verdict
    tight = np.r_[np.linspace(0.92, 0.95, 50), 0.8]  # one background: 0.8 is ordinary
    assert not (doctor.relative_similarity(tight) <= doctor.OUTLIER_RATIO).any()
    assert np.isnan(doctor.relative_similarity(np.linspace(0.6, 0.7, 10))).all()  # too few to judge


def test_perceptual_hash_survives_resizing_not_a_different_photo(tmp_path):
    rng = np.random.default_rng(5)
    a, b = photo("circles", rng, 200), photo("circles", rng, 200)
    a.save(tmp_path / "a.png")
    a.resize((70, 70)).save(tmp_path / "a small.jpg", quality=50)
    ImageOps.mirror(a).save(tmp_path / "a mirrored.png")
    b.save(tmp_path / "b.png")
    plain, mirrored, ok = doctor.perceptual_hashes([tmp_path / n for n in ("a.png", "a small.jpg", "a mirrored.png",
                                                                          "b.png", "missing.png")])
    assert ok.tolist() == [True, True, True, True, False]
    pairs = doctor.near_duplicate_pairs(plain, mirrored, ok, np.arange(5))
    assert {(i, j) for i, j, _ in pairs} == {(0, 1), (0, 2), (1, 2)}


def test_nothing_readable_is_reported_not_a_crash(tmp_path, cache_dir):
    for cls, name, data in (("a", "x.jpg", b"<html></html>"), ("b", "y.png", b"")):
        (tmp_path / "d" / cls).mkdir(parents=True)
        (tmp_path / "d" / cls / name).write_bytes(data)
    report = diagnose(tmp_path / "d", cache_dir=cache_dir, quiet=True)
    assert [u.path for u in report.unreadable] == ["a/x.jpg", "b/y.png"]
    assert report.outliers is None and report.suspects is None and report.notes
    text = format_text(report)
    assert "not checked (see the note below)" in text and "found 0" in text


def test_an_empty_class_folder_is_reported_beside_the_other_problems(tmp_path, cache_dir):
    from conftest import make_dataset

    root = make_dataset(tmp_path / "d", per_class=12)
    (root / "wasps").mkdir()
    (root / "circles" / "copy.png").write_bytes(next((root / "squares").iterdir()).read_bytes())
    report = diagnose(root, cache_dir=cache_dir, quiet=True)
    assert report.classes == sorted([*CLASSES, "wasps"])
    assert any(w.startswith("no images in wasps: training refuses an empty class folder") for w in report.warnings)
    assert [g.kind for g in report.exact_duplicates] == [ACROSS_CLASSES]  # the other checks still ran


def test_no_held_out_photos_is_said_and_checks_that_did_not_run_are_not_counted_as_none(tmp_path, cache_dir):
    """3 photos a class: none can be held out, and too few for outliers and mislabels."""
    report = diagnose(photo_folder(tmp_path / "d", per_class=3), cache_dir=cache_dir, quiet=True)
    empty = [w for w in report.warnings if w.startswith("no validation or test photos of any class")]
    assert len(empty) == 1, report.warnings
    assert "needs 5+ photos" in empty[0] and "circles, squares, stripes have fewer" in empty[0]
    assert report.outliers is None and report.suspects is None
    summary = format_text(report).splitlines()[-1]
    assert summary.endswith("outliers not checked, mislabels not checked"), summary
    assert "0 outlier" not in summary and "0 suspected" not in summary


def test_an_empty_test_folder_is_named_rather_than_blamed_on_small_classes():
    counts = {"a": {"train": 27, "validation": 3, "test": 0}, "b": {"train": 4, "validation": 0, "test": 0}}
    assert doctor.empty_split_warnings(counts, ["b"], {"test": "test/"}) == [
        "the test folder test/ holds no readable photo of these classes: test accuracy cannot be measured; "
        "put photos in its class folders"]


def test_a_class_is_too_small_to_judge_when_few_and_outnumbered_not_when_few_alone():
    judged = doctor.too_small_to_judge
    assert judged(np.array([30, 4])).tolist() == [False, True]
    assert judged(np.array([24, 12, 13, 0])).tolist() == [False, True, False, False]  # an empty class: nothing to judge
    assert not judged(np.array([12, 12, 12])).any()  # few but balanced: the fold models favour no class
    assert not judged(np.array([90, 20])).any()  # outnumbered but 20+ photos


def test_mislabels_are_not_looked_for_in_a_class_too_small_to_judge(tmp_path, cache_dir):
    """30 buildings and 4 forest photos, and a 5th forest photo filed under buildings. With 3 or 4 forest photos
    to learn from, the fold models called 3 of the 4 (rightly labelled) forest photos suspects."""
    source, root = shared_dataset("intel_scenes") / "train", tmp_path / "d"
    for cls, names in (("buildings", sorted((source / "buildings").iterdir())[:30]),
                       ("forest", sorted((source / "forest").iterdir())[:4])):
        (root / cls).mkdir(parents=True)
        for photo_path in names:
            shutil.copy(photo_path, root / cls / photo_path.name)
    planted = sorted((source / "forest").iterdir())[4]
    shutil.copy(planted, root / "buildings" / f"planted {planted.name}")
    report = diagnose(root, cache_dir=cache_dir, quiet=True)
    assert [(s.image.path, s.preferred) for s in report.suspects] == [(f"buildings/planted {planted.name}", "forest")]
    assert report.mislabels_unchecked == ["forest"]
    assert any(n.startswith("suspected mislabels are not looked for in forest (4 photos), beside 31 of buildings: "
                            "in a class of under 20 photos that another outnumbers 2x or more") for n in report.notes)
    text = format_text(report)
    assert "not checked in forest: too few photos beside the bigger classes" in text
    assert text.splitlines()[-1].endswith("1 suspected mislabel(s) (forest not checked)")


def test_missing_folder_is_a_one_line_error(tmp_path, capsys):
    assert retrain_main(["doctor", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "image folder not found" in err and "Traceback" not in err


@pytest.mark.slow
def test_hymenoptera_placeholder_gif_is_surfaced(cache_dir):
    report = diagnose(shared_dataset("hymenoptera"), cache_dir=cache_dir, quiet=True)
    placeholder = "train/ants/imageNotFound.gif"
    assert [f.path for f in report.rare_formats] == [placeholder]
    assert report.outliers[0].image.path == placeholder
    assert report.unreadable == [] and report.exact_duplicates == []


@pytest.mark.slow
def test_planted_benchmark_finds_duplicates_leaks_and_flips(cache_dir):
    """benchmarks/doctor_planted.py's bar: every planted duplicate and leak, >= 70% of flips in the top 2x."""
    shared_dataset("hymenoptera")
    import runpy

    bench = runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "doctor_planted.py"))
    result = bench["run"](0, str(cache_dir), False)
    for kind in (WITHIN_CLASS, ACROSS_CLASSES, ACROSS_SPLITS):
        assert result[kind][0] == result[kind][1] > 0, kind
    flipped, found = result["flipped"]
    assert found >= 0.7 * flipped


def test_with_photos_in_one_class_only_mislabels_are_not_checked_not_counted_as_none(tmp_path, cache_dir):
    root = photo_folder(tmp_path / "d", per_class=30)  # enough for outliers: only the mislabels cannot run
    for other in ("squares", "stripes"):
        for f in (root / other).iterdir():
            f.unlink()
    report = diagnose(root, cache_dir=cache_dir, quiet=True)
    assert report.suspects is None and any("mislabels need photos of two classes or more" in n for n in report.notes)
    summary = format_text(report).splitlines()[-1]
    assert summary.endswith("mislabels not checked") and "0 suspected" not in summary


def test_the_header_counts_every_image_file_read_or_not(tmp_path, cache_dir):
    import os

    root = photo_folder(tmp_path / "d", per_class=3)
    os.mkfifo(root / "circles" / "pipe.jpg")  # never read: not in the class counts
    (root / "squares" / "empty.jpg").write_bytes(b"")  # read, hashed, then fails to decode
    report = diagnose(root, cache_dir=cache_dir, quiet=True)
    assert len(report.unreadable) == 2
    assert "11 image files in 3 classes, 2 of them unreadable" in format_text(report)
