"""Tests for retrain.features: features computed once and cached, and training matrices built in blocks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import retrain
import retrain.features as features_mod
import retrain.runtime as runtime_mod
import retrain.store as store_mod
from retrain.backbones import get_backbone
from retrain.features import compute_features, feature_matrix, store_folder
from retrain.graphs import extractor_path
from retrain.runtime import extract, inference_session
from retrain.scan import Sample, SampleTable, digest_keys, scan_dataset
from retrain.store import FeatureStore, StoreFeatures

from conftest import draw_shape, hex_digests, quick_config

DIM = 8


def _samples(ds: list[str]) -> SampleTable:
    return SampleTable.from_samples(Sample(Path(f"/img/{i}.png"), i % 3, d, "train") for i, d in enumerate(ds))


@pytest.mark.parametrize("max_in_memory", [1 << 30, 0])
def test_feature_matrix_equals_stacking_the_dict(tmp_path, monkeypatch, max_in_memory):
    monkeypatch.setattr(features_mod, "MATRIX_CHUNK_ROWS", 7)  # several blocks
    monkeypatch.setattr(store_mod, "LOOKUP_BLOCK", 3)  # lookups in blocks too
    ds = hex_digests(40)
    vs = np.random.default_rng(3).standard_normal((40, DIM)).astype(np.float32)
    store = FeatureStore(tmp_path / "store", DIM)
    store.append(list(zip(ds, vs)))
    order = _samples([ds[i] for i in [5, 3, 3, 39, 0] + list(range(10, 35))])  # repeats, any order
    view = StoreFeatures(store, store.rows(digest_keys(ds)))
    as_dict = dict(zip(ds, vs))
    expected = np.stack([as_dict[s.digest] for s in order]).astype(np.float32)  # what api._matrix built
    for source in (view, as_dict):
        x, y = feature_matrix(order, source, DIM, max_in_memory=max_in_memory, spill_dir=tmp_path)
        assert x.dtype == np.float32 and x.shape == (len(order), DIM)
        assert isinstance(x, np.memmap) == (max_in_memory == 0)
        np.testing.assert_array_equal(x, expected)
        np.testing.assert_array_equal(y, [s.label for s in order])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # the spill file is never visible


def test_feature_matrix_of_nothing_and_of_a_missing_digest(tmp_path):
    store = FeatureStore(tmp_path, DIM)
    store.append([(hex_digests(1)[0], np.ones(DIM))])
    view = StoreFeatures(store, store.rows(digest_keys(hex_digests(1))))
    x, y = feature_matrix(_samples([]), view, DIM)
    assert x.shape == (0, DIM) and y.shape == (0,) and y.dtype == np.int64
    with pytest.raises(KeyError):
        feature_matrix(_samples(hex_digests(2)), view, DIM)


def test_compute_features_view_matches_the_extractor_and_a_warm_rerun(synthetic, tiny, tmp_path, monkeypatch):
    dataset = scan_dataset(synthetic, quiet=True)
    backbone = get_backbone(str(tiny))
    found, failures = compute_features(dataset.samples, backbone, extractor_path(backbone, tmp_path),
                                       store_folder(tmp_path))
    assert failures == {} and len(found) == len({s.digest for s in dataset.samples}) == 120
    paths = [s.path for s in dataset.samples]
    direct = {}
    session = inference_session(extractor_path(backbone, tmp_path))
    for ok, vectors, _ in extract(session, paths, backbone.prep, quiet=True):
        direct |= {dataset.samples[i].digest: v for i, v in zip(ok, vectors)}
    for d, v in direct.items():
        np.testing.assert_array_equal(found[d], v)

    def no_extraction(*a, **k):
        raise AssertionError("a warm run must not extract")
    monkeypatch.setattr(features_mod, "inference_session", no_extraction)
    again, _ = compute_features(dataset.samples, backbone, extractor_path(backbone, tmp_path), store_folder(tmp_path))
    x1, _ = feature_matrix(dataset.samples, found, backbone.feature_dim)
    x2, _ = feature_matrix(dataset.samples, again, backbone.feature_dim, max_in_memory=0)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(x1, np.stack([direct[s.digest] for s in dataset.samples]))


def test_cache_reuse_rename_and_replace(shapes, cache_dir, monkeypatch):
    retrain.train(shapes, quick_config(cache_dir))
    # Renaming and moving files keeps their content hash: nothing is recomputed.
    src = shapes / "circles" / "circles_000.jpg"
    src.rename(shapes / "circles" / "renamed.jpg")
    calls = []
    real = features_mod.inference_session
    monkeypatch.setattr(features_mod, "inference_session", lambda *a, **k: calls.append(1) or real(*a, **k))
    retrain.train(shapes, quick_config(cache_dir))
    assert calls == []
    # A replaced photo under the same name is recomputed, never served stale.
    draw_shape("circles", np.random.default_rng(7), 90).save(shapes / "circles" / "renamed.jpg")
    seen = []
    real_batches = runtime_mod.decoded_batches
    monkeypatch.setattr(runtime_mod, "decoded_batches",
                        lambda paths, *a, **k: seen.extend(paths) or real_batches(paths, *a, **k))
    retrain.train(shapes, quick_config(cache_dir))
    assert [p.name for p in seen] == ["renamed.jpg"]
