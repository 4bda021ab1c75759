"""`retrain train ... --resume` through the command line: interrupted fine-tuning continues to the same result."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cache_with_lite0, make_dataset

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


def command(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "retrain", "train", str(data), "--output", str(out), "--cache_dir", str(cache),
            "--mode", "finetune", "--epochs", "3", "--train_size", "96", "--finetune_batch_size", "8",
            "--unfreeze", "2", "--steps", "100", "--workers", "2", "--testing_percentage", "20", *extra]


def comparable(metrics: dict) -> dict:
    """What must match between an uninterrupted and a resumed run (timings apart)."""
    history = [{k: v for k, v in e.items() if k not in ("seconds", "images_per_second")}
               for e in metrics["finetune"]["history"]]
    return {"test_accuracy": metrics["test_accuracy"], "validation_accuracy": metrics["validation_accuracy"],
            "best_epoch": metrics["finetune"]["best_epoch"], "history": history,
            "predictions": metrics["test_predictions"]}


def wait_for_checkpoint(process: subprocess.Popen, cache: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not list((cache / "checkpoints").glob("finetune-*.pt")):
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir) -> tuple[Path, dict, Path]:
    """The photos, the uninterrupted run's metrics, and its cache."""
    root = tmp_path_factory.mktemp("resume")
    data = make_dataset(root / "shapes")
    whole_cache = cache_with_lite0(cache_dir, root / "cache-whole")
    subprocess.run(command(data, root / "whole", whole_cache), check=True, capture_output=True)
    return data, json.loads((root / "whole" / "metrics.json").read_text()), whole_cache


def warm_cache(whole: Path, cache: Path) -> Path:
    """A cache holding the uninterrupted run's exported backbone, features and split, but no checkpoint:
    what is under test is the fine-tuning, not exporting and extracting again."""
    for part in ("backbones", "features", "splits"):
        shutil.copytree(whole / part, cache / part)
    return cache


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_interrupted_fine_tuning_resumes_to_the_same_metrics(uninterrupted, tmp_path, sig):
    data, whole, whole_cache = uninterrupted
    cache, out = warm_cache(whole_cache, tmp_path / "cache"), tmp_path / "model"
    # A shell that runs the suite in the background starts it with SIGINT ignored, and children inherit
    # that: give the run the default action, as a terminal's Ctrl-C would find it.
    run = subprocess.Popen(command(data, out, cache), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_checkpoint(run, cache)
    run.send_signal(sig)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode != 0 and not (out / "model.onnx").exists()
    if sig == signal.SIGINT:
        assert "interrupted" in stderr and "Traceback" not in stderr

    # The same command, with another --workers: that does not change which run it is.
    resumed = subprocess.run(command(data, out, cache, "--resume", "--workers", "1"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming after epoch" in resumed.stderr
    assert comparable(json.loads((out / "metrics.json").read_text())) == comparable(whole)


def test_resume_with_other_training_settings_starts_afresh(uninterrupted, tmp_path):
    data, _, whole_cache = uninterrupted
    cache = warm_cache(whole_cache, tmp_path / "cache")
    run = subprocess.Popen(command(data, tmp_path / "a", cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_checkpoint(run, cache)
    run.kill()
    run.wait()
    other = subprocess.run(command(data, tmp_path / "b", cache, "--resume", "--seed", "1"),
                           capture_output=True, text=True, timeout=600)
    assert other.returncode == 0, other.stderr
    assert "Resuming" not in other.stderr and "No checkpoint of this run" in other.stderr
