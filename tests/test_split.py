"""The stratified, stable split (split.py), alone and through scan_dataset."""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrain.scan import scan_dataset
from retrain.split import (MIN_HELD_OUT, TEST, TRAIN, VALIDATION, SplitRecord, assign, held_out_targets,
                           record_path)


def png(rng: np.random.Generator, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def generated_folder(root: Path, spec: dict[str, int], seed: int, start: int = 0) -> Path:
    """root/<class>/<n>.png: `spec` generated images per class, different for every seed."""
    rng = np.random.default_rng(seed)
    for cls, n in spec.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + n):
            (root / cls / f"{i}.png").write_bytes(png(rng))
    return root


def per_class_splits(ds) -> dict[str, Counter]:
    out: dict[str, Counter] = {c: Counter() for c in ds.classes}
    for s in ds.samples:
        out[ds.classes[s.label]][s.split] += 1
    return out


@pytest.mark.parametrize("seed", range(8))
def test_every_class_of_twenty_gets_validation_and_test_photos(tmp_path, seed):
    root = generated_folder(tmp_path / "imgs", {"paper": 20, "rock": 20, "scissors": 20}, seed)
    ds = scan_dataset(root)
    for cls, counts in per_class_splits(ds).items():
        assert counts == {"train": 16, "validation": 2, "test": 2}, (cls, counts)
    assert ds.unsplit_classes == []


@pytest.mark.parametrize("seed", range(6))
def test_adding_photos_never_moves_an_existing_photo(tmp_path, seed):
    root = generated_folder(tmp_path / "imgs", {"a": 20, "b": 20, "c": 20}, seed)
    records = tmp_path / "records"
    before = {s.path: s.split for s in scan_dataset(root, split_records=records).samples}
    rng = np.random.default_rng(1000 + seed)
    for round_ in range(3):  # grow some classes a lot, some a little, and add a class
        spec = {c: int(rng.integers(1, 40)) for c in ("a", "b", "c", f"new{round_}")}
        generated_folder(root, spec, seed=10_000 * (round_ + 1) + seed, start=100 * (round_ + 1))
        ds = scan_dataset(root, split_records=records)
        after = {s.path: s.split for s in ds.samples}
        assert {p: after[p] for p in before} == before
        before = after
        for cls, counts in per_class_splits(ds).items():  # still stratified as the classes grow
            if sum(counts.values()) >= MIN_HELD_OUT:
                assert counts["validation"] >= 1 and counts["test"] >= 1, (cls, counts)


def test_without_a_record_the_rule_gives_the_same_split_anywhere(tmp_path):
    a = generated_folder(tmp_path / "a", {"x": 30, "y": 25}, seed=3)
    b = tmp_path / "b"
    for path in a.rglob("*.png"):  # the same photos under other names in another folder
        (b / path.parent.name).mkdir(parents=True, exist_ok=True)
        (b / path.parent.name / f"renamed-{path.name}").write_bytes(path.read_bytes())
    by_content_a = {s.digest: s.split for s in scan_dataset(a).samples}
    by_content_b = {s.digest: s.split for s in scan_dataset(b).samples}
    assert by_content_a == by_content_b


def test_a_class_too_small_to_hold_out_is_trained_on_and_named(tmp_path):
    root = generated_folder(tmp_path / "imgs", {"big": 30, "tiny": MIN_HELD_OUT - 1}, seed=1)
    ds = scan_dataset(root)
    assert ds.unsplit_classes == ["tiny"]
    assert per_class_splits(ds)["tiny"] == {"train": MIN_HELD_OUT - 1}
    assert per_class_splits(ds)["big"] == {"train": 24, "validation": 3, "test": 3}


def test_percentages_are_met_per_class_on_large_classes(tmp_path):
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 256, (3000, 32), dtype=np.uint8).view("S32").ravel()
    labels = np.repeat(np.arange(3), 1000)
    codes, small = assign(keys, labels, 3, 10, 20, SplitRecord.empty())
    assert small == []
    for c in range(3):
        assert Counter(codes[labels == c].tolist()) == {TRAIN: 700, VALIDATION: 100, TEST: 200}


def test_duplicates_share_a_split_even_across_classes():
    keys = np.array([bytes([i]) * 32 for i in range(40)] * 2, "S32")
    labels = np.r_[np.zeros(40, int), np.ones(40, int)]
    codes, _ = assign(keys, labels, 2, 20, 20, SplitRecord.empty())
    assert np.array_equal(codes[:40], codes[40:])


def test_zero_percentages_hold_nothing_out_and_warn_about_nobody():
    keys = np.array([bytes([i]) * 32 for i in range(10)], "S32")
    codes, small = assign(keys, np.zeros(10, int), 1, 0, 0, SplitRecord.empty())
    assert set(codes.tolist()) == {TRAIN} and small == []


@pytest.mark.parametrize("n,val,test,expected", [
    (4, 10, 10, None), (5, 10, 10, (1, 1)), (20, 10, 10, (2, 2)), (30, 10, 10, (3, 3)),
    (5, 60, 39, (2, 2)), (100, 0, 25, (0, 25)), (6, 45, 45, (2, 3)),
])
def test_held_out_targets(n, val, test, expected):
    got = held_out_targets(n, val, test)
    assert got == expected
    if got:
        assert sum(got) <= n - 1


def test_record_round_trip_lookup_and_merge(tmp_path):
    keys = np.array([b"b" * 32, b"a" * 32], "S32")
    record = SplitRecord.empty().merged(keys, np.array([TEST, VALIDATION], np.int8))
    path = tmp_path / "r.npz"
    record.save(path)
    loaded = SplitRecord.load(path)
    assert loaded.lookup(np.array([b"a" * 32, b"c" * 32, b"b" * 32], "S32")).tolist() == [VALIDATION, -1, TEST]
    again = loaded.merged(np.array([b"a" * 32], "S32"), np.array([TRAIN], np.int8))
    assert again.lookup(np.array([b"a" * 32], "S32")).tolist() == [VALIDATION]  # the old record wins


def test_a_damaged_record_is_ignored_and_rewritten(tmp_path):
    root = generated_folder(tmp_path / "imgs", {"a": 12, "b": 12}, seed=5)
    records = tmp_path / "records"
    expected = {s.path: s.split for s in scan_dataset(root).samples}
    path = record_path(records, root, 10, 10)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a record")
    assert {s.path: s.split for s in scan_dataset(root, split_records=records).samples} == expected
    assert len(SplitRecord.load(path).keys) == 24


def test_a_photo_put_back_returns_to_its_split(tmp_path):
    root = generated_folder(tmp_path / "imgs", {"a": 20, "b": 20}, seed=7)
    records = tmp_path / "records"
    first = {s.path: s.split for s in scan_dataset(root, split_records=records).samples}
    held = next(p for p, split in first.items() if split == "test")
    data = held.read_bytes()
    held.unlink()
    scan_dataset(root, split_records=records)
    held.write_bytes(data)
    assert {s.path: s.split for s in scan_dataset(root, split_records=records).samples}[held] == "test"
