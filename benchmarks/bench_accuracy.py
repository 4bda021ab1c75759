"""Test accuracy per backbone on the shared datasets (head on cached features).

Run: python benchmarks/bench_accuracy.py [--backbones lite0 lite2] [--datasets rps signs hymenoptera]
hymenoptera: train on train/, evaluate the exported model on val/.
rps: rock_paper_scissors training/ (hash split for validation) vs testing/.
signs: sign_language_digits, the tool's own stable hash split (10% test).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import retrain
from retrain.api import TrainConfig

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def run(name: str, backbone: str) -> tuple[float, int, float]:
    start = time.perf_counter()
    cfg = TrainConfig(backbone=backbone, quiet=True)
    if name == "hymenoptera":
        model = retrain.train(SHARED / "hymenoptera" / "train", cfg)
        with tempfile.TemporaryDirectory() as out:
            model.save(out)
            m = retrain.evaluate(out, SHARED / "hymenoptera" / "val", quiet=True)
        return m["accuracy"], m["num_images"], time.perf_counter() - start
    folder = {"rps": SHARED / "rock_paper_scissors", "signs": SHARED / "sign_language_digits"}[name]
    model = retrain.train(folder, cfg)
    return model.metrics.test_accuracy, model.metrics.num_images["test"], time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["lite0", "lite2"])
    ap.add_argument("--datasets", nargs="+", default=["hymenoptera", "rps", "signs"])
    args = ap.parse_args()
    print(f"{'dataset':<12} {'backbone':<8} {'accuracy':>8} {'N':>5} {'seconds':>8}")
    for name in args.datasets:
        for backbone in args.backbones:
            acc, n, secs = run(name, backbone)
            print(f"{name:<12} {backbone:<8} {acc:8.3f} {n:5d} {secs:8.1f}", flush=True)


if __name__ == "__main__":
    main()
