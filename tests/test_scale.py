"""One machine, any size (issue #8): the head trained out of core, streaming scan, the heap handed back
between stages, and the benchmark's generator and tiny backbone (used by the tests too, so they stay working).
The memory-mapped store's index, feature matrices built in blocks and streaming predict to CSV / JSON Lines
are tested with their modules, in test_store.py, test_features.py and test_prediction.py.
"""
from __future__ import annotations

import hashlib
import platform
import re
from pathlib import Path

import numpy as np
import pytest

import retrain.head as head_mod
import retrain.scan as scan_mod
from retrain.head import HeadConfig, logits, train_head
from retrain.scan import Sample

from conftest import bench_scale

DIM = 8
bench = bench_scale()


# ---------------------------------------------------------------- the head, out of core

def _toy_problem(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (rng.standard_normal((n, DIM)) + 2 * np.eye(3, DIM)[y]).astype(np.float32)
    return x, y


def test_head_trained_on_a_memmap_is_identical_to_in_memory(tmp_path):
    x, y = _toy_problem(300)
    xv, yv = _toy_problem(60, seed=1)
    mm = np.memmap(tmp_path / "x.f32", np.float32, "w+", shape=x.shape)
    mm[:] = x
    cfg = HeadConfig(steps=300, eval_interval=25, hidden_units=16)
    a = train_head(x, y, xv, yv, 3, cfg, log=lambda line: None)
    b = train_head(mm, y, xv, yv, 3, cfg, log=lambda line: None)
    assert a.history == b.history and a.best_step == b.best_step
    for (wa, ba), (wb, bb) in zip(a.layers, b.layers):
        np.testing.assert_array_equal(wa, wb)
        np.testing.assert_array_equal(ba, bb)


def test_many_training_rows_are_measured_on_a_fixed_sample_without_changing_the_batches(monkeypatch):
    x, y = _toy_problem(400)
    xv, yv = _toy_problem(80, seed=1)
    cfg = HeadConfig(steps=200, eval_interval=20, patience=1000)
    full = train_head(x, y, xv, yv, 3, cfg, log=lambda line: None)
    monkeypatch.setattr(head_mod, "MEASURE_ROWS", 50)
    sampled = train_head(x, y, xv, yv, 3, cfg, log=lambda line: None)
    # Same mini-batches, so the same weights and validation curve; only the train metric differs.
    assert [h["validation_accuracy"] for h in full.history] == [h["validation_accuracy"] for h in sampled.history]
    np.testing.assert_array_equal(full.layers[0][0], sampled.layers[0][0])
    assert [h["train_accuracy"] for h in full.history] != [h["train_accuracy"] for h in sampled.history]
    assert all(abs(h["train_accuracy"] * 50 - round(h["train_accuracy"] * 50)) < 1e-9 for h in sampled.history)  # k/50


def test_logits_in_blocks_match_one_pass(monkeypatch):
    x, _ = _toy_problem(103)
    rng = np.random.default_rng(5)
    layers = [(rng.standard_normal((DIM, 16)).astype(np.float32), rng.standard_normal(16).astype(np.float32)),
              (rng.standard_normal((16, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32))]
    whole = logits(layers, x)
    monkeypatch.setattr(head_mod, "CHUNK_ROWS", 10)
    np.testing.assert_allclose(logits(layers, x), whole, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- scan, streaming

def test_samples_are_slotted():
    s = Sample(Path("a.png"), 0, "0" * 64, "train")
    assert not hasattr(s, "__dict__")
    with pytest.raises(AttributeError):
        s.label = 1


def test_hashing_pulls_files_lazily(tmp_path):
    for i in range(100):
        (tmp_path / f"{i}.png").write_bytes(bytes([i]))
    pulled = []

    def paths():
        for i in range(100):
            pulled.append(i)
            yield tmp_path / f"{i}.png"

    digests_ = scan_mod._hash_all(paths(), 100, workers=2, quiet=True)
    first = next(digests_)
    assert first == hashlib.sha256(bytes([0])).digest()
    assert len(pulled) <= 4 * 2 + 1  # a bounded window, not one future per file
    rest = list(digests_)
    assert rest == [hashlib.sha256(bytes([i])).digest() for i in range(1, 100)]


# ---------------------------------------------------------------- the benchmark's generator; the heap between stages

def test_generator_makes_ten_balanced_classes_and_is_reused(synthetic):
    counts = {d.name: len(list(d.glob("*.png"))) for d in synthetic.iterdir() if d.is_dir()}
    assert sorted(counts) == sorted(bench.SHAPES) and set(counts.values()) == {12}
    before = (synthetic / "circle" / "img_0000000.png").stat().st_mtime_ns
    assert bench.make_synthetic_folder(synthetic.parent, 120) == synthetic
    assert (synthetic / "circle" / "img_0000000.png").stat().st_mtime_ns == before  # not regenerated


def _anon_kb() -> int:
    return int(re.search(r"^RssAnon:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


@pytest.mark.skipif(not Path("/proc/self/status").exists() or platform.libc_ver()[0] != "glibc",
                    reason="reads /proc and needs glibc's malloc_trim")
def test_freed_heap_goes_back_to_the_os_between_stages():
    from retrain.pipeline import release_free_heap

    blocks = [bytes(1000) + i.to_bytes(4, "little") for i in range(150_000)]  # ~150 MB of small heap blocks
    keep = blocks[-1]  # the heap's top stays in use: a plain free cannot shrink it
    del blocks
    before = _anon_kb()
    release_free_heap()
    assert before - _anon_kb() > 50_000 and keep  # more than 50 MB returned
