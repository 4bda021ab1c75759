"""Accuracy and wall time per training mode on the shared datasets (2-core CPU unless a GPU is visible).

Run: python benchmarks/bench_modes.py [--datasets rps hymenoptera] [--modes head finetune top3] [--repeat-seed]

Modes: head (softmax on cached features), finetune (whole network, the default recipe), top3
(only the top 3 stages unfrozen). Batch mixup and cutmix (alpha 0.4) were measured with this script
on rock_paper_scissors and dropped: both left the warm head in place (0.791 against 0.955 without).
hymenoptera: trained on train/, accuracy of the exported model on val/. rps: rock_paper_scissors
training/ (validation carved by hash) against testing/. Features are cached once by the head
run, so every fine-tuning time is the fine-tuning itself plus a warm feature stage. With
--repeat-seed the finetune mode runs twice with the same seed and the two metrics are compared.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import retrain
from retrain.api import TrainConfig
from retrain.config import FinetuneConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
MODES = {
    "head": TrainConfig(quiet=True, mode="head"),
    "finetune": TrainConfig(quiet=True, mode="finetune"),
    "top3": TrainConfig(quiet=True, mode="finetune", finetune=FinetuneConfig(unfreeze=3)),
}


def run(dataset: str, cfg: TrainConfig) -> tuple[float, int, float]:
    """(accuracy, number of images it was measured on, wall seconds of training)."""
    start = time.perf_counter()
    if dataset == "hymenoptera":
        model = retrain.train(SHARED / "hymenoptera" / "train", cfg)
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as out:
            model.save(out, report=False)
            m = retrain.evaluate(out, SHARED / "hymenoptera" / "val", quiet=True)
        return m["accuracy"], m["num_images"], seconds
    model = retrain.train(SHARED / "rock_paper_scissors", cfg)
    return model.metrics.test_accuracy, model.metrics.num_images["test"], time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["rps", "hymenoptera"], choices=["rps", "hymenoptera"])
    ap.add_argument("--modes", nargs="+", default=["head", "finetune", "top3"], choices=list(MODES))
    ap.add_argument("--repeat-seed", action="store_true", help="run finetune twice: same seed, same metrics?")
    args = ap.parse_args()
    print(f"{'dataset':<12} {'mode':<9} {'accuracy':>8} {'N':>5} {'wall':>9}", flush=True)
    for dataset in args.datasets:
        for mode in args.modes:
            acc, n, secs = run(dataset, MODES[mode])
            print(f"{dataset:<12} {mode:<9} {acc:8.3f} {n:5d} {secs / 60:7.1f} min", flush=True)
        if args.repeat_seed:
            cfg = replace(MODES["finetune"], finetune=FinetuneConfig(seed=7))
            first, second = run(dataset, cfg)[0], run(dataset, cfg)[0]
            print(f"{dataset:<12} seed 7 twice: {first:.4f} and {second:.4f} "
                  f"({'identical' if first == second else 'DIFFERENT'})", flush=True)


if __name__ == "__main__":
    main()
