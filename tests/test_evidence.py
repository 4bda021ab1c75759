"""evidence.py: Wilson intervals, and the words a small N gets instead of a figure."""
import pytest

from retrain.evidence import describe_accuracy, wilson_interval


def test_wilson_interval_is_sound_at_the_edges():
    lo, hi = wilson_interval(5, 5)
    assert hi == 1.0 and 0.5 < lo < 0.6  # 5/5 right still leaves room for a 57% classifier
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(900, 1000)
    assert lo == pytest.approx(0.880, abs=0.002) and hi == pytest.approx(0.917, abs=0.002)


def test_a_tiny_split_gets_words_not_a_figure():
    assert describe_accuracy(1.0, 5, "test photos").startswith("not measurable on 5 test photos (5/5 right; 95% CI")
    assert describe_accuracy(0.9, 200) == "90.0% (N=200, 95% CI 85-94%)"
    assert describe_accuracy(None, 0) == "not measured: no photos"


def test_copies_of_training_photos_do_not_count_towards_a_measurable_figure():
    assert describe_accuracy(1.0, 12, "test photos", copies=5) == (
        "not measurable on 12 test photos, 7 of them not trained on (12/12 right; 95% CI 75-100%)")
    assert describe_accuracy(1.0, 12, "test photos", copies=2).startswith("100.0% (N=12")


def test_the_interval_is_rounded_outwards_never_to_a_point():
    assert describe_accuracy(1.0, 800) == "100.0% (N=800, 95% CI 99-100%)"  # its lower end is 99.5%
    assert describe_accuracy(0.0, 800) == "0.0% (N=800, 95% CI 0-1%)"
