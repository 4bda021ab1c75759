"""Scanning a folder of class folders: labels, hashing, skipped files and the train/val/test split."""
from __future__ import annotations

import errno
import hashlib
import os
import signal
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import retrain.scan as scan_mod
from retrain.errors import UserError
from retrain.scan import (Dataset, SPLITS, SampleTable, class_folders, file_digest, find_split_dirs,
                          is_hidden, is_image_name, list_images, scan_dataset, scan_labelled_folder)

# Scanning never decodes images, so any distinct bytes behind an image extension will do.
_counter = iter(range(10**9))


def put(path: Path, content: bytes | None = None) -> Path:
    """Create `path` (and its folders) holding `content`, by default unique bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if content is not None else f"image #{next(_counter)} {path.name}".encode())
    return path


def make_dataset(root: Path, spec: dict[str, int], ext: str = ".jpg") -> Path:
    """root/<class>/img<i><ext> for each class with its count of distinct files."""
    for cls, n in spec.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            put(root / cls / f"img{i}{ext}")
    return root


def splits_by_path(ds: Dataset) -> dict[Path, str]:
    return {s.path: s.split for s in ds.samples}


def labels_by_name(ds: Dataset) -> dict[str, str]:
    return {s.path.name: ds.classes[s.label] for s in ds.samples}


@pytest.fixture
def alarm():
    """Fail (instead of hanging forever) if the test body takes longer than `seconds`."""
    def handler(signum, frame):
        raise TimeoutError("scan did not finish in time")
    old = signal.signal(signal.SIGALRM, handler)

    def arm(seconds: int) -> None:
        signal.alarm(seconds)
    yield arm
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------- helpers

def test_is_hidden_and_is_image_name():
    for name in (".DS_Store", ".hidden", "Thumbs.db", "THUMBS.DB", "desktop.ini", "__MACOSX", "._photo.jpg"):
        assert is_hidden(name), name
    assert not is_hidden("photo.jpg")
    for name in ("a.jpg", "b.JPEG", "c.Png", "d.webp", "e.gif", "f.bmp", "g.tiff", "h.jfif"):
        assert is_image_name(name), name
    for name in ("notes.txt", "movie.mp4", "raw.cr2", "noext", ".hidden.jpg", "._a.png", "jpg"):
        assert not is_image_name(name), name


def test_file_digest_is_sha256_of_content(tmp_path):
    data = os.urandom(3 << 20)  # more than one 1 MiB read chunk
    path = put(tmp_path / "a.bin", data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()


def test_list_images_recurses_skips_hidden_counts_others(tmp_path):
    d = tmp_path / "cls"
    put(d / "b.jpg")
    put(d / "a.png")
    put(d / "deep" / "er" / "c.webp")
    put(d / "notes.txt")
    put(d / "clip.mp4")
    put(d / ".DS_Store")
    put(d / "Thumbs.db")
    put(d / ".hidden" / "secret.jpg")
    put(d / "__MACOSX" / "x.jpg")
    found, ignored = list_images(d)
    assert sorted(p.relative_to(d).as_posix() for p in found) == ["a.png", "b.jpg", "deep/er/c.webp"]
    assert ignored == 2


# ---------------------------------------------------------------- scan_dataset: layout

def test_classes_sorted_and_labels_follow_folders(tmp_path):
    root = make_dataset(tmp_path / "imgs", {"zebra": 3, "apple": 2, "mango": 4})
    ds = scan_dataset(root)
    assert ds.classes == ["apple", "mango", "zebra"]
    assert len(ds.samples) == 9
    per_class = Counter(ds.classes[s.label] for s in ds.samples)
    assert per_class == {"apple": 2, "mango": 4, "zebra": 3}
    for s in ds.samples:
        assert s.path.parent.name == ds.classes[s.label]
        assert s.digest == file_digest(s.path)
        assert s.split in SPLITS
    assert ds.skipped == [] and ds.ignored == 0 and ds.fixed_split is False


def test_class_folders_sorted_skips_hidden_and_files(tmp_path):
    for name in ("b", "a", ".git", "__MACOSX", "C"):
        (tmp_path / name).mkdir()
    put(tmp_path / "README.txt")
    assert [p.name for p in class_folders(tmp_path)] == ["C", "a", "b"]


def test_hidden_files_and_folders_are_skipped(tmp_path):
    root = make_dataset(tmp_path / "imgs", {"cat": 2, "dog": 2})
    put(root / "cat" / ".DS_Store")
    put(root / "cat" / "Thumbs.db")
    put(root / "cat" / ".hidden" / "x.jpg")
    put(root / "cat" / "._img0.jpg")  # macOS resource fork next to a real image
    put(root / ".hidden" / "y.jpg")
    put(root / ".DS_Store")
    put(root / "__MACOSX" / "cat" / "z.jpg")
    ds = scan_dataset(root)
    assert ds.classes == ["cat", "dog"]
    assert sorted(s.path.relative_to(root).as_posix() for s in ds.samples) == [
        "cat/img0.jpg", "cat/img1.jpg", "dog/img0.jpg", "dog/img1.jpg"]
    assert ds.ignored == 0


def test_non_image_files_are_counted_as_ignored(tmp_path):
    root = make_dataset(tmp_path / "imgs", {"cat": 2, "dog": 2})
    put(root / "cat" / "notes.txt")
    put(root / "dog" / "video.mp4")
    put(root / "dog" / "sub" / "raw.cr2")
    ds = scan_dataset(root)
    assert ds.ignored == 3
    assert len(ds.samples) == 4


def test_nested_folders_belong_to_their_class(tmp_path):
    root = make_dataset(tmp_path / "imgs", {"cat": 1, "dog": 1})
    put(root / "cat" / "2019" / "summer" / "a.jpg")
    put(root / "cat" / "2020" / "b.PNG")
    ds = scan_dataset(root)
    assert ds.classes == ["cat", "dog"]
    assert labels_by_name(ds)["a.jpg"] == "cat" and labels_by_name(ds)["b.PNG"] == "cat"
    assert Counter(ds.classes[s.label] for s in ds.samples) == {"cat": 3, "dog": 1}


def test_non_ascii_and_spaces_in_names(tmp_path):
    root = tmp_path / "my images ü"
    put(root / "고양이" / "사진 1.jpg")
    put(root / "고양이" / "폴더 안" / "사진 2.png")
    put(root / "big dog" / "photo (1).jpeg")
    put(root / "big dog" / "café.webp")
    put(root / "Ärger" / "x.gif")
    ds = scan_dataset(root)
    assert ds.classes == sorted(["고양이", "big dog", "Ärger"])
    assert Counter(ds.classes[s.label] for s in ds.samples) == {"고양이": 2, "big dog": 2, "Ärger": 1}
    names = {s.path.name for s in ds.samples}
    assert {"사진 1.jpg", "사진 2.png", "photo (1).jpeg", "café.webp", "x.gif"} == names


def test_upper_case_extensions(tmp_path):
    root = tmp_path / "imgs"
    put(root / "a" / "X.JPG")
    put(root / "b" / "Y.Jpeg")
    assert len(scan_dataset(root).samples) == 2


# ---------------------------------------------------------------- scan_dataset: user errors

def test_fewer_than_two_classes(tmp_path):
    root = make_dataset(tmp_path / "imgs", {"only": 3})
    with pytest.raises(UserError, match="at least 2 class folders"):
        scan_dataset(root)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="found 0"):
        scan_dataset(empty)


def test_images_directly_in_image_dir_are_not_a_class(tmp_path):
    root = tmp_path / "flat"
    for i in range(5):
        put(root / f"{i}.jpg")
    with pytest.raises(UserError, match="at least 2 class folders"):
        scan_dataset(root)


def test_empty_class_folder_is_named(tmp_path):
    root = make_dataset(tmp_path / "imgs", {"cat": 2, "dog": 2})
    (root / "empty bird").mkdir()
    put(root / "only text" / "readme.txt")
    with pytest.raises(UserError, match="no images") as info:
        scan_dataset(root)
    assert "empty bird" in str(info.value) and "only text" in str(info.value)
    assert "cat" not in str(info.value).split("(supported")[0].split(":", 1)[1]


def test_missing_image_dir(tmp_path):
    with pytest.raises(UserError, match="not found"):
        scan_dataset(tmp_path / "does not exist")


def test_file_given_as_image_dir(tmp_path):
    f = put(tmp_path / "photo.jpg")
    with pytest.raises(UserError, match="not a folder"):
        scan_dataset(f)


@pytest.mark.parametrize("val, test", [(50, 50), (100, 0), (-1, 10), (10, 100), (60, 45)])
def test_bad_percentages(tmp_path, val, test):
    root = make_dataset(tmp_path / "imgs", {"a": 1, "b": 1})
    with pytest.raises(UserError, match="percentage"):
        scan_dataset(root, validation_percentage=val, testing_percentage=test)


# ---------------------------------------------------------------- split folders

def test_train_val_test_folders_are_fixed_splits(tmp_path):
    root = tmp_path / "imgs"
    make_dataset(root / "train", {"cat": 5, "dog": 5})
    make_dataset(root / "val", {"cat": 2, "dog": 1})
    make_dataset(root / "test", {"dog": 3})  # a split may lack a class
    assert set(find_split_dirs(root)) == {"train", "validation", "test"}
    ds = scan_dataset(root, validation_percentage=30, testing_percentage=30)
    assert ds.fixed_split is True and list(ds.split_folders) == ["validation", "test"]
    assert ds.classes == ["cat", "dog"]  # not ["test", "train", "val"]
    assert ds.counts() == {"train": 10, "validation": 3, "test": 3}
    for s in ds.samples:
        folder = s.path.relative_to(root).parts[0]
        assert s.split == {"train": "train", "val": "validation", "test": "test"}[folder]
        assert ds.classes[s.label] == s.path.parent.name


def test_training_testing_folders_carve_validation_from_train(tmp_path):
    root = tmp_path / "imgs"
    make_dataset(root / "Training", {"cat": 40, "dog": 40})
    make_dataset(root / "testing", {"cat": 3, "dog": 3})
    ds = scan_dataset(root, validation_percentage=25, testing_percentage=25)
    assert ds.fixed_split is True and list(ds.split_folders) == ["test"]  # validation is carved, and said so
    assert ds.counts()["test"] == 6
    for s in ds.samples:
        if s.path.is_relative_to(root / "testing"):
            assert s.split == "test"
        else:  # training images: no test carved out (there is a test folder), only validation
            assert s.split in ("train", "validation")
    assert ds.counts()["validation"] == 20 and ds.counts()["train"] == 60  # 25% of each class


def test_val_class_not_in_train_is_an_error(tmp_path):
    root = tmp_path / "imgs"
    make_dataset(root / "train", {"cat": 2, "dog": 2})
    make_dataset(root / "val", {"cat": 1, "horse": 1})
    with pytest.raises(UserError, match="horse"):
        scan_dataset(root)


def test_split_folders_mixed_with_class_folders_is_an_error(tmp_path):
    root = tmp_path / "imgs"
    make_dataset(root / "train", {"cat": 2, "dog": 2})
    make_dataset(root / "val", {"cat": 1, "dog": 1})
    make_dataset(root / "horse", {"a": 1})
    with pytest.raises(UserError, match="mixes split folders.*horse"):
        scan_dataset(root)


def test_single_train_folder_is_not_a_split_layout(tmp_path):
    root = tmp_path / "imgs"
    make_dataset(root / "train", {"cat": 2, "dog": 2})
    assert find_split_dirs(root) == {}


def test_explicit_val_and_test_dirs(tmp_path):
    train = make_dataset(tmp_path / "train", {"cat": 4, "dog": 4})
    val = make_dataset(tmp_path / "v", {"cat": 1})
    test = make_dataset(tmp_path / "t", {"dog": 2})
    ds = scan_dataset(train, val_dir=val, test_dir=test)
    assert ds.fixed_split
    assert ds.counts() == {"train": 8, "validation": 1, "test": 2}


def test_scan_labelled_folder(tmp_path):
    folder = make_dataset(tmp_path / "eval", {"dog": 2})
    ds = scan_labelled_folder(folder, ["cat", "dog"])
    assert ds.classes == ["cat", "dog"]
    assert {s.label for s in ds.samples} == {1} and {s.split for s in ds.samples} == {"test"}
    with pytest.raises(UserError, match="horse"):
        scan_labelled_folder(make_dataset(tmp_path / "eval2", {"horse": 1}), ["cat", "dog"])


# ---------------------------------------------------------------- split (more in test_split.py)

def test_split_independent_of_name_and_location(tmp_path):
    content = b"the very same bytes"
    root = tmp_path / "imgs"
    paths = [put(root / "cat" / "a.jpg", content), put(root / "cat" / "sub" / "zz.png", content),
             put(root / "dog" / "b.jpg", content), put(root / "dog" / "other.jpg")]
    for pct in ((10, 10), (33, 33), (0, 50), (50, 0)):
        ds = scan_dataset(root, validation_percentage=pct[0], testing_percentage=pct[1])
        dup_splits = {s.split for s in ds.samples if s.path in paths[:3]}
        assert len(dup_splits) == 1, (pct, dup_splits)
        assert len({s.digest for s in ds.samples if s.path in paths[:3]}) == 1


def test_exact_duplicates_share_a_split_over_many_files(tmp_path):
    root = tmp_path / "imgs"
    for i in range(60):
        data = f"photo {i}".encode()
        put(root / "a" / f"{i}.jpg", data)
        put(root / "b" / f"copy of {i}.jpg", data)
    ds = scan_dataset(root, validation_percentage=30, testing_percentage=30)
    by_digest: dict[str, set[str]] = {}
    for s in ds.samples:
        by_digest.setdefault(s.digest, set()).add(s.split)
    assert len(by_digest) == 60
    assert all(len(v) == 1 for v in by_digest.values())
    assert len({next(iter(v)) for v in by_digest.values()}) == 3  # and all three splits occur


# ---------------------------------------------------------------- hostile file systems

def test_symlink_loop_does_not_hang(tmp_path, alarm):
    root = make_dataset(tmp_path / "imgs", {"cat": 2, "dog": 2})
    os.symlink(root / "cat", root / "cat" / "loop")  # cat/loop -> cat
    os.symlink(root, root / "dog" / "up")  # dog/up -> the image folder itself
    alarm(20)
    start = time.monotonic()
    ds = scan_dataset(root)
    assert time.monotonic() - start < 10
    assert Counter(ds.classes[s.label] for s in ds.samples) == {"cat": 2, "dog": 2}


def test_symlinked_class_folder_and_file_are_used(tmp_path):
    elsewhere = make_dataset(tmp_path / "elsewhere", {"cat": 2})
    root = make_dataset(tmp_path / "imgs", {"dog": 2})
    os.symlink(elsewhere / "cat", root / "cat")
    os.symlink(elsewhere / "cat" / "img0.jpg", root / "dog" / "linked.jpg")
    ds = scan_dataset(root)
    assert Counter(ds.classes[s.label] for s in ds.samples) == {"cat": 2, "dog": 3}


def test_dangling_symlink_is_skipped_with_reason(tmp_path):
    root = make_dataset(tmp_path / "imgs", {"cat": 2, "dog": 2})
    os.symlink(tmp_path / "gone.jpg", root / "cat" / "dangling.jpg")
    ds = scan_dataset(root)
    assert len(ds.samples) == 4
    assert [(p.name, why) for p, why in ds.skipped] == [("dangling.jpg", "cannot read: No such file or directory")]


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod 000 does not stop root from reading")
def test_unreadable_file_is_skipped(tmp_path):
    root = make_dataset(tmp_path / "imgs", {"cat": 2, "dog": 2})
    locked = put(root / "cat" / "locked.jpg")
    locked.chmod(0)
    try:
        ds = scan_dataset(root)
    finally:
        locked.chmod(0o644)
    assert len(ds.samples) == 4
    assert ds.skipped == [(locked, "cannot read: Permission denied")]


def test_file_vanishing_between_scan_and_hash(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "imgs", {"cat": 3, "dog": 3})
    victim = root / "dog" / "img1.jpg"
    real_digest = scan_mod.file_sha256

    def flaky_digest(path):
        if Path(path) == victim:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        return real_digest(path)

    monkeypatch.setattr(scan_mod, "file_sha256", flaky_digest)
    ds = scan_dataset(root)
    assert victim not in {s.path for s in ds.samples}
    assert len(ds.samples) == 5
    assert len(ds.skipped) == 1
    path, reason = ds.skipped[0]
    assert path == victim
    assert reason.startswith("cannot read") and "No such file" in reason


def test_many_files_hashed_with_workers(tmp_path):
    # > 200 files also exercises the progress-bar path; labels must still line up with paths.
    root = tmp_path / "imgs"
    for i in range(250):
        put(root / ("odd" if i % 2 else "even") / f"{i}.png", f"{i}".encode())
    ds = scan_dataset(root, workers=8)
    assert len(ds.samples) == 250
    for s in ds.samples:
        assert s.digest == hashlib.sha256(s.path.stem.encode()).hexdigest()
        assert ds.classes[s.label] == ("odd" if int(s.path.stem) % 2 else "even")


# ---------------------------------------------------------------- fingerprint

def test_fingerprint_stable_across_rescans_and_renames(tmp_path):
    root = make_dataset(tmp_path / "imgs", {"cat": 5, "dog": 5})
    first = scan_dataset(root).fingerprint()
    assert scan_dataset(root).fingerprint() == first
    (root / "cat" / "img0.jpg").rename(root / "cat" / "renamed.jpg")
    assert scan_dataset(root).fingerprint() == first


def test_fingerprint_changes_when_a_label_changes(tmp_path):
    root = make_dataset(tmp_path / "imgs", {"cat": 5, "dog": 5})
    ds = scan_dataset(root)
    before = ds.fingerprint()
    (root / "cat" / "img3.jpg").rename(root / "dog" / "was a cat.jpg")
    after_scan = scan_dataset(root)
    assert after_scan.fingerprint() != before
    # Same content, same splits: only the label moved.
    assert sorted(s.digest for s in after_scan.samples) == sorted(s.digest for s in ds.samples)


def test_fingerprint_changes_when_content_or_split_changes(tmp_path):
    root = make_dataset(tmp_path / "imgs", {"cat": 5, "dog": 5})
    ds = scan_dataset(root)
    before = ds.fingerprint()
    # Relabelling in memory, moving a split, or editing a file all change it.
    s0 = ds.samples[0]
    other_split = next(x for x in SPLITS if x != s0.split)
    moved = Dataset(ds.classes, SampleTable.from_samples([replace(s0, split=other_split), *ds.samples[1:]]))
    assert moved.fingerprint() != before
    relabelled = Dataset(ds.classes, SampleTable.from_samples([replace(s0, label=1 - s0.label), *ds.samples[1:]]))
    assert relabelled.fingerprint() != before
    put(root / "dog" / "img2.jpg", b"edited")
    assert scan_dataset(root).fingerprint() != before


# ---------------------------------------------------------------- the compact sample table

def old_samples(root: Path) -> list[tuple[Path, int, str]]:
    """(path, label, hex digest) per image as the Sample-list scan made them: the reference."""
    rows = []
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    for label, cls in enumerate(classes):
        for folder, dirs, files in os.walk(root / cls):
            dirs.sort()
            for name in sorted(files):
                path = Path(folder) / name
                rows.append((path, label, hashlib.sha256(path.read_bytes()).hexdigest()))
    return rows


def old_fingerprint(rows: list[tuple[Path, int, str, str]], classes: list[str]) -> str:
    h = hashlib.sha256()
    for _, label, digest, split in sorted(rows, key=lambda r: (r[2], r[1], r[3])):
        h.update(f"{digest}:{classes[label]}:{split}\n".encode())
    return h.hexdigest()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """300 generated PNGs in 3 classes, one nested folder, an odd file name, and copies across classes."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(300):
        cls = ("cats", "dogs", "ünïcode birds")[i % 3]
        folder = root / cls / ("nested" if i % 7 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(folder / f"img_{i:04d}.png")
    for copy in ("cats/copy.png", "dogs/copy.png", "dogs/copy2.png"):  # same bytes: label and split ties
        (root / copy).write_bytes((root / "cats/img_0003.png").read_bytes())
    # A name that is not valid UTF-8 (allowed on Linux) must come back byte for byte.
    with open(os.open(os.fsencode(root / "dogs") + b"/odd\xff.png", os.O_WRONLY | os.O_CREAT), "wb") as f:
        f.write((root / "dogs/img_0001.png").read_bytes() + b"x")
    return root


def test_table_holds_what_the_sample_list_held(photos):
    ds = scan_dataset(photos, validation_percentage=20, testing_percentage=15)
    # The split is split.py's (tests/test_split.py); the reference takes it from the table.
    reference = [row + (s.split,) for row, s in zip(old_samples(photos), ds.samples)]
    assert isinstance(ds.samples, SampleTable) and len(ds.samples) == len(reference) == 304
    assert [(s.path, s.label, s.digest, s.split) for s in ds.samples] == reference
    assert ds.fingerprint() == old_fingerprint(reference, ds.classes)
    assert ds.counts() == dict(Counter(r[3] for r in reference))
    # Columns agree with the rows, and with each other.
    np.testing.assert_array_equal(ds.samples.labels, [r[1] for r in reference])
    assert [SPLITS[c] for c in ds.samples.splits] == [r[3] for r in reference]
    assert [ds.samples.digest_hex(i) for i in range(len(reference))] == [r[2] for r in reference]
    assert list(ds.samples.paths) == [r[0] for r in reference]
    assert any(os.fsencode(p).endswith(b"odd\xff.png") and p.exists() for p in ds.samples.paths)


def test_table_is_compact(photos):
    table = scan_dataset(photos).samples
    assert table.rows is None and table.nbytes / len(table) < 100  # Sample objects took ~700 bytes an image
    assert table.digests.shape == (len(table), 32) and table.digests.dtype == np.uint8
    assert table.labels.dtype == np.int32 and table.splits.dtype == np.int8


def test_table_views_index_like_the_sample_list(photos):
    ds = scan_dataset(photos)
    samples = list(ds.samples)
    for name in SPLITS:
        part = ds.split(name)
        assert isinstance(part, SampleTable)
        assert list(part) == [s for s in samples if s.split == name]
    assert ds.samples[np.int64(5)] == ds.samples[5] == samples[5] and ds.samples[-1] == samples[-1]
    with pytest.raises(IndexError):
        ds.samples[len(samples)]
    assert list(ds.samples[10:20]) == samples[10:20]
    assert list(ds.samples[np.array([7, 3, 7])]) == [samples[7], samples[3], samples[7]]
    both = ds.split("validation") + ds.split("test")
    assert list(both) == list(ds.split("validation")) + list(ds.split("test"))
    assert list(SampleTable.from_samples(samples)) == samples
    with pytest.raises(ValueError):
        SampleTable.from_samples(samples[:5]) + ds.samples[5:]  # rows of different scans
    # Views hold row numbers, not copies of the columns.
    part = ds.split("train")
    assert part.columns is ds.samples.columns and part.nbytes - ds.samples.nbytes == 8 * len(part)
    assert list(part[2:9][np.array([True, False] * 3 + [True])]) == [list(part)[k] for k in (2, 4, 6, 8)]
    wanted = [samples[-1].digest, samples[0].digest, hashlib.sha256(b"absent").hexdigest()]
    hits = [s.path for s, hit in zip(samples, ds.samples.has_digest(wanted)) if hit]
    assert hits == [photos / "cats/copy.png", photos / "cats/img_0003.png", photos / "dogs/copy.png",
                    photos / "dogs/copy2.png", samples[-1].path]  # samples[0] is a copy: all four


def test_empty_table():
    empty = SampleTable.from_samples([])
    assert len(empty) == 0 and list(empty) == [] and empty.keys.shape == (0,)
    assert Dataset(["a", "b"], empty).fingerprint() == hashlib.sha256().hexdigest()


def lock(monkeypatch, *folders: Path) -> None:
    """Listing `folders` fails as it would for a folder without read permission (chmod cannot stop root)."""
    real = os.scandir
    locked = {str(f) for f in folders}

    def scandir(path="."):
        if os.fspath(path) in locked:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)


def test_a_folder_that_cannot_be_listed_is_skipped_by_name_not_lost_unnoticed(tmp_path, monkeypatch):
    root = tmp_path / "d"
    for kind in ("circles", "squares", "stripes"):
        for i in range(6):
            put(root / kind / f"{i}.jpg")
    nested = root / "circles" / "nested"
    (root / "circles" / "0.jpg").rename(put(nested / "c.jpg"))
    lock(monkeypatch, nested)
    dataset = scan_dataset(root, validation_percentage=0, testing_percentage=0, quiet=True)
    assert (nested, "cannot list this folder: Permission denied") in dataset.skipped
    assert len(dataset.samples) == 17
    evaluation = scan_labelled_folder(root, dataset.classes, quiet=True)
    assert (nested, "cannot list this folder: Permission denied") in evaluation.skipped
    lock(monkeypatch, root / "squares")
    with pytest.raises(UserError, match=r"no images in .*: squares \(cannot list this folder: Permission denied\)"):
        scan_dataset(root, quiet=True)
