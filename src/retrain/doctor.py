"""`retrain doctor`: what is wrong with a folder of labelled photos, before you train on it.

Each check is one function returning plain data; `diagnose` runs them in order of cost and
`format_text` / `Report.to_dict` present the result. The scan-only checks live in checks.py
(`quick_summary` is what `retrain train` prints).

| check | needs | how |
|---|---|---|
| counts per class and split, few images, imbalance | scan | `class_counts`, `count_warnings` |
| exact duplicates within a class, across classes, across splits | scan | sha256 of the bytes |
| formats, modes, animation, tiny and huge images | file headers | PIL, no pixels decoded |
| unreadable files and why | features pass | the decoder's reason |
| near-duplicates | 64 px decode | 256-bit DCT perceptual hash, mirror-invariant |
| outliers | cached features | nearest-neighbour cosine under 0.6 x the dataset's median |
| suspected mislabels | cached features | k-fold out-of-fold probability of the own label, training's head |

Measured with Lite0 (see benchmarks/doctor_planted.py): recompressed, greyed, half- and
quarter-size and mirrored copies of hymenoptera photos are at most 18 hash bits (of 256) from
their original and brightened ones up to 34; distinct photos are 92+ apart in hymenoptera and
42+ in sign_language_digits (hands on one background, where a 64-bit hash confused ~1,000
pairs). Flat, detail-poor images hash less stably (a JPEG q50 copy of a smooth synthetic image
can move 60 bits), so some of their copies are missed. Feature cosine cannot tell a half-size
copy (0.72) from a sibling photo (0.80), so near-duplicates use the hash, and features serve
outliers and mislabels. Mislabels are not looked for in a small class that another outnumbers
(`too_small_to_judge`).
"""
from __future__ import annotations

import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from .backbones import get_backbone
from .config import DEFAULT_BACKBONE, HeadConfig
from .checks import (ACROSS_SPLITS, IMBALANCE_RATIO, KINDS, MEANING, MIN_IMAGES, DuplicateGroup, Entry, entry_at,
                     duplicate_kind, display_path, class_counts, count_warnings, exact_duplicates, why_none_held_out)
from .features import compute_features, feature_matrix, store_folder
from .graphs import extractor_path
from .runtime import decoded_batches
from .files import default_cache_dir
from .guards import open_regular
from .head import predict_proba, train_head
from .preprocess import Preprocessing
from .progress import Stopwatch
from .scan import Dataset, SampleTable, find_split_dirs, scan_dataset

TINY_SIDE = 32  # pixels, shorter side
HUGE_PIXELS = 50_000_000  # slow to decode; over 64 MP after JPEG draft scaling they are refused
RARE_FORMAT_SHARE = 0.05  # a format under this share of the files has its files listed
HASH_PREP = Preprocessing(size=64, crop_fraction=1.0)  # whole centre square at 64x64, for the DCT
HASH_SIDE = 16  # the 16x16 lowest DCT frequencies: a 256-bit hash
HASH_BITS = HASH_SIDE * HASH_SIDE
NEAR_DUPLICATE_BITS = 32  # perceptual-hash distance at or under which two images are near-duplicates
# An outlier's most similar image is under this fraction of the median image's nearest similarity.
# A ratio, not a z-score: on sign_language_digits (one background, similarities tightly packed)
# z >= 4 flagged 35 ordinary photos; the ratio flags none there and hymenoptera's placeholder GIF
# (0.28 of the median) and four odd photos (ant bait, a wall, a larva: 0.53-0.55).
OUTLIER_RATIO = 0.6
MIN_FOR_STATISTICS = 20  # images needed before outliers and mislabels mean anything
# Suspected mislabels are not looked for in a class of under MIN_IMAGES photos (checks.py's "few images"
# bar) that another class outnumbers OUTNUMBERED times or more: each fold's model has seen few of it and
# prefers the bigger class even for photos labelled right. On intel_scenes (lite0, 7 class pairs x 3
# draws, every label right) such classes had 18-46% of their photos flagged (4 beside 30: 46%, 12 beside
# 24: 18%), balanced ones 9-12% (12 beside 12: 12%, so a small balanced folder keeps the check).
OUTNUMBERED = 2.0
FOLDS = 5
OOF_EPOCHS = 60  # head training per fold, in passes over the training folds
BLOCK = 512  # rows per block of the pairwise computations: memory stays O(BLOCK * N)



# ---------------------------------------------------------------- plain data

@dataclass
class ImageFile:
    path: str
    format: str
    mode: str
    width: int
    height: int
    animated: bool


@dataclass
class Unreadable:
    path: str
    reason: str


@dataclass
class NearDuplicate:
    kind: str
    a: Entry
    b: Entry
    distance: int  # perceptual-hash bits that differ (mirror image included), 0-HASH_BITS


@dataclass
class Outlier:
    image: Entry
    nearest_similarity: float  # cosine of the backbone features to the most similar other image
    relative: float  # nearest_similarity / the dataset's median nearest similarity


@dataclass
class Suspect:
    image: Entry
    own_probability: float  # out-of-fold probability of the folder's label
    preferred: str  # the label the model prefers
    preferred_probability: float


@dataclass
class Report:
    image_dir: str
    backbone: str
    classes: list[str]
    fixed_split: bool
    counts: dict[str, dict[str, int]]  # class -> split -> images
    warnings: list[str]
    ignored_files: int  # files without an image extension
    unreadable: list[Unreadable]
    formats: dict[str, int]
    modes: dict[str, int]
    rare_formats: list[ImageFile]
    animated: list[ImageFile]
    tiny: list[ImageFile]
    huge: list[ImageFile]
    exact_duplicates: list[DuplicateGroup]
    near_duplicates: list[NearDuplicate]
    outliers: list[Outlier] | None  # None: not checked (see notes)
    suspects: list[Suspect] | None
    mislabels_unchecked: list[str] = field(default_factory=list)  # classes too small to judge (see notes)
    notes: list[str] = field(default_factory=list)  # checks that could not run, and why
    thresholds: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    unhashed: int = 0  # of the unreadable, files not even read (pipes, devices, folders unlisted): not in `counts`

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- counts

def empty_split_warnings(counts: dict[str, dict[str, int]], unsplit: list[str], folders: dict[str, str]) -> list[str]:
    """Held-out splits with no photo of any class (checks.split_warnings speaks only of splits that have some).

    folders: {split: folder} for the splits that come from a folder of their own rather than carved out of train.
    """
    empty = [split for split in ("validation", "test") if not any(n[split] for n in counts.values())]
    if not any(n["train"] for n in counts.values()):  # no photos at all: count_warnings says so
        return []
    warnings = [f"the {split} folder {folders[split]} holds no readable photo of these classes: {split} accuracy "
                "cannot be measured; put photos in its class folders" for split in empty if split in folders]
    carved = [split for split in empty if split not in folders]
    if carved:
        warnings.append(f"no {' or '.join(carved)} photos of any class ({' and '.join(carved)} accuracy cannot be "
                        f"measured): {why_none_held_out(unsplit)}")
    return warnings


# ---------------------------------------------------------------- file checks

def read_header(path: Path, root: Path | None = None) -> ImageFile | None:
    """Format, mode and size from the file header (no pixels decoded); None if it does not open."""
    try:
        with open_regular(path) as f, Image.open(f) as img:
            return ImageFile(display_path(path, root), img.format or "unknown", img.mode, img.width, img.height,
                             bool(getattr(img, "is_animated", False)))
    except Exception:  # any hostile file: the decode pass reports it with the decoder's reason
        return None


def rare_formats(files: list[ImageFile]) -> list[ImageFile]:
    counts = Counter(f.format for f in files)
    return [f for f in files if counts[f.format] < RARE_FORMAT_SHARE * len(files)]


def tiny_images(files: list[ImageFile]) -> list[ImageFile]:
    return [f for f in files if min(f.width, f.height) < TINY_SIDE]


def huge_images(files: list[ImageFile]) -> list[ImageFile]:
    return [f for f in files if f.width * f.height > HUGE_PIXELS]


def unreadable_files(dataset: Dataset, failures: dict[str, str], root: Path | None) -> list[Unreadable]:
    """Files the scan could not read, then files the decoder refused, with the reason."""
    found = [Unreadable(display_path(p, root), why) for p, why in dataset.skipped]
    t = dataset.samples
    return found + [Unreadable(display_path(t.path(i), root), failures[t.digest_hex(i)])
                    for i in np.flatnonzero(t.has_digest(failures))]


# ---------------------------------------------------------------- near-duplicates

def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)
    return np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n))


_DCT = _dct_matrix(HASH_PREP.size)
_GREY = np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's "L"


def _phash(grey: np.ndarray) -> np.ndarray:
    """(n, 64, 64) grey -> (n, 256) bits: the 16x16 lowest DCT frequencies above their median?"""
    low = (_DCT @ grey @ _DCT.T)[:, :HASH_SIDE, :HASH_SIDE].reshape(len(grey), HASH_BITS)
    bits = low > np.median(low[:, 1:], axis=1, keepdims=True)
    bits[:, 0] = False  # the DC term is brightness, not structure
    return bits


def perceptual_hashes(paths: Sequence[Path], workers: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, 256) hash bits, the same for the mirror image, and (n,) decoded?; decoded as training does."""
    n = len(paths)
    plain, mirrored, ok_mask = np.zeros((n, HASH_BITS), bool), np.zeros((n, HASH_BITS), bool), np.zeros(n, bool)
    for ok, batch, _failed in decoded_batches(paths, HASH_PREP, batch_size=64, workers=workers):
        if ok:
            grey = batch.astype(np.float64) @ _GREY
            plain[ok], mirrored[ok], ok_mask[ok] = _phash(grey), _phash(grey[:, :, ::-1]), True
    return plain, mirrored, ok_mask


def near_duplicate_pairs(plain: np.ndarray, mirrored: np.ndarray, valid: np.ndarray,
                         codes: np.ndarray) -> list[tuple[int, int, int]]:
    """(i, j, distance) for i < j with different content (codes) and hash distance <= NEAR_DUPLICATE_BITS."""
    # As +-1 vectors, bits that differ = (HASH_BITS - dot product) / 2: one matrix product per block.
    signs, mirror = (np.where(h, 1, -1).astype(np.float32) for h in (plain, mirrored))
    pairs = []
    for start in range(0, len(plain), BLOCK):
        rows = slice(start, start + BLOCK)
        agree = np.maximum(signs[rows] @ signs.T, signs[rows] @ mirror.T)
        dist = np.rint((HASH_BITS - agree) / 2).astype(np.int64)
        i = np.arange(start, start + dist.shape[0])[:, None]
        j = np.arange(len(plain))[None, :]
        hit = (dist <= NEAR_DUPLICATE_BITS) & (j > i) & (codes[rows, None] != codes[None, :]) \
            & valid[rows, None] & valid[None, :]
        for a, b in zip(*np.nonzero(hit)):
            pairs.append((start + int(a), int(b), int(dist[a, b])))
    return sorted(pairs, key=lambda p: (p[2], p[0], p[1]))


# ---------------------------------------------------------------- outliers

def nearest_similarity(x: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Cosine of each row to its most similar row of different content (-inf if there is none)."""
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    nearest = np.empty(len(x), np.float32)
    for start in range(0, len(x), BLOCK):
        sim = unit[start:start + BLOCK] @ unit.T
        sim[codes[start:start + BLOCK, None] == codes[None, :]] = -np.inf
        nearest[start:start + BLOCK] = sim.max(axis=1)
    return nearest


def relative_similarity(nearest: np.ndarray) -> np.ndarray:
    """Each nearest similarity over the median one (NaN where undefined: no other content, too few
    images, or a backbone whose features are not mostly alike)."""
    finite = np.isfinite(nearest)
    median = np.median(nearest[finite]) if finite.sum() >= MIN_FOR_STATISTICS else 0.0
    if median <= 0:
        return np.full(len(nearest), np.nan)
    return np.where(finite, nearest / median, np.nan)


# ---------------------------------------------------------------- suspected mislabels

def assign_folds(y: np.ndarray, codes: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold per sample, stratified by label; identical content always shares a fold (no leak between folds)."""
    rng = np.random.default_rng(seed)
    _, first = np.unique(codes, return_index=True)  # one row per content, in content-code order
    group_label, group_fold = y[first], np.zeros(len(first), np.int64)
    for label in np.unique(group_label):
        groups = np.flatnonzero(group_label == label)
        group_fold[groups[rng.permutation(len(groups))]] = np.arange(len(groups)) % folds
    return group_fold[codes]


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    # A 1280-wide softmax is too small to gain from threads, and on a busy 2-core machine two
    # spinning torch threads made the same 5 folds take 96 s instead of 1 s.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def out_of_fold_probabilities(x: np.ndarray, y: np.ndarray, codes: np.ndarray, n_classes: int,
                              folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """(N, C) probabilities, each row from the training head fitted on the other folds.

    Rows whose class is missing from their training folds are NaN: no model could predict them.
    """
    fold = assign_folds(y, codes, folds, seed)
    probs = np.full((len(y), n_classes), np.nan)
    with _one_torch_thread():
        for k in range(folds):
            train, held = fold != k, fold == k
            if not held.any() or not train.any():
                continue
            # No validation data: one evaluation at the end, so the last weights are kept.
            steps = int(np.clip(OOF_EPOCHS * train.sum() / HeadConfig.batch_size, 200, 2000))
            cfg = HeadConfig(steps=steps, eval_interval=steps, learning_rate=0.001, seed=seed)
            head = train_head(x[train], y[train], x[:0], y[:0], n_classes, cfg, log=lambda _: None)
            known = held & np.isin(y, y[train])
            probs[known] = predict_proba(head.layers, x[known])
    return probs


def rank_suspects(probs: np.ndarray, y: np.ndarray) -> list[int]:
    """Rows whose out-of-fold prediction is another label, lowest own-label probability first."""
    rows = np.arange(len(y))
    defined = ~np.isnan(probs).any(axis=1)
    own = np.where(defined, probs[rows, y], np.inf)
    disagree = defined & (np.nan_to_num(probs, nan=-1).argmax(axis=1) != y)
    return [int(i) for i in np.argsort(own, kind="stable") if disagree[i]]


# ---------------------------------------------------------------- the whole examination

def diagnose(image_dir: str | Path, *, backbone: str = DEFAULT_BACKBONE, cache_dir: str | Path | None = None,
             workers: int = 2, folds: int = FOLDS, seed: int = 0, quiet: bool = False,
             log: Callable[[str], None] | None = None) -> Report:
    """Run every check on a folder of class folders (or train/ val/ test/ folders)."""
    log = log or (lambda msg: None if quiet else print(msg, file=sys.stderr))
    root, timer = Path(image_dir), Stopwatch()
    cache = Path(cache_dir or default_cache_dir())
    with timer("scan"):
        dataset = scan_dataset(root, workers=workers + 2, quiet=quiet, split_records=cache / "splits",
                               empty_classes_allowed=True)  # reported below, beside the other problems
    with timer("headers"):
        files = [f for f in (read_header(p, root) for p in dataset.samples.paths) if f]
    net = get_backbone(backbone)
    with timer("features"):
        features, failures = compute_features(dataset.samples, net, extractor_path(net, cache), store_folder(cache),
                                              workers=workers, quiet=quiet)
    usable = dataset.samples[features.covers(dataset.samples)]

    def entry(i: int) -> Entry:
        return entry_at(usable, i, dataset.classes, root)
    codes = np.unique(usable.keys, return_inverse=True)[1].astype(np.int64)  # content ids
    log("Checking for near-duplicates ...")
    with timer("near_duplicates"):
        near = _near_duplicates(usable, entry, codes, workers)
    report = Report(
        image_dir=str(root), backbone=net.name, classes=dataset.classes, fixed_split=dataset.fixed_split,
        counts=class_counts(dataset), warnings=_count_warnings(dataset, root), ignored_files=dataset.ignored,
        unreadable=unreadable_files(dataset, failures, root), unhashed=len(dataset.skipped),
        formats=dict(Counter(f.format for f in files).most_common()),
        modes=dict(Counter(f.mode for f in files).most_common()),
        rare_formats=rare_formats(files), animated=[f for f in files if f.animated],
        tiny=tiny_images(files), huge=huge_images(files),
        exact_duplicates=[g for g in exact_duplicates(dataset, root) if g.digest not in failures],
        near_duplicates=near, outliers=None, suspects=None,
        thresholds={"min_images": MIN_IMAGES, "imbalance_ratio": IMBALANCE_RATIO, "tiny_side": TINY_SIDE,
                    "huge_pixels": HUGE_PIXELS, "near_duplicate_bits": NEAR_DUPLICATE_BITS, "hash_bits": HASH_BITS,
                    "outlier_ratio": OUTLIER_RATIO, "folds": folds,
                    "mislabels_outnumbered": OUTNUMBERED},
        seconds=timer.seconds)
    if len(usable) < MIN_FOR_STATISTICS:
        report.notes.append(f"outliers and mislabels need {MIN_FOR_STATISTICS}+ readable images; "
                            f"found {len(usable)}")
        return report
    x, y = feature_matrix(usable, features, net.feature_dim)
    with timer("outliers"):
        report.outliers = _outliers(x, codes, entry)
    photos = photos_per_class(y, codes, len(dataset.classes))
    if (photos > 0).sum() < 2:  # one class alone: no other label could be preferred, so no count of 0
        report.notes.append("mislabels need photos of two classes or more to compare; only "
                            f"{dataset.classes[int(np.argmax(photos))]} has readable photos")
        return report
    too_small = too_small_to_judge(photos)
    if too_small.any():
        report.mislabels_unchecked = [dataset.classes[c] for c in np.flatnonzero(too_small)]
        report.notes.append(_unchecked_note(report.mislabels_unchecked, photos, dataset.classes))
    log(f"Looking for mislabelled images ({folds}-fold cross-validation) ...")
    with timer("mislabels"):
        probs = out_of_fold_probabilities(x, y, codes, len(dataset.classes), folds, seed)
        report.suspects = _suspects(probs, y, entry, dataset.classes, judged=~too_small[y])
    return report


def _count_warnings(dataset: Dataset, root: Path) -> list[str]:
    counts = class_counts(dataset)
    folders = {split: display_path(folder, root) + "/" for split, folder in find_split_dirs(root).items()}
    return count_warnings(counts) + empty_split_warnings(counts, dataset.unsplit_classes, folders)


def _unchecked_note(unchecked: list[str], photos: np.ndarray, classes: list[str]) -> str:
    sizes = ", ".join(f"{c} ({photos[classes.index(c)]} photos)" for c in unchecked)
    biggest = classes[int(photos.argmax())]
    return (f"suspected mislabels are not looked for in {sizes}, beside {photos.max()} of {biggest}: in a class of "
            f"under {MIN_IMAGES} photos that another outnumbers {OUTNUMBERED:g}x or more, each fold's model has seen "
            "too few of it and prefers the bigger class even for photos labelled right, so a suspect there would say "
            "more about the class's size than about its label")


def _near_duplicates(usable: SampleTable, entry: Callable[[int], Entry], codes: np.ndarray,
                     workers: int) -> list[NearDuplicate]:
    _, first = np.unique(codes, return_index=True)  # decode each distinct content once
    plain, mirrored, ok = (h[codes] for h in perceptual_hashes(usable[first].paths, workers))
    pairs = [(entry(i), entry(j), d) for i, j, d in near_duplicate_pairs(plain, mirrored, ok, codes)]
    return [NearDuplicate(duplicate_kind([a, b]), a, b, d) for a, b, d in pairs]


def _outliers(x: np.ndarray, codes: np.ndarray, entry: Callable[[int], Entry]) -> list[Outlier]:
    nearest = nearest_similarity(x, codes)
    relative = relative_similarity(nearest)
    return [Outlier(entry(i), round(float(nearest[i]), 4), round(float(relative[i]), 3))
            for i in np.argsort(relative, kind="stable") if relative[i] <= OUTLIER_RATIO]


def too_small_to_judge(photos: np.ndarray) -> np.ndarray:
    """(C,) bool from photos per class: too few photos, beside a bigger class, for their suspects to mean anything."""
    return (photos > 0) & (photos < MIN_IMAGES) & (photos.max() >= OUTNUMBERED * photos)


def photos_per_class(y: np.ndarray, codes: np.ndarray, n_classes: int) -> np.ndarray:
    """(C,) distinct photos (by content) per class: copies share a fold, so they teach its model nothing more."""
    labels = np.unique(np.stack([y, codes]), axis=1)[0]
    return np.bincount(labels, minlength=n_classes)


def _suspects(probs: np.ndarray, y: np.ndarray, entry: Callable[[int], Entry], classes: list[str],
              judged: np.ndarray) -> list[Suspect]:
    """Suspects among the rows where `judged` is set (their class is big enough to tell a wrong label)."""
    return [Suspect(entry(i), round(float(probs[i, y[i]]), 4), classes[int(probs[i].argmax())],
                    round(float(probs[i].max()), 4)) for i in rank_suspects(probs, y) if judged[i]]


# ---------------------------------------------------------------- text

SHOW = 15  # items per list in the text report; --json has them all


def _more(items: list, show: int = SHOW) -> list[str]:
    return [f"    ... and {len(items) - show} more (--json lists all)"] if len(items) > show else []


def _counts_table(report: Report) -> list[str]:
    width = max(12, *(len(c) for c in report.classes)) + 2
    lines = [f"  {'class':<{width}}{'train':>7}{'validation':>12}{'test':>7}{'total':>8}"]
    for c, n in report.counts.items():
        lines.append(f"  {c:<{width}}{n['train']:>7}{n['validation']:>12}{n['test']:>7}{sum(n.values()):>8}")
    return lines


def _file_lines(report: Report) -> list[str]:
    def size(f: ImageFile) -> str:
        return f"{f.path} ({f.format} {f.mode}, {f.width}x{f.height})"

    lines = ["  formats: " + (", ".join(f"{k} {v}" for k, v in report.formats.items()) or "none"),
             "  modes:   " + (", ".join(f"{k} {v}" for k, v in report.modes.items()) or "none")]
    for title, items in ((f"rare formats (under {RARE_FORMAT_SHARE:.0%} of the files)", report.rare_formats),
                         ("animated (the first frame is used)", report.animated),
                         (f"tiny (shorter side under {TINY_SIDE} px: upscaled, little detail)", report.tiny),
                         (f"huge (over {HUGE_PIXELS / 1e6:.0f} megapixels: slow to decode)", report.huge)):
        if items:
            lines += [f"  ! {title}: {len(items)}"] + [f"    {size(f)}" for f in items[:SHOW]] + _more(items)
    if report.unreadable:
        lines.append(f"  ! unreadable, skipped by training: {len(report.unreadable)}")
        lines += [f"    {u.path}: {u.reason}" for u in report.unreadable[:SHOW]] + _more(report.unreadable)
    else:
        lines.append("  unreadable: none")
    if report.ignored_files:
        lines.append(f"  {report.ignored_files} file(s) without an image extension ignored")
    return lines


def _duplicate_lines(report: Report) -> list[str]:
    lines = []
    for kind in KINDS:
        groups = [g for g in report.exact_duplicates if g.kind == kind]
        mark = "!" if groups else " "
        lines.append(f"  {mark} exact, {kind}: {len(groups) or 'none'}" + (f" - {MEANING[kind]}" if groups else ""))
        for g in groups[:SHOW]:
            lines.append("    " + " = ".join(f"{e.path}" + (f" [{e.split}]" if kind == ACROSS_SPLITS else "")
                                            for e in g.images))
        lines += _more(groups)
    near = report.near_duplicates
    lines.append(f"  {'!' if near else ' '} near (perceptual hash within {NEAR_DUPLICATE_BITS} of {HASH_BITS} bits, "
                 f"mirror images included): {len(near) or 'none'}")
    for p in near[:SHOW]:
        lines.append(f"    {p.kind:<14} {p.a.path} [{p.a.split}] ~ {p.b.path} [{p.b.split}]  ({p.distance} bits)")
    return lines + _more(near)


def _outlier_lines(report: Report) -> list[str]:
    if report.outliers is None:
        return ["  not checked (see the note below)"]
    if not report.outliers:
        return ["  none"]
    return [f"  ! {o.image.path} [{o.image.label}]  nearest similarity {o.nearest_similarity:.2f} "
            f"({o.relative:.2f} of the median)" for o in report.outliers[:SHOW]] + _more(report.outliers)


def _suspect_lines(report: Report) -> list[str]:
    if report.suspects is None:
        return ["  not checked (see the note below)"]
    unchecked = [f"  not checked in {', '.join(report.mislabels_unchecked)}: too few photos beside the bigger "
                 "classes (see the note below)"
                 ] if report.mislabels_unchecked else []
    if not report.suspects:
        where = " in the classes checked" if unchecked else ""
        return [f"  none{where}: every image's own label is the one the cross-validated model prefers"] + unchecked
    width = max(len(s.image.path) for s in report.suspects[:SHOW])
    lines = [f"  {'p(own)':>7}  {'image':<{width}}  label -> model prefers"]
    for s in report.suspects[:SHOW]:
        lines.append(f"  {s.own_probability:>7.3f}  {s.image.path:<{width}}  {s.image.label} -> "
                     f"{s.preferred} ({s.preferred_probability:.2f})")
    return lines + _more(report.suspects) + unchecked


def format_text(report: Report) -> str:
    n = sum(sum(c.values()) for c in report.counts.values()) + report.unhashed  # every image file, read or not
    split = "fixed split folders" if report.fixed_split else "split by class, stable as photos are added"
    outliers, suspects = len(report.outliers or []), len(report.suspects or [])
    out = [f"retrain doctor: {report.image_dir}",
           f"{n} image files in {len(report.classes)} classes, {len(report.unreadable)} of them unreadable "
           f"({split}); backbone {report.backbone}", "",
           "Classes"] + _counts_table(report)
    out += [f"  ! {w}" for w in report.warnings] or ["  counts look fine"]
    out += ["", "Files"] + _file_lines(report)
    out += ["", "Duplicates"] + _duplicate_lines(report)
    out += ["", f"Outliers (unlike every other image: most similar image under {OUTLIER_RATIO:.0%} of the "
                "usual nearest-neighbour feature similarity)"] + _outlier_lines(report)
    out += ["", f"Suspected mislabels ({report.thresholds.get('folds', FOLDS)}-fold out-of-fold probability "
                "of the folder's label, lowest first)" + (f": {suspects}" if report.suspects is not None else "")
            ] + _suspect_lines(report)
    out += [f"Note: {note}" for note in report.notes]
    problems = (len(report.warnings) + len(report.unreadable) + len(report.tiny) + len(report.huge)
                + len(report.exact_duplicates) + len(report.near_duplicates) + outliers + suspects)
    out += ["", f"Summary: {len(report.warnings)} warning(s), {len(report.unreadable)} unreadable, "
                f"{len(report.tiny)} tiny and {len(report.huge)} huge image(s), "
                f"{len(report.exact_duplicates)} exact and {len(report.near_duplicates)} near duplicate(s), "
                f"{_findings_summary(report)}" + ("" if problems or report.notes else ": nothing to fix")]
    return "\n".join(out)


def _findings_summary(report: Report) -> str:
    """Outliers and suspects as counted, or "not checked": a check that did not run has no count, not 0."""
    outliers = "outliers not checked" if report.outliers is None else f"{len(report.outliers)} outlier(s)"
    if report.suspects is None:
        return f"{outliers}, mislabels not checked"
    unchecked = f" ({', '.join(report.mislabels_unchecked)} not checked)" if report.mislabels_unchecked else ""
    return f"{outliers}, {len(report.suspects)} suspected mislabel(s){unchecked}"
