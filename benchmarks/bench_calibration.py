"""Calibration on real data, small folders and full ones, and "none of these".

Run: python benchmarks/bench_calibration.py [--draws 5] [--unknown]
1. For each shared dataset, trains the default head on the full set (fixed split folders when
   present) and on small folders drawn from its training photos (30 per class for hymenoptera,
   20 per class for the others; several random draws), and prints the test ECE before and after
   calibration, the temperature, and whether calibration was kept. The goal: after <= before in
   every run (a temperature is kept only when held-out evidence says it helps).
2. With --unknown, trains rock_paper_scissors without "scissors" with --unknown_threshold auto
   and prints how many scissors photos are flagged unknown against the in-class false rejection.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

import retrain
from retrain.api import TrainConfig
from retrain.metrics import RunMetrics
from retrain.scan import find_split_dirs, list_images

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
SMALL = {"hymenoptera": 30, "rock_paper_scissors": 20, "sign_language_digits": 20, "intel_scenes": 20}


def small_folder(root: Path, per_class: int, seed: int, work: Path) -> Path:
    """`per_class` random training photos of each class of `root`, symlinked into `work`/<class>/."""
    train = find_split_dirs(root).get("train", root)
    rng = np.random.default_rng(seed)
    for cls in sorted(d for d in train.iterdir() if d.is_dir()):
        photos = sorted(list_images(cls)[0])
        (work / cls.name).mkdir(parents=True)
        for i in rng.choice(len(photos), min(per_class, len(photos)), replace=False):
            os.symlink(photos[i], work / cls.name / photos[i].name)
    return work


def report(name: str, metrics: RunMetrics) -> bool:
    cal, n = metrics.calibration, metrics.num_images
    if cal.test_ece_after is None:
        print(f"{name:<32} no test photos")
        return True
    ok = cal.test_ece_after <= cal.test_ece_before
    print(f"{name:<32} {n['train']:>5} {n['validation']:>4} {n['test']:>5} {cal.held_out_predictions:>5} "
          f"{cal.temperature:>5.2f} {'yes' if cal.calibrated else 'no':>4} "
          f"{100 * cal.test_ece_before:>6.1f}% {100 * cal.test_ece_after:>6.1f}%  {'ok' if ok else 'WORSE'}")
    return ok


def without_class(root: Path, held_out: str, work: Path) -> tuple[Path, list[Path]]:
    """A symlinked copy of `root` without `held_out`, and that class's photos from every split."""
    splits = find_split_dirs(root) or {"train": root}
    held: list[Path] = []
    for split_dir in splits.values():
        for cls in split_dir.iterdir():
            if not cls.is_dir():
                continue
            if cls.name == held_out:
                held += list_images(cls)[0]
            else:
                dest = work / split_dir.relative_to(root) / cls.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(cls, dest)
    return work, held


def unknown_rate(dataset: str, held_out: str) -> None:
    root = SHARED / dataset
    with tempfile.TemporaryDirectory() as tmp:
        data, held = without_class(root, held_out, Path(tmp) / "data")
        model = retrain.train(data, TrainConfig(quiet=True, unknown_threshold="auto", mode="head"))
        model.save(Path(tmp) / "model", report=False)
        c = model.metrics.calibration
        preds = retrain.predict(Path(tmp) / "model", held)
        rejected = sum(p.unknown for p in preds) / len(preds)
        print(f"held out '{held_out}' ({len(held)} photos): threshold {c.unknown_threshold:.3f} "
              f"rejects {100 * rejected:.1f}% of them; in-class test photos wrongly rejected: "
              f"{100 * c.test_false_rejection:.1f}%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(SMALL))
    ap.add_argument("--draws", type=int, default=5, help="small folders drawn per dataset")
    ap.add_argument("--unknown", action="store_true", help="also measure the unknown threshold")
    args = ap.parse_args()
    print(f"{'run':<32} {'train':>5} {'val':>4} {'test':>5} {'held':>5} {'T':>5} {'kept':>4} "
          f"{'ECE before':>7} {'after':>7}")
    results = []
    for name in args.datasets.split(","):
        root = SHARED / name
        if not root.is_dir():
            print(f"{name}: not present")
            continue
        results.append(report(f"{name} (full)", retrain.train(root, TrainConfig(quiet=True, mode="head")).metrics))
        for seed in range(args.draws):
            with tempfile.TemporaryDirectory() as tmp:
                folder = small_folder(root, SMALL[name], seed, Path(tmp) / "small")
                config = TrainConfig(quiet=True, cache_dir=None, mode="head")
                metrics = retrain.train(folder, config).metrics
                results.append(report(f"{name} {SMALL[name]}/class #{seed}", metrics))
    print(f"test ECE after <= before in {sum(results)} of {len(results)} runs")
    if args.unknown:
        unknown_rate("rock_paper_scissors", "scissors")


if __name__ == "__main__":
    main()
