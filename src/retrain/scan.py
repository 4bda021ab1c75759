"""Scan a folder of class folders into labelled samples, hash their contents, and split them.

Layout: IMAGE_DIR/<class>/<images>; images in nested folders below a class folder belong to
that class. Hidden files and folders (names starting with '.') are skipped. A folder holding
train/ (or training/) with val/ and/or test/ (validation/, testing/) uses that fixed split.
Otherwise the split is carved per class by split.py: stratified, stable as photos are added,
exact duplicates in one split.

The samples are held as a SampleTable: NumPy columns (raw digest, label, split, path as a
folder number and a file name in one shared bytes blob), about 70 bytes an image where a list
of Sample objects took ~700, so a million images fit in ~70 MB. Sample objects are made on
demand, one at a time, for code that walks the images.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import overload

import numpy as np

from .prefetch import ordered_map
from .progress import progress
from .errors import UserError
from .split import assign_recorded, record_path
from .decode import describe
from .guards import file_sha256, read_failure  # file_sha256: never a pipe or a device

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib",
                    ".webp", ".tif", ".tiff"}
SPLITS = ("train", "validation", "test")  # a SampleTable stores a split as its index here
SPLIT_DIR_NAMES = {
    "train": ("train", "training"),
    "validation": ("val", "valid", "validation"),
    "test": ("test", "testing"),
}
NO_SPLIT = -1  # while scanning: the split is carved out of the training folder (split.py)


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


@dataclass(frozen=True, eq=False)  # eq=False: tables compare by identity, not array by array
class Columns:
    """What a scan found, one row per image, as NumPy arrays (~66 bytes an image in all)."""
    digests: np.ndarray  # (n, 32) uint8: raw sha256 of the file's bytes
    labels: np.ndarray  # (n,) int32: index into the dataset's classes
    splits: np.ndarray  # (n,) int8: index into SPLITS
    folder: np.ndarray  # (n,) int32: index into `folders`
    name_starts: np.ndarray  # (n,) int64 and
    name_lengths: np.ndarray  # (n,) uint16: the file name's bytes in `names`
    folders: list[Path]
    names: bytes  # every file name, os.fsencode'd, back to back


class SampleTable(Sequence[Sample]):
    """Samples as rows of Columns: all of them, or a view of some (their row numbers, 8 bytes a row).

    table[i] is a Sample, made on demand; table[mask or indices or slice] is a view of those
    rows, sharing the columns, so a dataset's splits cost no second copy. The column properties
    (digests, labels, splits, keys) are the rows' values: the arrays themselves for a whole table,
    copies for a view.
    """

    def __init__(self, columns: Columns, rows: np.ndarray | None = None):
        self.columns, self.rows = columns, rows  # rows: None for every row, in order

    @classmethod
    def from_samples(cls, samples: Iterable[Sample]) -> SampleTable:
        """A table of Sample objects (tests, and code that builds samples by hand)."""
        rows = _Rows()
        for (folder, label, split), run in groupby(samples, key=lambda s: (s.path.parent, s.label, s.split)):
            run = list(run)
            rows.add(folder, [s.path.name for s in run], label, SPLITS.index(split),
                     bytes.fromhex("".join(s.digest for s in run)))
        return cls(rows.columns())

    def _column(self, values: np.ndarray) -> np.ndarray:
        return values if self.rows is None else values[self.rows]

    @property
    def digests(self) -> np.ndarray:
        return self._column(self.columns.digests)

    @property
    def labels(self) -> np.ndarray:
        return self._column(self.columns.labels)

    @property
    def splits(self) -> np.ndarray:
        return self._column(self.columns.splits)

    @property
    def keys(self) -> np.ndarray:
        """(n,) S32 digests: sortable, searchable, comparable as whole arrays.

        (A single S32 element drops trailing NUL bytes: use digest_hex for one digest.)
        """
        return np.ascontiguousarray(self.digests).view("S32").reshape(len(self))

    def __len__(self) -> int:
        return len(self.columns.labels) if self.rows is None else len(self.rows)

    def _row(self, i: int) -> int:
        """The column row of this table's i-th sample."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        return int(i % len(self) if self.rows is None else self.rows[i])

    @overload
    def __getitem__(self, i: int) -> Sample: ...
    @overload
    def __getitem__(self, i: slice | np.ndarray) -> SampleTable: ...

    def __getitem__(self, i):
        if isinstance(i, (int, np.integer)):
            r, c = self._row(i), self.columns
            return Sample(self.path(i), int(c.labels[r]), c.digests[r].tobytes().hex(), SPLITS[c.splits[r]])
        if self.rows is not None:
            return SampleTable(self.columns, self.rows[i])
        if isinstance(i, slice):
            return SampleTable(self.columns, np.arange(*i.indices(len(self))))
        return SampleTable(self.columns, np.arange(len(self))[i])

    def __iter__(self) -> Iterator[Sample]:
        return (self[i] for i in range(len(self)))

    def rows_of(self, mask: np.ndarray) -> np.ndarray:
        """The column row numbers of the samples where the boolean `mask` is set."""
        return np.flatnonzero(mask) if self.rows is None else self.rows[mask]

    def __add__(self, other: SampleTable) -> SampleTable:
        """Rows of both tables (e.g. validation + test): views of the same scan."""
        if other.columns is not self.columns:
            raise ValueError("only rows of the same scan can be joined")
        every = np.arange(len(self.columns.labels))
        return SampleTable(self.columns, np.concatenate([self._column(every), other._column(every)]))

    def digest_hex(self, i: int) -> str:
        return self.columns.digests[self._row(i)].tobytes().hex()

    def path(self, i: int) -> Path:
        r, c = self._row(i), self.columns
        start = int(c.name_starts[r])
        return c.folders[c.folder[r]] / os.fsdecode(c.names[start:start + int(c.name_lengths[r])])

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
        """Memory held: the columns, name blob and folders (a Path estimated at 200 bytes), and any row numbers."""
        c = self.columns
        arrays = (c.digests, c.labels, c.splits, c.folder, c.name_starts, c.name_lengths)
        rows = 0 if self.rows is None else self.rows.nbytes
        return sum(a.nbytes for a in arrays) + len(c.names) + 200 * len(c.folders) + rows


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
    """Columns while they are being found, a folder of images at a time.

    Each folder adds its names as one bytes object and their lengths as one uint16 array (about
    17 bytes an image); columns() builds every column once, at its final size.
    """

    def __init__(self):
        self.folders: list[Path] = []  # one entry per add(): the table's folder column repeats its number
        self._chunks: list[tuple[int, int, int]] = []  # (images, label, split) per add()
        self._names: list[bytes] = []
        self._lengths: list[np.ndarray] = []
        self._digests: list[bytes] = []  # empty while scanning: the hashes come after the walk

    def add(self, folder: Path, names: list[str], label: int, split: int, digests: bytes | None = None) -> None:
        """Images `names` of `folder`; `digests` (raw, 32 bytes each) with every add() or with none."""
        encoded = [os.fsencode(name) for name in names]  # surrogateescape: any bytes a file system allows
        self.folders.append(folder)
        self._chunks.append((len(names), label, split))
        self._names.append(b"".join(encoded))
        self._lengths.append(np.fromiter(map(len, encoded), np.uint16, len(encoded)))
        if digests is not None:
            self._digests.append(digests)

    def _chunk_array(self) -> np.ndarray:
        return np.array(self._chunks, np.int64).reshape(-1, 3)

    def per_label(self, n_labels: int) -> np.ndarray:
        chunks = self._chunk_array()
        return np.bincount(chunks[:, 1], weights=chunks[:, 0], minlength=n_labels).astype(np.int64)

    def __len__(self) -> int:
        return sum(n for n, _, _ in self._chunks)

    def columns(self) -> Columns:
        chunks = self._chunk_array()
        images = chunks[:, 0]
        lengths = np.concatenate([np.zeros(0, np.uint16), *self._lengths])
        if self._digests:  # given with every add()
            digests = np.frombuffer(b"".join(self._digests), np.uint8).reshape(-1, 32).copy()
        else:  # scanning: zeros, filled in as the files are hashed
            digests = np.zeros((len(lengths), 32), np.uint8)
        return Columns(digests=digests, labels=np.repeat(chunks[:, 1].astype(np.int32), images),
                       splits=np.repeat(chunks[:, 2].astype(np.int8), images),
                       folder=np.repeat(np.arange(len(chunks), dtype=np.int32), images),
                       name_starts=np.cumsum(lengths, dtype=np.int64) - lengths, name_lengths=lengths,
                       folders=self.folders, names=b"".join(self._names))


@dataclass
class Dataset:
    classes: list[str]
    samples: SampleTable
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # (file, reason)
    ignored: int = 0  # non-image files seen in class folders
    split_folders: dict[str, Path] = field(default_factory=dict)  # held-out splits a folder holds (others carved)
    unsplit_classes: list[str] = field(default_factory=list)  # too few photos to hold any out: all train

    @property
    def fixed_split(self) -> bool:
        return bool(self.split_folders)

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


UNLISTED = "cannot list this folder"  # the reason a folder is skipped begins so


def skipped_line(skipped: Sequence[tuple[str | os.PathLike, str]], shown: int = 5) -> str:
    """'Skipped N unreadable file(s): folder/name (why); ...', the first `shown` named, for a log or a message."""
    named = "; ".join(f"{describe(path)} ({why})" for path, why in skipped[:shown])
    what = "file(s) or folder(s)" if any(why.startswith(UNLISTED) for _, why in skipped) else "file(s)"
    return f"Skipped {len(skipped)} unreadable {what}: {named}" + (" ..." if len(skipped) > shown else "")


def walk_folders(folder: Path, unreadable: list[tuple[Path, str]] | None = None
                 ) -> Iterator[tuple[Path, list[str]]]:
    """(folder, its visible file names sorted) for `folder` and every folder below it, lazily.

    Recursive, not following folder links; hidden files and folders are left out. A folder that
    cannot be listed is added to `unreadable` with the reason (it would otherwise vanish unnoticed,
    its photos missing from a count).
    """
    def note(e: OSError) -> None:
        if unreadable is not None:
            unreadable.append((Path(e.filename or folder), f"{UNLISTED}: {e.strerror or e}"))
    for root, dirs, files in os.walk(folder, onerror=note):
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        yield Path(root), sorted(name for name in files if not is_hidden(name))


def walk_files(folder: Path, unreadable: list[tuple[Path, str]] | None = None) -> Iterator[tuple[Path, bool]]:
    """(file, whether it is an image) below `folder`, lazily, sorted within each folder (see walk_folders)."""
    for base, names in walk_folders(folder, unreadable):
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
    folders = [p for p in entries if p.is_dir() and not is_hidden(p.name)]
    for folder in folders:
        _check_class_name(folder)
    return folders


def _check_class_name(folder: Path) -> None:
    """A class name goes into labels.txt, metrics.json and the model's metadata, all UTF-8: refuse one that is not."""
    try:
        folder.name.encode("utf-8")
    except UnicodeEncodeError:  # os.listdir gave undecodable bytes as surrogates
        raise UserError(f"class folder name {os.fsencode(folder.name)!r} in {folder.parent} is not valid UTF-8: "
                        "rename it (class names become the model's labels)") from None


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
    return file_sha256(path).hex()


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
    with progress(total=total, desc="Hashing images", unit="img", leave=False, disable=quiet or total < 200) as bar:
        for digest in ordered_map(_safe_digest, paths, workers, ahead=4 * workers):
            bar.update()
            yield digest


def _labelled_files(folder: Path, classes: list[str], split: int, rows: _Rows,
                    unreadable: list[tuple[Path, str]]) -> int:
    """Add the images of one folder of class folders to `rows` (label: index in `classes`); the count of others.

    Folders that cannot be listed go to `unreadable`. Raises UserError for a class folder that is not in `classes`.
    """
    subdirs = class_folders(folder)
    unknown = sorted({d.name for d in subdirs} - set(classes))
    if unknown:
        raise UserError(f"{folder} has class folders not in the training classes: "
                        f"{', '.join(unknown)} (training classes: {', '.join(classes)})")
    ignored = 0
    for d in subdirs:
        for base, names in walk_folders(d, unreadable):
            images = [name for name in names if is_image_name(name)]
            ignored += len(names) - len(images)
            if images:
                rows.add(base, images, classes.index(d.name), split)
    return ignored


def scan_dataset(image_dir: str | os.PathLike, *, val_dir: str | os.PathLike | None = None,
                 test_dir: str | os.PathLike | None = None, validation_percentage: float = 10,
                 testing_percentage: float = 10, workers: int = 4, quiet: bool = False,
                 split_records: Path | None = None, empty_classes_allowed: bool = False) -> Dataset:
    """Scan, hash and split `image_dir`; fixed splits come from split folders or val/test dirs.

    split_records: the folder of split records (see split.py) that keeps every photo's split
    as photos are added; None splits by the rule alone.
    """
    image_dir = Path(image_dir)
    if not 0 <= validation_percentage < 100 or not 0 <= testing_percentage < 100 \
            or validation_percentage + testing_percentage >= 100:
        raise UserError("--validation_percentage and --testing_percentage must be in [0, 100) "
                        "and leave images for training")
    train_dir, fixed = _split_folders(image_dir, val_dir, test_dir)
    classes = [d.name for d in class_folders(train_dir)]
    if len(classes) < 2:
        raise UserError(f"{train_dir} needs at least 2 class folders (one sub-folder per class, "
                        f"images inside); found {len(classes)}: {', '.join(classes) or 'none'}")
    rows, unreadable = _Rows(), []
    ignored = _labelled_files(train_dir, classes, NO_SPLIT, rows, unreadable)
    empty = [c for c, n in zip(classes, rows.per_label(len(classes))) if n == 0]
    if empty and not empty_classes_allowed:  # training cannot learn them; `retrain doctor` reports them
        why = {path.name: reason for path, reason in unreadable if path.parent == train_dir}
        raise UserError(f"class folder(s) with no images in {train_dir}: "
                        + ", ".join(f"{c} ({why[c]})" if c in why else c for c in empty)
                        + f" (supported: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    for split, folder in fixed.items():
        ignored += _labelled_files(folder, classes, SPLITS.index(split), rows, unreadable)

    percentages = _carved(fixed, validation_percentage, testing_percentage)
    columns = rows.columns()
    samples, skipped = _hashed_samples(columns, workers, quiet)
    carved = samples.splits == NO_SPLIT
    record = split_records and record_path(split_records, train_dir, *percentages)
    codes, too_small = assign_recorded(samples.keys[carved], samples.labels[carved], len(classes), *percentages,
                                       record)
    columns.splits[samples.rows_of(carved)] = codes
    return Dataset(classes, samples, unreadable + skipped, ignored, split_folders=fixed,
                   unsplit_classes=[classes[c] for c in too_small])


def _split_folders(image_dir: Path, val_dir: str | os.PathLike | None, test_dir: str | os.PathLike | None
                   ) -> tuple[Path, dict[str, Path]]:
    """(the training folder, {held-out split: its folder}) from split folders or --val_dir/--test_dir."""
    split_dirs = find_split_dirs(image_dir)
    fixed = {"validation": val_dir and Path(val_dir) or split_dirs.get("validation"),
             "test": test_dir and Path(test_dir) or split_dirs.get("test")}
    return split_dirs.get("train", image_dir), {split: folder for split, folder in fixed.items() if folder}


def _carved(fixed: dict[str, Path], validation_percentage: float, testing_percentage: float) -> tuple[float, float]:
    """The percentages carved out of the training folder: 0 for a split that has a folder of its own."""
    return (0 if "validation" in fixed else validation_percentage, 0 if "test" in fixed else testing_percentage)


def split_record_of(image_dir: str | os.PathLike, val_dir: str | os.PathLike | None, test_dir: str | os.PathLike | None,
                    validation_percentage: float, testing_percentage: float, split_records: Path) -> Path:
    """The split record that training `image_dir` with these settings keeps (split.py)."""
    train_dir, fixed = _split_folders(Path(image_dir), val_dir, test_dir)
    return record_path(split_records, train_dir, *_carved(fixed, validation_percentage, testing_percentage))


def _hashed_samples(columns: Columns, workers: int, quiet: bool) -> tuple[SampleTable, list[tuple[Path, str]]]:
    """Fill in the digests of walked `columns`; the readable rows, and the others with the reason.

    Streams: digests go straight into the digest column as they arrive, and no per-image
    object is kept.
    """
    walked = SampleTable(columns)
    readable = np.ones(len(walked), bool)
    skipped = []
    for i, digest in enumerate(_hash_all(walked.paths, len(walked), workers, quiet)):
        if isinstance(digest, Exception):
            readable[i] = False
            skipped.append((walked.path(i), read_failure(digest)))
        else:
            columns.digests[i] = np.frombuffer(digest, np.uint8)
    return (walked if readable.all() else walked[readable]), skipped


def scan_labelled_folder(folder: str | os.PathLike, classes: list[str], workers: int = 4,
                         quiet: bool = False) -> Dataset:
    """Scan an evaluation folder whose class folders must be among `classes`."""
    rows, unreadable = _Rows(), []
    ignored = _labelled_files(Path(folder), list(classes), SPLITS.index("test"), rows, unreadable)
    if not len(rows):
        raise UserError(f"no images found in the class folders of {folder}"
                        + "".join(f"; {path}: {reason}" for path, reason in unreadable[:3]))
    samples, skipped = _hashed_samples(rows.columns(), workers, quiet)
    return Dataset(list(classes), samples, unreadable + skipped, ignored, split_folders={"test": Path(folder)})
