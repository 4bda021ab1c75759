"""Scan a folder of class folders into labelled samples, hash their contents, and split them.

Layout: IMAGE_DIR/<class>/<images>; images in nested folders below a class folder belong to
that class. Hidden files and folders (names starting with '.') are skipped. A folder holding
train/ (or training/) with val/ and/or test/ (validation/, testing/) uses that fixed split.
Otherwise an image's split comes from a hash of its content, as in retrain.py (which hashed
the file name): adding images never moves existing ones, and exact duplicates share a split.

The samples are held as a SampleTable: NumPy columns (raw digest, label, split, path as a
folder number and a file name in one shared bytes blob), about 70 bytes an image where a list
of Sample objects took ~700, so a million images fit in ~70 MB. Sample objects are made on
demand, one at a time, for code that walks the images.
"""
from __future__ import annotations

import hashlib
import os
from array import array
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np
from tqdm import tqdm

from .errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib",
                    ".webp", ".tif", ".tiff"}
SPLITS = ("train", "validation", "test")  # a SampleTable stores a split as its index here
SPLIT_DIR_NAMES = {
    "train": ("train", "training"),
    "validation": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
NO_SPLIT = -1  # while scanning: the split comes from the content hash


@dataclass(frozen=True, slots=True)  # slots: no per-sample __dict__
class Sample:
    """One image: what SampleTable[i] gives."""
    path: Path
    label: int
    digest: str  # sha256 of the file's bytes, hex
    split: str


def digest_keys(digests: Iterable[str]) -> np.ndarray:
    """Hex sha256 digests as (n,) S32 raw keys, the form SampleTable.keys and the feature store use."""
    return np.frombuffer(bytes.fromhex("".join(digests)), "S32")


class SampleTable(Sequence[Sample]):
    """Samples as NumPy columns, one row per image.

    digests (n, 32) uint8 raw sha256; labels int32; splits int8 (index into SPLITS); the path as
    folder (int32, into the shared `folders` list) plus name_starts (int64) / name_lengths (uint16)
    into the shared `names` blob of os.fsencode'd file names. table[i] is a Sample, made on
    demand; table[mask or indices or slice] is a SampleTable of those rows (columns copied,
    folders and names shared).
    """

    def __init__(self, digests: np.ndarray, labels: np.ndarray, splits: np.ndarray, folder: np.ndarray,
                 name_starts: np.ndarray, name_lengths: np.ndarray, folders: list[Path], names: bytes):
        self.digests, self.labels, self.splits = digests, labels, splits
        self.folder, self.name_starts, self.name_lengths = folder, name_starts, name_lengths
        self.folders, self.names = folders, names

    @classmethod
    def from_samples(cls, samples: Iterable[Sample]) -> SampleTable:
        """A table of Sample objects (tests, and code that builds samples by hand)."""
        rows = _Rows()
        for s in samples:
            rows.add(rows.folder_number(s.path.parent), s.path.name, s.label, SPLITS.index(s.split),
                     bytes.fromhex(s.digest))
        return rows.table()

    def __len__(self) -> int:
        return len(self.labels)

    @overload
    def __getitem__(self, i: int) -> Sample: ...
    @overload
    def __getitem__(self, i: slice | np.ndarray) -> SampleTable: ...

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            if not -len(self) <= i < len(self):
                raise IndexError(f"sample {i} of {len(self)}")
            return Sample(self.path(i), int(self.labels[i]), self.digest_hex(i), SPLITS[self.splits[i]])
        return SampleTable(self.digests[i], self.labels[i], self.splits[i], self.folder[i], self.name_starts[i],
                           self.name_lengths[i], self.folders, self.names)

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def __add__(self, other: SampleTable) -> SampleTable:
        """Rows of both tables (e.g. validation + test), even from different scans."""
        same = other.folders is self.folders and other.names is self.names
        folder = other.folder if same else other.folder + len(self.folders)
        starts = other.name_starts if same else other.name_starts + len(self.names)
        return SampleTable(np.concatenate([self.digests, other.digests]), np.concatenate([self.labels, other.labels]),
                           np.concatenate([self.splits, other.splits]), np.concatenate([self.folder, folder]),
                           np.concatenate([self.name_starts, starts]),
                           np.concatenate([self.name_lengths, other.name_lengths]),
                           self.folders if same else self.folders + other.folders,
                           self.names if same else self.names + other.names)

    @property
    def keys(self) -> np.ndarray:
        """(n,) S32 view of the digests: sortable, searchable, comparable as whole arrays.

        (A single S32 element drops trailing NUL bytes: use digest_hex for one digest.)
        """
        return np.ascontiguousarray(self.digests).view("S32").reshape(len(self))

    def digest_hex(self, i: int) -> str:
        return self.digests[i].tobytes().hex()

    def path(self, i: int) -> Path:
        start = int(self.name_starts[i])
        return self.folders[self.folder[i]] / os.fsdecode(self.names[start:start + int(self.name_lengths[i])])

    @property
    def paths(self) -> Sequence[Path]:
        """The rows' paths as a lazy sequence: a Path is made when asked for, none is kept."""
        return _Paths(self)

    def split_mask(self, name: str) -> np.ndarray:
        return self.splits == SPLITS.index(name)

    def has_digest(self, digests: Iterable[str]) -> np.ndarray:
        """Boolean mask: rows whose content is one of these hex digests."""
        return np.isin(self.keys, digest_keys(digests))

    @property
    def nbytes(self) -> int:
        """Memory held: the columns and the shared name blob and folders (Path objects estimated at 200 bytes)."""
        columns = (self.digests, self.labels, self.splits, self.folder, self.name_starts, self.name_lengths)
        return sum(c.nbytes for c in columns) + len(self.names) + 200 * len(self.folders)


class _Paths(Sequence[Path]):
    def __init__(self, table: SampleTable):
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.table.path(j) for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"path {i} of {len(self)}")
        return self.table.path(i)


class _Rows:
    """A SampleTable's columns while they are being found: appended to compact arrays, not objects."""

    def __init__(self):
        self.folders: list[Path] = []
        self._folder_numbers: dict[Path, int] = {}
        self.folder, self.name_starts, self.name_lengths = array("i"), array("q"), array("H")
        self.labels, self.splits = array("i"), array("b")
        self.names, self.digests = bytearray(), bytearray()

    def folder_number(self, folder: Path) -> int:
        number = self._folder_numbers.setdefault(folder, len(self.folders))
        if number == len(self.folders):
            self.folders.append(folder)
        return number

    def add(self, folder: int, name: str, label: int, split: int, digest: bytes = bytes(32)) -> None:
        """One image; the scan fills in digests (and hash splits) after the walk."""
        encoded = os.fsencode(name)  # surrogateescape: any bytes a file system allows come back unchanged
        self.folder.append(folder)
        self.name_starts.append(len(self.names))
        self.name_lengths.append(len(encoded))
        self.names += encoded
        self.labels.append(label)
        self.splits.append(split)
        self.digests += digest

    def table(self) -> SampleTable:
        digests = np.frombuffer(self.digests, np.uint8).reshape(-1, 32).copy()  # writable: the scan fills it
        return SampleTable(digests, np.array(self.labels, np.int32), np.array(self.splits, np.int8),
                           np.array(self.folder, np.int32), np.array(self.name_starts, np.int64),
                           np.array(self.name_lengths, np.uint16), self.folders, bytes(self.names))


@dataclass
class Dataset:
    classes: list[str]
    samples: SampleTable
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)
    ignored: int = 0  # non-image files seen in class folders
    fixed_split: bool = False

    def split(self, name: str) -> SampleTable:
        return self.samples[self.samples.split_mask(name)]

    def counts(self) -> dict[str, int]:
        per_split = np.bincount(self.samples.splits, minlength=len(SPLITS))
        return {name: int(n) for name, n in zip(SPLITS, per_split)}

    def fingerprint(self) -> str:
        """Hash of (content, label, split) for every sample: identifies the exact training data.

        The formula of the Sample-list days, kept byte for byte (feature caches, checkpoints and
        models record it): lines "hexdigest:class:split" sorted by (digest, label, split name).
        """
        t = self.samples
        split_order = np.argsort(np.argsort(SPLITS)).astype(np.int8)  # rank of each split's name
        order = np.lexsort((split_order[t.splits], t.labels, t.keys))
        h = hashlib.sha256()
        for start in range(0, len(order), 8192):  # in blocks: one hex string per block, not per row
            rows = order[start:start + 8192]
            hexes = t.digests[rows].tobytes().hex()
            h.update("".join(f"{hexes[64 * k:64 * k + 64]}:{self.classes[t.labels[i]]}:{SPLITS[t.splits[i]]}\n"
                             for k, i in enumerate(rows)).encode())
        return h.hexdigest()


def is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in ("thumbs.db", "desktop.ini", "__macosx")


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(name)


def walk_folders(folder: Path) -> Iterator[tuple[Path, list[str]]]:
    """(folder, its visible file names sorted) for `folder` and every folder below it, lazily.

    Recursive, not following folder links; hidden files and folders are left out.
    """
    for root, dirs, files in os.walk(folder, onerror=None):
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        yield Path(root), sorted(name for name in files if not is_hidden(name))


def walk_files(folder: Path) -> Iterator[tuple[Path, bool]]:
    """(file, whether it is an image) below `folder`, lazily, sorted within each folder."""
    for base, names in walk_folders(folder):
        # One Path per folder: its files' Paths share its parts instead of re-parsing them.
        yield from ((base / name, is_image_name(name)) for name in names)


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


def file_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


def file_digest(path: Path) -> str:
    return file_sha256(path).hex()


def split_codes(digests: np.ndarray, validation_percentage: float, testing_percentage: float) -> np.ndarray:
    """Stable splits from content, as indices into SPLITS: the same bytes always land in the same split.

    `digests` is (n, 32) uint8; the first 6 bytes, as a number, modulo 10,000 give a percentage.
    """
    first = digests[:, :6].astype(np.int64) << (8 * np.arange(5, -1, -1))
    percent = (first.sum(axis=1) % 10_000) / 100.0
    codes = np.full(len(digests), SPLITS.index("train"), np.int8)
    codes[percent < validation_percentage + testing_percentage] = SPLITS.index("test")
    codes[percent < validation_percentage] = SPLITS.index("validation")
    return codes


def hash_split(digest: str, validation_percentage: float, testing_percentage: float) -> str:
    """split_codes for one hex digest, as a split name."""
    raw = np.frombuffer(bytes.fromhex(digest), np.uint8).reshape(1, 32)
    return SPLITS[split_codes(raw, validation_percentage, testing_percentage)[0]]


def _safe_digest(path: Path) -> bytes | OSError:
    try:
        return file_sha256(path)
    except OSError as e:
        return e


def _hash_all(paths: Iterable[Path], total: int, workers: int, quiet: bool = False) -> Iterator[bytes | OSError]:
    """Raw digests (or the OSError) in input order, with at most 4 files per worker in flight.

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


def _labelled_files(folder: Path, classes: list[str], split: int, rows: _Rows) -> int:
    """Add the images of one folder of class folders to `rows` (label: index in `classes`); the count of others.

    Raises UserError for a class folder that is not in `classes`.
    """
    subdirs = class_folders(folder)
    unknown = sorted({d.name for d in subdirs} - set(classes))
    if unknown:
        raise UserError(f"{folder} has class folders not in the training classes: "
                        f"{', '.join(unknown)} (training classes: {', '.join(classes)})")
    ignored = 0
    for d in subdirs:
        label = classes.index(d.name)
        for base, names in walk_folders(d):
            number = None
            for name in names:
                if not is_image_name(name):
                    ignored += 1
                    continue
                if number is None:  # only folders that hold images are kept
                    number = rows.folder_number(base)
                rows.add(number, name, label, split)
    return ignored


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

    classes = [d.name for d in class_folders(train_dir)]
    if len(classes) < 2:
        raise UserError(f"{train_dir} needs at least 2 class folders (one sub-folder per class, "
                        f"images inside); found {len(classes)}: {', '.join(classes) or 'none'}")
    rows = _Rows()
    ignored = _labelled_files(train_dir, classes, NO_SPLIT, rows)
    per_class = np.bincount(np.asarray(rows.labels, np.int32), minlength=len(classes))
    empty = [c for c, n in zip(classes, per_class) if n == 0]
    if empty:
        raise UserError(f"class folder(s) with no images in {train_dir}: {', '.join(empty)} "
                        f"(supported: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    for split, folder in fixed.items():
        if folder:
            ignored += _labelled_files(Path(folder), classes, SPLITS.index(split), rows)

    # Carve out of train only the splits that have no folder of their own.
    val_pct = 0 if fixed["validation"] else validation_percentage
    test_pct = 0 if fixed["test"] else testing_percentage
    samples, skipped = _hashed_samples(rows.table(), val_pct, test_pct, workers, quiet)
    return Dataset(classes, samples, skipped, ignored, fixed_split=bool(fixed["validation"] or fixed["test"]))


def _hashed_samples(table: SampleTable, val_pct: float, test_pct: float, workers: int,
                    quiet: bool) -> tuple[SampleTable, list[tuple[Path, str]]]:
    """Fill in `table`'s digests and hash splits; unreadable files are skipped (dropped, with the reason).

    Streams: digests go straight into the table's array as they arrive, and no per-image
    object is kept.
    """
    readable = np.ones(len(table), bool)
    skipped = []
    for i, digest in enumerate(_hash_all(table.paths, len(table), workers, quiet)):
        if isinstance(digest, Exception):
            readable[i] = False
            skipped.append((table.path(i), f"cannot read: {digest.strerror or digest}"))
        else:
            table.digests[i] = np.frombuffer(digest, np.uint8)
    by_hash = table.splits == NO_SPLIT
    table.splits[by_hash] = split_codes(table.digests[by_hash], val_pct, test_pct)
    return (table if readable.all() else table[readable]), skipped


def scan_labelled_folder(folder: str | os.PathLike, classes: list[str], workers: int = 4,
                         quiet: bool = False) -> Dataset:
    """Scan an evaluation folder whose class folders must be among `classes`."""
    rows = _Rows()
    ignored = _labelled_files(Path(folder), list(classes), SPLITS.index("test"), rows)
    if not len(rows.labels):
        raise UserError(f"no images found in the class folders of {folder}")
    samples, skipped = _hashed_samples(rows.table(), 0, 0, workers, quiet)
    return Dataset(list(classes), samples, skipped, ignored, fixed_split=True)
