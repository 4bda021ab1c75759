"""Tests for retrain.runtime: decoded_batches, the ordered, bounded batch decoder (Pillow images, no model)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from retrain.preprocess import Preprocessing
from retrain.runtime import decoded_batches

PREP = Preprocessing(size=32)


def _colour(i: int) -> tuple[int, int, int]:
    return (20 * i % 256, 255 - 20 * i % 256, 7 * i % 256)


@pytest.fixture
def mixed_files(tmp_path):
    """11 files: images with a distinct colour each, except index 2 (text), 6 (missing), 7 (empty)."""
    paths = []
    for i in range(11):
        p = tmp_path / f"{i:02d}.png"
        if i == 2:
            p = p.with_suffix(".jpg")
            p.write_text("<html>not an image</html>")
        elif i == 6:
            pass  # vanished after the scan
        elif i == 7:
            p.write_bytes(b"")
        else:
            Image.new("RGB", (40 + i, 30), _colour(i)).save(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("batch_size, workers, prefetch", [(4, 2, 3), (1, 3, 1), (3, 1, 2), (50, 4, 3)])
def test_decoded_batches_order_failures_and_sizes(mixed_files, batch_size, workers, prefetch):
    bad = {2, 6, 7}
    results = list(decoded_batches(mixed_files, PREP, batch_size, workers, prefetch=prefetch))
    n = len(mixed_files)
    assert len(results) == -(-n // batch_size)  # ceil

    seen_ok, seen_failed = [], []
    for b, (ok, batch, failed) in enumerate(results):
        window = list(range(b * batch_size, min((b + 1) * batch_size, n)))
        # Each batch covers exactly its window of paths, every index once.
        assert sorted(ok + [i for i, _ in failed]) == window
        assert ok == sorted(ok)
        assert batch.dtype == np.uint8 and batch.shape == (len(ok), PREP.size, PREP.size, 3)
        for row, i in zip(batch, ok):
            assert (row == np.array(_colour(i), np.uint8)).all(), i  # row k is image ok[k]
        seen_ok += ok
        seen_failed += failed

    assert seen_ok == [i for i in range(n) if i not in bad]
    reasons = dict(seen_failed)
    assert set(reasons) == bad
    assert "not a recognised image format" in reasons[2]
    assert "No such file" in reasons[6]
    assert "empty" in reasons[7]


def test_decoded_batches_all_failed_batch_is_empty_array(tmp_path):
    paths = [tmp_path / f"missing{i}.jpg" for i in range(3)]
    ((ok, batch, failed),) = decoded_batches(paths, PREP, batch_size=5, workers=2)
    assert ok == [] and batch.shape == (0, PREP.size, PREP.size, 3) and batch.dtype == np.uint8
    assert [i for i, _ in failed] == [0, 1, 2]


def test_decoded_batches_no_paths(tmp_path):
    assert list(decoded_batches([], PREP, batch_size=4, workers=2)) == []


def test_decoded_batches_is_lazy_and_bounded(tmp_path, monkeypatch):
    # Only `prefetch` batches may be decoded ahead of the consumer.
    import retrain.runtime as features
    calls = []

    def fake_load(path, prep):
        calls.append(path)
        return np.zeros((prep.size, prep.size, 3), np.uint8)

    monkeypatch.setattr(features, "load_image", fake_load)
    paths = [tmp_path / f"{i}.png" for i in range(100)]
    gen = decoded_batches(paths, PREP, batch_size=5, workers=2, prefetch=2)
    ok, batch, failed = next(gen)
    assert ok == [0, 1, 2, 3, 4] and failed == []
    assert len(calls) <= 3 * 5  # the first batch, one in flight, one just submitted
    gen.close()
