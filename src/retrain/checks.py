"""Checks that need only the scan (no image decoded): counts, missing or tiny splits, exact duplicates.

`retrain train` prints them before it extracts anything; `retrain doctor` (doctor.py) adds the
checks that decode images or need features.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decode import describe
from .evidence import TOO_FEW_TO_MEASURE
from .scan import SPLITS, Dataset, SampleTable
from .split import MIN_HELD_OUT

MIN_IMAGES = 20  # per class; fewer and accuracy is unreliable
MIN_TRAINING = 5  # training photos per class where photos were also held out; fewer barely teach it
IMBALANCE_RATIO = 4.0  # largest class / smallest class
EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()
ACROSS_CLASSES, ACROSS_SPLITS, WITHIN_CLASS = "across classes", "across splits", "within class"
KINDS = (ACROSS_CLASSES, ACROSS_SPLITS, WITHIN_CLASS)  # most serious first
MEANING = {
    ACROSS_CLASSES: "the same photo under two or more classes (it cannot be both)",
    ACROSS_SPLITS: "the same photo in two splits (leakage: validation/test accuracy is inflated)",
    WITHIN_CLASS: "the same photo more than once in one class (it counts double)",
}



@dataclass
class Entry:
    """One image as the report names it."""
    path: str  # relative to the image folder
    label: str
    split: str


@dataclass
class DuplicateGroup:
    kind: str  # one of KINDS
    digest: str
    images: list[Entry]


def display_path(path: Path, root: Path | None) -> str:
    if root is None:
        return describe(path)
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # a --val_dir elsewhere
        return str(path)


def entry_at(samples: SampleTable, i: int, classes: list[str], root: Path | None) -> Entry:
    """Row i as the report names it: made only for images a check reports, not for every image."""
    return Entry(display_path(samples.path(i), root), classes[samples.labels[i]], SPLITS[samples.splits[i]])


def duplicate_kind(entries: list[Entry]) -> str:
    if len({e.label for e in entries}) > 1:
        return ACROSS_CLASSES
    if len({e.split for e in entries}) > 1:
        return ACROSS_SPLITS
    return WITHIN_CLASS


def class_counts(dataset: Dataset) -> dict[str, dict[str, int]]:
    t, n = dataset.samples, len(SPLITS)
    cells = np.bincount(t.labels.astype(np.int64) * n + t.splits, minlength=len(dataset.classes) * n)
    return {c: dict(zip(SPLITS, row.tolist())) for c, row in zip(dataset.classes, cells.reshape(-1, n))}


def count_warnings(counts: dict[str, dict[str, int]]) -> list[str]:
    totals = {c: sum(per_split.values()) for c, per_split in counts.items()}
    empty = [c for c, n in totals.items() if n == 0]
    warnings = [f"no images in {', '.join(empty)}: training refuses an empty class folder; add photos or remove "
                f"{'it' if len(empty) == 1 else 'them'}"] if empty else []
    few = [f"{c} ({n})" for c, n in totals.items() if 0 < n < MIN_IMAGES]
    if few:
        warnings.append(f"few images (<{MIN_IMAGES}) for {', '.join(few)}: accuracy will be unreliable; "
                        "aim for 50+ per class")
    warnings += split_warnings(counts)
    if totals:
        big, small = max(totals, key=totals.get), min(totals, key=totals.get)
        if totals[small] and totals[big] / totals[small] >= IMBALANCE_RATIO:
            warnings.append(f"heavy imbalance: {big} has {totals[big]} images, {small} only {totals[small]} "
                            f"({totals[big] / totals[small]:.0f}x); the model will favour the big classes: "
                            "add images to the small ones")
    return warnings


def split_warnings(counts: dict[str, dict[str, int]]) -> list[str]:
    """Classes without validation or test photos, and held-out splits too small to measure accuracy on."""
    warnings = []
    for split in ("validation", "test"):
        n = sum(per_split[split] for per_split in counts.values())
        missing = [c for c, per_split in counts.items() if not per_split[split]]
        if n and missing:
            warnings.append(f"no {split} photos of {', '.join(missing)}: {split} accuracy says nothing about "
                            f"{'them' if len(missing) > 1 else 'it'}; add photos to {'those classes' if len(missing) > 1 else 'that class'}")
        if 0 < n < TOO_FEW_TO_MEASURE:
            warnings.append(f"the {split} split has only {n} photo{'s' * (n != 1)}: too few to measure accuracy "
                            f"(a 95% interval spans tens of points); aim for 50+ photos per class")
    # Held-out percentages that leave a class a handful of photos to learn from (80% test, 19% validation).
    # (A class under MIN_IMAGES in all already has its warning.)
    thin = [f"{c} ({per_split['train']})" for c, per_split in counts.items()
            if sum(per_split.values()) >= MIN_IMAGES and per_split["train"] < MIN_TRAINING]
    if thin:
        warnings.append(f"only {', '.join(thin)} training photo(s) beside the held-out ones (<{MIN_TRAINING}): the "
                        "model learns those classes from too few; add training photos, or hold fewer out (lower "
                        "--validation_percentage and --testing_percentage, or move photos from val/ and test/)")
    return warnings


def why_none_held_out(unsplit: list[str]) -> str:
    """Why a split carved at a percentage holds no photo at all, and what to do."""
    instead = "or put held-out photos in val/ and test/ folders beside train/"
    if unsplit:
        return (f"a class needs {MIN_HELD_OUT}+ photos before any of it is held out, and {', '.join(unsplit)} "
                f"{'has' if len(unsplit) == 1 else 'have'} fewer; add photos (50+ per class), {instead}")
    # Every class is big enough now: the split recorded when they were smaller keeps those photos in training,
    # and the few added since filled validation first.
    return ("the split recorded for this folder in the cache (splits/) keeps the photos it first saw in training; "
            f"add more photos to every class, {instead}")


def exact_duplicates(dataset: Dataset, root: Path | None = None) -> list[DuplicateGroup]:
    """Groups of samples with identical bytes, most serious kind first."""
    t = dataset.samples
    order = np.argsort(t.keys, kind="stable")  # equal digests side by side, each run in scan order
    ordered = t.keys[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    groups = []
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
        members = order[start:start + size]
        digest = t.digest_hex(members[0])
        if digest != EMPTY_DIGEST:  # empty files are unreadable, not duplicates
            entries = [entry_at(t, i, dataset.classes, root) for i in members]
            groups.append(DuplicateGroup(duplicate_kind(entries), digest, entries))
    return sorted(groups, key=lambda g: (KINDS.index(g.kind), g.images[0].path))


def copies_of_training(split: dict[str, SampleTable]) -> int:
    """Test photos whose bytes are also among the training or validation photos (a test folder that
    overlaps the image folder, or copies in it): the model has seen them, so they inflate test accuracy."""
    seen = np.concatenate([split["train"].keys, split["validation"].keys])
    return int(np.isin(split["test"].keys, seen).sum())


def quick_summary(dataset: Dataset) -> list[str]:
    """The checks that need only the scan (no image is decoded), as short lines for `retrain train`."""
    lines = [f"Warning: {w}" for w in count_warnings(class_counts(dataset))]
    groups = exact_duplicates(dataset)
    for kind in KINDS:
        of_kind = [g for g in groups if g.kind == kind]
        if of_kind:
            example = " = ".join(e.path for e in of_kind[0].images[:2])
            lines.append(f"Warning: {len(of_kind)} exact duplicate(s), {MEANING[kind]}; e.g. {example}")
    if lines:
        lines.append("Run `retrain doctor` on the folder for the full list, near-duplicates and suspected mislabels.")
    return lines
