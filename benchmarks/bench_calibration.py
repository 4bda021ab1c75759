"""Calibration and "none of these" on real data.

Run: python benchmarks/bench_calibration.py [--dataset rock_paper_scissors] [--held_out scissors]
1. Trains on the dataset (fixed split folders when present) and prints the test ECE before and
   after temperature scaling, with the fitted temperature.
2. Trains again without one class, with --unknown_threshold auto (chosen on validation), and
   prints how many photos of the held-out class are flagged unknown, against the in-class
   false-rejection rate on the test split.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import retrain
from retrain.api import TrainConfig
from retrain.scan import find_split_dirs, list_images

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="rock_paper_scissors")
    ap.add_argument("--held_out", default="scissors")
    args = ap.parse_args()
    root = SHARED / args.dataset
    cal = retrain.train(root, TrainConfig(quiet=True)).metrics["calibration"]
    print(f"{args.dataset}: temperature {cal['temperature']:.3f}; test ECE {cal['test_ece_before']:.4f} -> "
          f"{cal['test_ece_after']:.4f}; test NLL {cal['test_nll_before']:.4f} -> {cal['test_nll_after']:.4f}")
    with tempfile.TemporaryDirectory() as tmp:
        data, held = without_class(root, args.held_out, Path(tmp) / "data")
        model = retrain.train(data, TrainConfig(quiet=True, unknown_threshold="auto"))
        model.save(Path(tmp) / "model")
        c = model.metrics["calibration"]
        preds = retrain.predict(Path(tmp) / "model", held)
        rejected = sum(p.unknown for p in preds) / len(preds)
        print(f"held out '{args.held_out}' ({len(held)} photos): threshold {c['unknown_threshold']:.3f} "
              f"(chosen on validation) rejects {100 * rejected:.1f}% of them; in-class test photos "
              f"wrongly rejected: {100 * c['test_false_rejection']:.1f}%")


if __name__ == "__main__":
    main()
