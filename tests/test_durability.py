"""Nothing lost: a run killed with SIGKILL mid-extraction, two runs sharing one cache, damaged
records, and files written by rename. Real `python -m retrain train` processes, no monkeypatching
of the code under test: the evidence is the feature store on disk and the progress output.
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

import numpy as np
import onnx
import pytest

import retrain
from retrain.backbones import get_backbone
from retrain.store import STORE_FILE, FeatureStore
from retrain.files import atomic_write_bytes

from conftest import cache_with_lite0, draw_shape, make_dataset

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

LITE0 = get_backbone("lite0")


@pytest.fixture
def fresh_cache(cache_dir, tmp_path) -> Path:
    """A cache with no features, holding only the exported Lite0."""
    return cache_with_lite0(cache_dir, tmp_path / "cache")


def store_of(cache: Path) -> FeatureStore:
    return FeatureStore(cache / "features" / LITE0.identity, LITE0.feature_dim)


def train_command(data: Path, out: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "retrain", "train", str(data), "--output", str(out), "--cache_dir", str(cache),
            "--steps", "100", "--mode", "head"]  # the extraction is under test, not what the default run adds


def extracted_count(stderr: str) -> int | None:
    """How many images the run had to extract, from its line 'Features (lite0): 32 ... cached, extracting 268'."""
    totals = re.findall(r"Features \(lite0\): \d+ distinct images cached, extracting (\d+)", stderr)
    return int(totals[-1]) if totals else None


def assert_valid_model(out: Path, classes: list[str]) -> None:
    onnx.checker.check_model(str(out / "model.onnx"))
    assert json.loads((out / "metrics.json").read_text())["classes"] == classes
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    probe = out.parent / "probe.png"
    draw_shape("stripes", np.random.default_rng(7), 120).save(probe)
    assert retrain.predict(out, [probe])[0].top[0][0] == "stripes"


def test_sigkill_mid_extraction_then_rerun_reuses_all_finished_work(tmp_path, fresh_cache):
    data = make_dataset(tmp_path / "data", per_class=50)  # 150 images, 5 batches of 32
    out = tmp_path / "model"
    store_file = fresh_cache / "features" / LITE0.identity / STORE_FILE
    record = store_of(fresh_cache).dtype.itemsize

    with open(tmp_path / "killed.log", "w") as log:
        victim = subprocess.Popen(train_command(data, out, fresh_cache), stderr=log, stdout=log)
        deadline = time.monotonic() + 240
        while not (store_file.exists() and store_file.stat().st_size >= record) and victim.poll() is None:
            assert time.monotonic() < deadline, "extraction never started"
            time.sleep(0.005)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(60) == -signal.SIGKILL, (tmp_path / "killed.log").read_text()

    size = store_file.stat().st_size
    finished = store_of(fresh_cache)
    assert finished.corrupt == 0
    assert 0 < len(finished) < 150, "the kill must land mid-extraction"
    assert len(finished) == size // record  # every whole record on disk is a good one
    assert not (out / "model.onnx").exists()
    # As if the kill had landed mid-write: half a record after the whole ones. Written over any tail
    # the kill itself tore, which a run truncates before appending: two torn tails in a row never
    # happen, and here they could add up to one whole record of garbage.
    with open(store_file, "r+b") as f:
        f.seek(len(finished) * record)
        f.write(os.urandom(record // 2))
        f.truncate()
    assert len(store_of(fresh_cache)) == len(finished)

    rerun = subprocess.run(train_command(data, out, fresh_cache), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert extracted_count(rerun.stderr) == 150 - len(finished)  # only the unfinished images
    store = store_of(fresh_cache)
    assert store.corrupt == 0 and len(store) == 150
    assert store_file.stat().st_size == 150 * record  # no image stored twice; a torn tail was cut off
    assert_valid_model(out, ["circles", "squares", "stripes"])


def test_two_runs_sharing_one_cache_both_succeed(tmp_path, fresh_cache):
    data = make_dataset(tmp_path / "data", per_class=40, seed=1)
    outs = [tmp_path / "model a", tmp_path / "model b"]
    runs = [subprocess.Popen(train_command(data, out, fresh_cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for out in outs]
    results = [run.communicate(timeout=600) for run in runs]
    for run, (_, err) in zip(runs, results):
        assert run.returncode == 0, err
    store = store_of(fresh_cache)
    assert store.corrupt == 0 and len(store) == 120
    size = (fresh_cache / "features" / LITE0.identity / STORE_FILE).stat().st_size
    assert size % store.dtype.itemsize == 0  # both may have computed an image; no record is torn
    for out in outs:
        assert_valid_model(out, ["circles", "squares", "stripes"])


def test_damaged_record_is_recomputed_on_the_next_run(tmp_path, fresh_cache, capfd):
    data = make_dataset(tmp_path / "data", per_class=8, seed=2)
    cache = fresh_cache
    # --mode head: the store is under test, not the Lite sizes' competition a default run holds on so few photos
    config = retrain.TrainConfig(cache_dir=str(cache), head=retrain.HeadConfig(steps=50), mode="head")
    retrain.train(data, config)
    store_file = cache / "features" / LITE0.identity / STORE_FILE
    record = store_of(cache).dtype.itemsize
    with open(store_file, "r+b") as f:  # flip one byte inside the 5th record's vector
        f.seek(4 * record + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    capfd.readouterr()
    retrain.train(data, config)
    err = capfd.readouterr().err
    assert "ignored 1 damaged record(s)" in err
    assert extracted_count(err) == 1
    assert store_of(cache).corrupt == 1 and len(store_of(cache)) == 24  # the good copy was appended


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"the old model")

    def fail(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="No space"):
        atomic_write_bytes(target, b"half a new model")
    assert target.read_bytes() == b"the old model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # no temporary file left behind
