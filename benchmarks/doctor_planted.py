"""Does `retrain doctor` find problems planted in a real dataset?

Copies ../shared/datasets/hymenoptera into a temp folder, then plants:
  - exact duplicates within a class (a train photo copied beside itself under a new name),
  - the same photo in two classes (a train photo copied into the other class folder),
  - cross-split leaks (a val photo copied into the same class under train/),
  - flipped labels: 5% of the train photos moved to the other class folder,
runs the doctor and counts what it found: every planted duplicate group of the right kind,
and the flipped photos among its first 2 x (number flipped) suspected mislabels.

Run: python benchmarks/doctor_planted.py [--seeds 0 1 2] [--cache_dir DIR] [--report]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from retrain.checks import ACROSS_CLASSES, ACROSS_SPLITS, WITHIN_CLASS
from retrain.doctor import Report, diagnose, format_text

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DUPLICATES, CROSS_CLASS, LEAKS, FLIP_SHARE = 5, 3, 3, 0.05


def copy_tree(src: Path, dst: Path) -> None:
    """Copy the files only (the shared copy is read-only; its permissions must not come along)."""
    for folder, _, files in os.walk(src):
        target = dst / Path(folder).relative_to(src)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copyfile(Path(folder) / name, target / name)


def plant(root: Path, seed: int) -> dict[str, list]:
    """Plant the problems in `root` (a copy of hymenoptera); returns what was planted, as relative paths."""
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in (root / "train").iterdir())
    train = sorted(p.relative_to(root).as_posix() for p in (root / "train").glob("*/*.jpg"))
    val = sorted(p.relative_to(root).as_posix() for p in (root / "val").glob("*/*.jpg"))
    other = {classes[0]: classes[1], classes[1]: classes[0]}
    n_flip = round(FLIP_SHARE * len(train))
    picked = [train[i] for i in rng.choice(len(train), DUPLICATES + CROSS_CLASS + n_flip, replace=False)]
    dup, cross, flip = picked[:DUPLICATES], picked[DUPLICATES:DUPLICATES + CROSS_CLASS], picked[-n_flip:]
    planted: dict[str, list] = {WITHIN_CLASS: [], ACROSS_CLASSES: [], ACROSS_SPLITS: [], "flipped": []}
    for rel in dup:
        copy = str(Path(rel).with_name("copy of " + Path(rel).name))
        shutil.copyfile(root / rel, root / copy)
        planted[WITHIN_CLASS].append({rel, copy})
    for rel in cross:
        _, cls, name = Path(rel).parts
        copy = f"train/{other[cls]}/also {name}"
        shutil.copyfile(root / rel, root / copy)
        planted[ACROSS_CLASSES].append({rel, copy})
    for rel in (val[i] for i in rng.choice(len(val), LEAKS, replace=False)):
        _, cls, name = Path(rel).parts
        copy = f"train/{cls}/leaked {name}"
        shutil.copyfile(root / rel, root / copy)
        planted[ACROSS_SPLITS].append({rel, copy})
    for rel in flip:
        _, cls, name = Path(rel).parts
        moved = f"train/{other[cls]}/{name}"
        (root / rel).rename(root / moved)
        planted["flipped"].append(moved)
    return planted


def score(report: Report, planted: dict[str, list]) -> dict[str, tuple[int, int]]:
    """{problem: (planted, found)}; flipped labels count among the first 2 x flipped suspects."""
    groups = {kind: [{e.path for e in g.images} for g in report.exact_duplicates if g.kind == kind]
              for kind in (WITHIN_CLASS, ACROSS_CLASSES, ACROSS_SPLITS)}
    result = {kind: (len(planted[kind]), sum(any(pair <= g for g in groups[kind]) for pair in planted[kind]))
              for kind in groups}
    top = {s.image.path for s in report.suspects[:2 * len(planted["flipped"])]}
    result["flipped"] = (len(planted["flipped"]), len(top & set(planted["flipped"])))
    return result


def run(seed: int, cache_dir: str | None, show_report: bool) -> dict[str, tuple[int, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "hymenoptera"
        copy_tree(SHARED / "hymenoptera", root)
        planted = plant(root, seed)
        report = diagnose(root, cache_dir=cache_dir, quiet=True)
        if show_report:
            print(format_text(report))
        result = score(report, planted)
        n_planted_groups = sum(len(planted[k]) for k in (WITHIN_CLASS, ACROSS_CLASSES, ACROSS_SPLITS))
        flips = result["flipped"][0]
        print(f"\nseed {seed}: {len(report.exact_duplicates)} exact duplicate group(s) reported for "
              f"{n_planted_groups} planted; {len(report.near_duplicates)} near-duplicate pair(s); "
              f"{len(report.suspects)} suspects in all, first {2 * flips} checked; "
              f"imageNotFound.gif: " + ", ".join(
                  what for what, hit in (("rare format", any(f.path.endswith("imageNotFound.gif") for f in report.rare_formats)),
                                         ("outlier", any(o.image.path.endswith("imageNotFound.gif") for o in report.outliers)),
                                         ("suspect", any(s.image.path.endswith("imageNotFound.gif") for s in report.suspects)))
                  if hit) + f"; {sum(report.seconds.values()):.1f} s")
        return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="one planting per seed")
    ap.add_argument("--cache_dir", help="retrain cache (default: ~/.cache/retrain)")
    ap.add_argument("--report", action="store_true", help="print the doctor's full text report too")
    args = ap.parse_args()
    if not (SHARED / "hymenoptera").is_dir():
        raise SystemExit(f"needs the hymenoptera dataset at {SHARED / 'hymenoptera'}")
    names = {WITHIN_CLASS: "exact duplicates within a class", ACROSS_CLASSES: "same photo in two classes",
             ACROSS_SPLITS: "val photo copied into train (leak)", "flipped": "flipped labels (in top 2x suspects)"}
    totals = {k: [0, 0] for k in names}
    for seed in args.seeds:
        for kind, (n, found) in run(seed, args.cache_dir, args.report).items():
            totals[kind][0] += n
            totals[kind][1] += found
    print(f"\n{'planted problem':<40}{'planted':>8}{'found':>7}{'share':>8}")
    for kind, (n, found) in totals.items():
        print(f"{names[kind]:<40}{n:>8}{found:>7}{found / n:>8.0%}")
    print(f"(over seeds {', '.join(map(str, args.seeds))})")


if __name__ == "__main__":
    main()
