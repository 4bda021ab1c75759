"""Scan a folder of class folders into labelled samples, hash their contents, and split them.

Layout: IMAGE_DIR/<class>/<images>; images in nested folders below a class folder belong to
that class. Hidden files and folders (names starting with '.') are skipped. A folder holding
train/ (or training/) with val/ and/or test/ (validation/, testing/) uses that fixed split.
Otherwise an image's split comes from a hash of its content, as in retrain.py (which hashed
the file name): adding images never moves existing ones, and exact duplicates share a split.
"""
from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib",
                    ".webp", ".tif", ".tiff"}
SPLITS = ("train", "validation", "test")
SPLIT_DIR_NAMES = {
    "train": ("train", "training"),
    "validation": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}


@dataclass(frozen=True, slots=True)  # slots: no per-sample __dict__ (a million samples are held at once)
class Sample:
    path: Path
    label: int
    digest: str  # sha256 of the file's bytes
    split: str


@dataclass
class Dataset:
    classes: list[str]
    samples: list[Sample]
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)
    ignored: int = 0  # non-image files seen in class folders
    fixed_split: bool = False

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict[str, int]:
        return {name: len(self.split(name)) for name in SPLITS}

    def fingerprint(self) -> str:
        """Hash of (content, label, split) for every sample: identifies the exact training data."""
        h = hashlib.sha256()
        for s in sorted(self.samples, key=lambda s: (s.digest, s.label, s.split)):
            h.update(f"{s.digest}:{self.classes[s.label]}:{s.split}\n".encode())
        return h.hexdigest()


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in ("thumbs.db", "desktop.ini", "__macosx")


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(name)


def walk_files(folder: Path) -> Iterator[tuple[Path, bool]]:
    """(file, whether it is an image) below `folder`, lazily, sorted within each folder.

    Recursive, not following folder links; hidden files and folders are left out.
    """
    for root, dirs, files in os.walk(folder, onerror=None):
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        base = Path(root)  # one per folder: its files' Paths share its parts instead of re-parsing them
        for name in sorted(files):
            if not is_hidden(name):
                yield base / name, is_image_name(name)


def list_images(folder: Path) -> tuple[list[Path], int]:
    """Image files below `folder` (recursively, not following folder links) and a count of others."""
    found, ignored = [], 0
    for path, image in walk_files(folder):
        if image:
            found.append(path)
        else:
            ignored += 1
    return found, ignored


def class_folders(image_dir: Path) -> list[Path]:
    """Sub-folders of `image_dir` that name classes, sorted by name."""
    if not image_dir.exists():
        raise UserError(f"image folder not found: {image_dir}")
    if not image_dir.is_dir():
        raise UserError(f"not a folder: {image_dir} (give a folder with one sub-folder per class)")
    try:
        entries = sorted(image_dir.iterdir(), key=lambda p: p.name)
    except PermissionError:
        raise UserError(f"cannot read folder {image_dir}: permission denied") from None
    return [p for p in entries if p.is_dir() and not is_hidden(p.name)]


def find_split_dirs(image_dir: Path) -> dict[str, Path]:
    """{'train': path, 'validation': path?, 'test': path?} when `image_dir` holds split folders."""
    found: dict[str, Path] = {}
    folders = class_folders(image_dir)
    for folder in folders:
        for split, names in SPLIT_DIR_NAMES.items():
            if folder.name.lower() in names:
                found[split] = folder
    if "train" not in found or len(found) < 2:
        return {}
    others = sorted(f.name for f in folders if f not in found.values())
    if others:
        raise UserError(f"{image_dir} mixes split folders ({', '.join(f.name for f in found.values())}) with "
                        f"other folders ({', '.join(others)}): give the train folder's path, or move them")
    return found


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_split(digest: str, validation_percentage: float, testing_percentage: float) -> str:
    """Stable split from content: the same bytes always land in the same split."""
    percent = (int(digest[:12], 16) % 10_000) / 100.0
    if percent < validation_percentage:
        return "validation"
    if percent < validation_percentage + testing_percentage:
        return "test"
    return "train"


def _safe_digest(path: Path) -> str | OSError:
    try:
        return file_digest(path)
    except OSError as e:
        return e


def _hash_all(paths: Iterable[Path], total: int, workers: int, quiet: bool = False) -> Iterator[str | OSError]:
    """Digests (or the OSError) in input order, with at most 4 files per worker in flight.

    pool.map would submit every file up front: a million pending futures (~0.5 KB each) just
    to hash files one after another.
    """
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=total, desc="Hashing images", unit="img", leave=False,
                 disable=quiet or total < 200) as bar:
        pending: deque = deque()
        for path in paths:
            pending.append(pool.submit(_safe_digest, path))
            if len(pending) >= 4 * workers:
                bar.update()
                yield pending.popleft().result()
        while pending:
            bar.update()
            yield pending.popleft().result()


Group = tuple[list[Path], str, str | None]  # (files, class name, fixed split or None)


def _labelled_files(folder: Path, classes: list[str] | None) -> tuple[list[str], list[tuple[list[Path], str]], int]:
    """(class names, [(files, class)] per class folder, ignored count) for one folder of class folders."""
    subdirs = class_folders(folder)
    names = [d.name for d in subdirs]
    if classes is not None:
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise UserError(f"{folder} has class folders not in the training classes: "
                            f"{', '.join(unknown)} (training classes: {', '.join(classes)})")
    groups, ignored = [], 0
    for d in subdirs:
        images, other = list_images(d)
        ignored += other
        groups.append((images, d.name))
    return names, groups, ignored


def scan_dataset(image_dir: str | os.PathLike, *, val_dir: str | os.PathLike | None = None,
                 test_dir: str | os.PathLike | None = None, validation_percentage: float = 10,
                 testing_percentage: float = 10, workers: int = 4, quiet: bool = False) -> Dataset:
    """Scan, hash and split `image_dir`; fixed splits come from split folders or val/test dirs."""
    image_dir = Path(image_dir)
    if not 0 <= validation_percentage < 100 or not 0 <= testing_percentage < 100 \
            or validation_percentage + testing_percentage >= 100:
        raise UserError("--validation_percentage and --testing_percentage must be in [0, 100) "
                        "and leave images for training")
    split_dirs = find_split_dirs(image_dir)
    train_dir = split_dirs.get("train", image_dir)
    fixed = {"validation": val_dir and Path(val_dir) or split_dirs.get("validation"),
             "test": test_dir and Path(test_dir) or split_dirs.get("test")}

    classes, train_files, ignored = _labelled_files(train_dir, None)
    if len(classes) < 2:
        raise UserError(f"{train_dir} needs at least 2 class folders (one sub-folder per class, "
                        f"images inside); found {len(classes)}: {', '.join(classes) or 'none'}")
    per_class = {c: 0 for c in classes}
    for files, c in train_files:
        per_class[c] += len(files)
    empty = [c for c, n in per_class.items() if n == 0]
    if empty:
        raise UserError(f"class folder(s) with no images in {train_dir}: {', '.join(empty)} "
                        f"(supported: {', '.join(sorted(IMAGE_EXTENSIONS))})")

    groups: list[Group] = [(files, c, None) for files, c in train_files]
    for split, folder in fixed.items():
        if folder:
            _, more, other = _labelled_files(Path(folder), classes)
            ignored += other
            groups += [(files, c, split) for files, c in more]

    # Carve out of train only the splits that have no folder of their own.
    val_pct = 0 if fixed["validation"] else validation_percentage
    test_pct = 0 if fixed["test"] else testing_percentage
    samples, skipped = _hashed_samples(groups, classes, val_pct, test_pct, workers, quiet)
    return Dataset(classes, samples, skipped, ignored,
                   fixed_split=bool(fixed["validation"] or fixed["test"]))


def _hashed_samples(groups: list[Group], classes: list[str], val_pct: float, test_pct: float, workers: int,
                    quiet: bool) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Hash (files, class, fixed split or None) groups into samples; unreadable files are skipped.

    Streams: each file's Sample is made as its digest arrives, and the only per-image objects
    kept are the Path (shared with the Sample) and the Sample itself.
    """
    index = {c: i for i, c in enumerate(classes)}
    entries = ((path, cls, split) for files, cls, split in groups for path in files)
    digests = _hash_all((path for files, _, _ in groups for path in files),
                        sum(len(files) for files, _, _ in groups), workers, quiet)
    samples, skipped = [], []
    for (path, cls, split), digest in zip(entries, digests):
        if isinstance(digest, Exception):
            skipped.append((path, f"cannot read: {digest.strerror or digest}"))
        else:
            samples.append(Sample(path, index[cls], digest, split or hash_split(digest, val_pct, test_pct)))
    return samples, skipped


def scan_labelled_folder(folder: str | os.PathLike, classes: list[str], workers: int = 4,
                         quiet: bool = False) -> Dataset:
    """Scan an evaluation folder whose class folders must be among `classes`."""
    names, groups, ignored = _labelled_files(Path(folder), classes)
    if not any(files for files, _ in groups):
        raise UserError(f"no images found in the class folders of {folder}")
    samples, skipped = _hashed_samples([(files, c, "test") for files, c in groups], list(classes), 0, 0,
                                       workers, quiet)
    return Dataset(list(classes), samples, skipped, ignored, fixed_split=True)
