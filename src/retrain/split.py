"""Stable, stratified splits: which photos of each class are held out for validation and test.

retrain.py's rule, a photo's split from a hash of that photo alone, is stable but not
stratified: a class of 20 photos gets no validation photo one time in eight (0.9^20), and a
30+30 folder once gave "validation 2, test 5", all bees. No rule that looks at one photo alone
can promise every class held-out photos, and a rule that looks at the others cannot stay
stable as photos are added unless it remembers. So the split is a rule plus a record:

- a photo already in the record (by content) keeps its split;
- in each class, the photos not yet recorded, in the order of their content hash, first fill
  what the class lacks of its validation and test share (round(n x percentage), at least one
  each), and the rest train;
- a class of fewer than MIN_HELD_OUT photos is all trained on, and named in a warning.

Without a record the rule alone gives the same split for the same photos on any machine.
Exact duplicates are one photo here, so they always share a split.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from .files import atomic_write_bytes

TRAIN, VALIDATION, TEST = 0, 1, 2  # indices into scan.SPLITS
UNASSIGNED = -1
MIN_HELD_OUT = 5  # a class needs this many photos before any of them is held out


@dataclass(frozen=True)
class SplitRecord:
    """Splits already given, by content: (m,) S32 raw sha256 keys, sorted, and their split codes."""
    keys: np.ndarray
    codes: np.ndarray

    @classmethod
    def empty(cls) -> SplitRecord:
        return cls(np.empty(0, "S32"), np.empty(0, np.int8))

    @classmethod
    def load(cls, path: Path) -> SplitRecord:
        """The record at `path`; empty if there is none or it cannot be read (the rule then decides afresh)."""
        try:
            with np.load(path) as f:
                keys, codes = f["keys"], f["codes"]
        except (OSError, ValueError, KeyError):
            return cls.empty()
        if keys.dtype != np.dtype("S32") or codes.shape != keys.shape or np.any(keys[1:] <= keys[:-1]):
            return cls.empty()
        return cls(keys, codes.astype(np.int8))

    def save(self, path: Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, keys=self.keys, codes=self.codes)
        atomic_write_bytes(path, buf.getvalue())

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The recorded code of each key, UNASSIGNED where there is none."""
        out = np.full(len(keys), UNASSIGNED, np.int8)
        if len(self.keys):
            at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
            found = self.keys[at] == keys
            out[found] = self.codes[at[found]]
        return out

    def merged(self, keys: np.ndarray, codes: np.ndarray) -> SplitRecord:
        """This record plus (keys, codes); a key recorded before keeps its old code.

        Photos no longer in the folder stay recorded, so one put back returns to its old split.
        """
        all_keys = np.concatenate([self.keys, keys])
        all_codes = np.concatenate([self.codes, codes])
        uniq, first = np.unique(all_keys, return_index=True)  # first occurrence: the old record wins
        return SplitRecord(uniq, all_codes[first])


def held_out_targets(n: int, validation_percentage: float, testing_percentage: float) -> tuple[int, int] | None:
    """(validation, test) photos a class of n unique photos should hold out; None if it is too small."""
    if n < MIN_HELD_OUT:
        return None
    want = [max(1, round(n * pct / 100)) if pct > 0 else 0 for pct in (validation_percentage, testing_percentage)]
    while sum(want) > n - 1:  # keep at least one training photo
        want[int(want[1] > want[0])] -= 1
    return want[0], want[1]


def assign(keys: np.ndarray, labels: np.ndarray, n_classes: int, validation_percentage: float,
           testing_percentage: float, record: SplitRecord) -> tuple[np.ndarray, list[int]]:
    """Split codes for photos (keys: (n,) S32 content hashes, labels: (n,) class indices).

    Returns the codes and the classes too small to hold any photo out (only when something
    was asked to be held out).
    """
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)  # sorted: content-hash order
    codes = record.lookup(uniq)
    owner = labels[first].astype(np.int64)  # a photo in two classes counts for the first one it is found in
    by_class = np.argsort(owner, kind="stable")  # hash order kept within each class
    bounds = np.r_[0, np.cumsum(np.bincount(owner, minlength=n_classes))]
    too_small = []
    for c in range(n_classes):
        members = by_class[bounds[c]:bounds[c + 1]]
        new = members[codes[members] == UNASSIGNED]
        targets = held_out_targets(len(members), validation_percentage, testing_percentage)
        if targets is None:
            too_small += [c] if validation_percentage + testing_percentage > 0 else []
            codes[new] = TRAIN
            continue
        need_val = max(0, targets[0] - int(np.sum(codes[members] == VALIDATION)))
        need_test = max(0, targets[1] - int(np.sum(codes[members] == TEST)))
        codes[new[:need_val]] = VALIDATION
        codes[new[need_val:need_val + need_test]] = TEST
        codes[new[need_val + need_test:]] = TRAIN
    return codes[inverse.ravel()], too_small


def record_path(record_dir: Path, folder: Path, validation_percentage: float, testing_percentage: float) -> Path:
    """Where the split record of `folder` split at these percentages lives."""
    key = f"{folder.resolve()}|{validation_percentage:g}|{testing_percentage:g}"
    return record_dir / f"{hashlib.sha256(key.encode('utf-8', 'surrogateescape')).hexdigest()[:20]}.npz"


def assign_recorded(keys: np.ndarray, labels: np.ndarray, n_classes: int, validation_percentage: float,
                    testing_percentage: float, path: Path | None) -> tuple[np.ndarray, list[int]]:
    """assign() against the record at `path` (None: the rule alone), then add the new photos to it.

    Under a file lock, so two runs on one folder cannot give a photo two splits. A record that
    cannot be written (read-only cache) leaves this run's split correct, only not remembered.
    """
    if path is None:
        return assign(keys, labels, n_classes, validation_percentage, testing_percentage, SplitRecord.empty())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock", timeout=60)
        lock.acquire()
    except (OSError, Timeout):  # an unwritable cache, or a run holding the record for over a minute
        return assign(keys, labels, n_classes, validation_percentage, testing_percentage, SplitRecord.load(path))
    try:
        record = SplitRecord.load(path)
        codes, too_small = assign(keys, labels, n_classes, validation_percentage, testing_percentage, record)
        fresh = record.lookup(keys) == UNASSIGNED
        if fresh.any():
            try:
                record.merged(keys[fresh], codes[fresh]).save(path)
            except OSError:
                pass  # see the docstring: correct now, not remembered
        return codes, too_small
    finally:
        lock.release()
