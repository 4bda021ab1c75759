"""torchrun: two CPU processes (gloo) train like one process with the same global batch, and write one model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from retrain import distributed
from retrain.data import shard_batches

from test_scratch import small_gray_dataset

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

TORCHRUN = Path(sys.executable).with_name("torchrun")


def run(cmd: list[str], cache_dir: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"RETRAIN_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def train_both_ways(data: Path, tmp_path: Path, cache_dir: Path, flags: list[str]) -> tuple[dict, dict, str]:
    if not TORCHRUN.exists():
        pytest.skip(f"torchrun not found beside {sys.executable}")
    common = ["train", str(data), "--cache_dir", str(cache_dir), "--quiet", *flags]
    one = run([sys.executable, "-m", "retrain", *common, "--output", str(tmp_path / "one")], cache_dir)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "retrain", *common,
               "--output", str(tmp_path / "two")], cache_dir)
    assert two.returncode == 0, two.stderr[-3000:]
    read = lambda name: json.loads((tmp_path / name / "metrics.json").read_text())  # noqa: E731
    return read("one"), read("two"), two.stderr


def last_epoch(metrics: dict) -> dict:
    return metrics["finetune"]["history"][-1]


def test_scratch_network_under_torchrun_matches_one_process(tmp_path, cache_dir):
    data = small_gray_dataset(tmp_path / "gray", per_class=60)
    one, two, _ = train_both_ways(data, tmp_path, cache_dir,
                                  ["--backbone", "scratch-small", "--epochs", "6", "--finetune_batch_size", "16"])
    a, b = last_epoch(one), last_epoch(two)
    # Same global batch and schedule; BatchNorm sees half-batches and dropout differs, hence a tolerance.
    assert a["epoch"] == b["epoch"] == 6
    assert abs(a["train_loss"] - b["train_loss"]) <= 0.15 * a["train_loss"]
    assert abs(one["validation_accuracy"] - two["validation_accuracy"]) <= 0.15
    assert abs(one["test_accuracy"] - two["test_accuracy"]) <= 0.15
    assert two["test_accuracy"] >= 0.7


def test_finetuning_under_torchrun_matches_one_process(tmp_path, cache_dir, shapes):
    one, two, stderr = train_both_ways(shapes, tmp_path, cache_dir,
                                       ["--mode", "finetune", "--epochs", "2", "--train_size", "64", "--unfreeze", "2",
                                        "--finetune_batch_size", "8", "--steps", "100"])
    a, b = last_epoch(one), last_epoch(two)
    assert abs(a["train_loss"] - b["train_loss"]) <= 0.15 * a["train_loss"]
    assert abs(one["test_accuracy"] - two["test_accuracy"]) <= 0.15
    # The head before fine-tuning comes from the same cached features: identical in both runs.
    assert one["head"]["history"] == two["head"]["history"]


def test_shards_split_every_batch_between_processes(monkeypatch):
    whole = shard_batches(50, 8, seed=3, epoch=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    parts = []
    for r in ("0", "1"):
        monkeypatch.setenv("RANK", r)
        parts.append(shard_batches(50, 8, seed=3, epoch=2))
    assert distributed.active() and len(parts[0]) == len(parts[1]) == len(whole) == 6
    for full, mine, theirs in zip(whole, *parts):
        assert len(mine) == len(theirs) == 4
        np.testing.assert_array_equal(np.sort(np.concatenate([mine, theirs])), np.sort(full))
