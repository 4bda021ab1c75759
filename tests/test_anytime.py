"""The default run end to end: the head's model on disk first, fine-tuning that may only improve it,
Ctrl-C at several moments leaving a complete model at least as good as the head on validation, and
a rerun that reuses the fine-tuned network. Real `python -m retrain train` processes on real photos.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import real_subset, shared_dataset

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

PER_CLASS = 30  # 9 validation photos a class at 30%: 54 in all, just over what the plan needs to fine-tune
# A small folder keeps each run short; lite0 is named so that no backbone comparison follows fine-tuning
# (plan.py's tests cover when one does): what is under test is fine-tuning's anytime behaviour.
OPTIONS = ["--validation_percentage", "30", "--backbone", "lite0"]
CLASSES = ("buildings", "forest", "glacier", "mountain", "sea", "street")
HEAD_LINE = re.compile(r"^Plan: finetune .*\(head: ([\d.]+)% \(N=(\d+), 95% CI [\d-]+%\) on validation")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """An intel_scenes subset on which the head is good but far from perfect (~89%), so fine-tuning has a go."""
    return real_subset(shared_dataset("intel_scenes") / "train", tmp_path_factory.mktemp("anytime") / "photos",
                       PER_CLASS)


def run_env(cache_dir: Path) -> dict[str, str]:
    return os.environ | {"RETRAIN_CACHE": str(cache_dir), "RETRAIN_PROGRESS": "lines"}


def start(photos: Path, out: Path, cache_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "retrain", "train", str(photos), "--output", str(out),
                             "--time_budget", "1", *OPTIONS, *extra], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=run_env(cache_dir),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal


def read_until(proc: subprocess.Popen, marker: str, seen: list[str]) -> None:
    for line in proc.stderr:
        seen.append(line)
        if marker in line:
            return
    raise AssertionError(f"the run ended before printing {marker!r}:\n{''.join(seen)}")


def head_accuracy(lines: list[str]) -> float:
    found = [HEAD_LINE.search(line) for line in lines]
    match = next((m for m in found if m), None)
    assert match, "".join(lines)
    return float(match.group(1)) / 100


def assert_complete_model(out: Path, photos: Path) -> dict:
    """model.onnx, labels.txt and metrics.json of one run, and the model classifies a photo."""
    from retrain.prediction import load

    metrics = json.loads((out / "metrics.json").read_text())
    labels = (out / "labels.txt").read_text().split()
    assert labels == metrics["classes"] == list(CLASSES)
    prediction = next(load(out).predict_paths([next((photos / "forest").iterdir())], top_k=len(CLASSES)))
    assert prediction.error is None and sorted(label for label, _ in prediction.top) == labels
    assert abs(sum(p for _, p in prediction.top) - 1) < 1e-4
    assert not [p for p in out.iterdir() if p.name.startswith(".retrain-staging")]
    return metrics


@pytest.mark.parametrize("marker, delay, sig", [
    ("Saved a first model", 0.0, signal.SIGINT),  # while fine-tuning starts up
    ("Fine-tuning lite0 on", 1.5, signal.SIGINT),  # in the middle of the first epoch
    ("Epoch 1/", 0.0, signal.SIGINT),  # after an epoch: in the next one, or while the final model is written
    ("Saved a first model", 0.0, signal.SIGTERM),  # `kill`, `timeout`, `docker stop`: ends the run as Ctrl-C does
])
def test_ctrl_c_at_any_moment_leaves_a_complete_model_at_least_as_good_as_the_head(
        photos, cache_dir, tmp_path, marker, delay, sig):
    out, seen = tmp_path / "model", []
    proc = start(photos, out, cache_dir)
    try:
        read_until(proc, marker, seen)
        time.sleep(delay)
        proc.send_signal(sig)
        seen += proc.stderr.readlines()
        code = proc.wait(timeout=300)
    finally:
        proc.kill()
    log = "".join(seen)
    assert code in (0, 130), log
    assert "Traceback" not in log
    metrics = assert_complete_model(out, photos)
    assert metrics["validation_accuracy"] >= head_accuracy(seen) - 0.0005, log  # printed to 0.1 points


def test_a_rerun_reuses_the_fine_tuned_network(photos, cache_dir, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    env = run_env(cache_dir)
    cmd = [sys.executable, "-m", "retrain", "train", str(photos), *OPTIONS, "--time_budget", "0.1", "--output"]  # one epoch
    one = subprocess.run(cmd + [str(first)], capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr
    assert "Fine-tuning lite0" in one.stderr and "Reusing" not in one.stderr
    two = subprocess.run(cmd + [str(second)], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr
    assert "Reusing the fine-tuning of an identical earlier run (same photos and settings), which kept the " in two.stderr
    assert "Fine-tuning lite0" not in two.stderr and "Saved a first model" not in two.stderr
    a, b = assert_complete_model(first, photos), assert_complete_model(second, photos)
    for key in ("validation_accuracy", "test_accuracy", "mode"):
        assert a[key] == b[key]
    assert a["validation_accuracy"] >= head_accuracy(one.stderr.splitlines()) - 0.0005
