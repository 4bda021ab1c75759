"""The default run against a plain logistic regression and against --mode head, on the shared datasets.

Run: python benchmarks/bench_accuracy.py [--datasets hymenoptera rps signs intel] [--time_budget MIN]
     (scikit-learn is a benchmark-only dependency: pip install scikit-learn)

For each dataset, side by side in one run, on the same split of the same photos:
- baseline: scikit-learn's LogisticRegression (default settings) on Lite0's features of each photo
  as it is (the tool's features average the photo's and its mirror image's), fitted on the
  training and validation photos (it needs no validation split), scored on test;
- head: `retrain train --mode head` (the instant path);
- default: `retrain train` (the head's model first, then fine-tuning within the time budget).
Each run's wall time includes saving the model folder; "first" is when the default run's first
usable model was on disk. Then both commands run again on the same folder ("rerun": the cached
features, and the default's cached fine-tuning). Lite0's features are extracted once before any
timing, into the usual cache; where the default run lets the Lite sizes compete, lite1's and lite2's
are extracted inside its timed run unless that cache already holds them (as in the README's figures).
The rest of the cache (fine-tuning and comparisons kept for reruns) starts empty.
"error cut" is how much of the baseline's test error the default removes (the issue's bar: 25%).
hymenoptera: train/ against val/ as the test split. rps: rock_paper_scissors training/ against
testing/. signs: sign_language_digits, the tool's own stable split. intel: intel_scenes train/
against test/.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import retrain
from retrain.backbones import lite0
from retrain.config import TrainConfig
from retrain.evidence import wilson_interval
from retrain.files import default_cache_dir
from retrain.metrics import RunMetrics
from retrain.pipeline import feature_splits

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DATASETS = {  # name: (image folder, config fields)
    "hymenoptera": ("hymenoptera/train", {"test_dir": str(SHARED / "hymenoptera" / "val")}),
    "rps": ("rock_paper_scissors", {}),
    "signs": ("sign_language_digits", {}),
    "intel": ("intel_scenes", {}),
}


def baseline(folder: Path, config: TrainConfig) -> float:
    """Test accuracy of a plain logistic regression on Lite0's features of each photo as it is (one view,
    where the tool averages the photo's and its mirror image's), cached by the tool."""
    from sklearn.linear_model import LogisticRegression

    _, x = feature_splits(folder, replace(config, mode="head"), lite0(mirror=False))
    x_fit = np.concatenate([x["train"][0], x["validation"][0]])
    y_fit = np.concatenate([x["train"][1], x["validation"][1]])
    return float(LogisticRegression(max_iter=5000).fit(x_fit, y_fit).score(*x["test"]))


def timed_run(folder: Path, config: TrainConfig, out: Path) -> tuple[RunMetrics, float, float | None]:
    """(metrics, wall seconds to the saved model, seconds to the first saved model or None)."""
    start, first = time.perf_counter(), []

    def publish(model) -> None:
        model.save(out)
        first.append(time.perf_counter() - start)
    model = retrain.train(folder, config, publish=publish)
    model.save(out)
    return model.metrics, time.perf_counter() - start, (first[0] if first else None)


def interval(acc: float, n: int) -> str:
    lo, hi = wilson_interval(round(acc * n), n)
    return f"{acc:.3f} [{lo:.2f}-{hi:.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--time_budget", type=float, help="minutes of fine-tuning (default: the tool's default)")
    args = ap.parse_args()
    budget = {"time_budget": args.time_budget * 60} if args.time_budget else {}
    # Features from the usual cache; everything else (fine-tuning kept for reruns above all) in a fresh
    # one, so the first default run of each set fine-tunes even where an earlier benchmark cached it.
    fresh = tempfile.mkdtemp(prefix="bench-accuracy-")
    stores = {"cache_dir": fresh, "bottleneck_dir": str(default_cache_dir() / "features")}
    print(f"{'dataset':<12} {'N':>4} {'baseline':>20} {'head':>20} {'s':>5} {'default':>20} {'s':>5} "
          f"{'first':>5} {'err cut':>7}  {'rerun head/default s':>20} {'ratio':>5}  what the default did")
    for name in args.datasets:
        sub, fields = DATASETS[name]
        folder, config = SHARED / sub, TrainConfig(quiet=True, **fields, **budget, **stores)
        base = baseline(folder, config)
        feature_splits(folder, replace(config, mode="head"))  # Lite0's features extracted before any timing
        with tempfile.TemporaryDirectory() as tmp:
            runs = {}
            for mode in ("head", "auto"):
                cfg = replace(config, mode=mode) if mode == "auto" else replace(config, mode=mode, time_budget=None)
                runs[mode] = timed_run(folder, cfg, Path(tmp) / mode)
                runs[mode + " rerun"] = timed_run(folder, cfg, Path(tmp) / f"{mode}-rerun")
        (head, head_s, _), (auto, auto_s, first_s) = runs["head"], runs["auto"]
        n = auto.test.num_images
        cut = ((1 - base) - (1 - auto.test_accuracy)) / max(1e-9, 1 - base)
        rerun_head, rerun_auto = runs["head rerun"][1], runs["auto rerun"][1]
        first = f"{first_s:5.1f}" if first_s is not None else f"{auto_s:5.1f}"
        print(f"{name:<12} {n:>4} {interval(base, n):>20} {interval(head.test_accuracy, n):>20} {head_s:5.1f} "
              f"{interval(auto.test_accuracy, n):>20} {auto_s:5.0f} {first} {100 * cut:6.0f}%  "
              f"{rerun_head:9.1f} / {rerun_auto:8.1f} {rerun_auto / rerun_head:5.2f}  "
              f"{auto.plan['mode']}: {auto.plan['reason']}", flush=True)


if __name__ == "__main__":
    main()
