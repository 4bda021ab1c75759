"""One machine, any size (issue #8): the memory-mapped store and its index, feature matrices
built in blocks (in memory or memory-mapped), the head trained out of core, streaming scan and
streaming predict to CSV / JSON Lines. The benchmark's generator and tiny backbone are used here
too, so they stay working.
"""
from __future__ import annotations

import csv
import hashlib
import importlib
import importlib.util
import json
import platform
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

import retrain
import retrain.features as features_mod
import retrain.store as store_mod
import retrain.head as head_mod
import retrain.scan as scan_mod
from retrain.api import TrainConfig
from retrain.backbones import get_backbone
from retrain.errors import UserError
from retrain.features import compute_features, feature_matrix, store_folder
from retrain.runtime import extract, inference_session
from retrain.store import STORE_FILE, FeatureStore, StoreFeatures
from retrain.graphs import extractor_path
from retrain.head import HeadConfig, logits, train_head
from retrain.prediction import load, predict_to_file
from retrain.scan import Sample, SampleTable, digest_keys, scan_dataset

from conftest import bench_scale

predict_mod = importlib.import_module("retrain.prediction")
DIM = 8
bench = bench_scale()


def digests(n: int, tag: str = "") -> list[str]:
    return [hashlib.sha256(f"{tag}{i}".encode()).hexdigest() for i in range(n)]


def old_store_reading(path: Path, dim: int) -> tuple[dict[str, np.ndarray], int]:
    """The store as the dict-of-arrays reader before issue #8 read it: the reference."""
    size = 32 + 4 * dim + 4
    data = path.read_bytes()
    found, corrupt = {}, 0
    for i in range(len(data) // size):
        rec = data[i * size:(i + 1) * size]
        if zlib.crc32(rec[:-4]) == int.from_bytes(rec[-4:], "little"):
            found.setdefault(rec[:32].hex(), np.frombuffer(rec[32:-4], "<f4").copy())
        else:
            corrupt += 1
    return found, corrupt


# ---------------------------------------------------------------- the memory-mapped store

@pytest.fixture
def messy_store(tmp_path, monkeypatch) -> Path:
    """A store with repeats (first wins), a damaged record, a torn tail, digests ending in 00,
    and more appends than one merge of the recent dict (MERGE_EVERY made small)."""
    monkeypatch.setattr(FeatureStore, "MERGE_EVERY", 16)
    rng = np.random.default_rng(0)
    ds = digests(100) + [d for d in digests(3000, "z") if d.endswith("00")][:3]
    store = FeatureStore(tmp_path, DIM)
    for start in range(0, len(ds), 7):
        batch = ds[start:start + 7]
        store.append([(d, rng.standard_normal(DIM)) for d in batch])
    store.append([(d, np.full(DIM, 9.0)) for d in ds[:10]])  # repeats: must not win
    size = 32 + 4 * DIM + 4
    data = bytearray((tmp_path / STORE_FILE).read_bytes())
    data[5 * size + 40] ^= 0xFF  # damage record 5
    (tmp_path / STORE_FILE).write_bytes(bytes(data) + b"\x01" * (size // 2))  # and a torn tail
    return tmp_path


def test_memory_mapped_store_reads_exactly_what_the_dict_reader_read(messy_store, monkeypatch):
    reference, corrupt = old_store_reading(messy_store / STORE_FILE, DIM)
    store = FeatureStore(messy_store, DIM)
    assert store.corrupt == corrupt == 1
    assert len(store) == len(reference) == 103  # 103 distinct digests, the damaged one recovered by its repeat
    np.testing.assert_array_equal(store.get(digests(100)[5]), np.full(DIM, 9.0, np.float32))
    for d, v in reference.items():
        assert d in store
        got = store.get(d)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, v)
    # The vectorised lookup agrees with the per-digest one, misses included, in blocks or not.
    asked = list(reference) + digests(5, "absent")
    rows = store.rows(digest_keys(asked))
    assert (rows[-5:] == -1).all() and (rows[:-5] >= 0).all()
    monkeypatch.setattr(store_mod, "LOOKUP_BLOCK", 10)
    np.testing.assert_array_equal(store.rows(digest_keys(asked)), rows)
    np.testing.assert_array_equal(store.vectors(rows[:-5]), np.stack([reference[d] for d in asked[:-5]]))


def test_appends_after_open_are_found_before_and_after_a_merge(tmp_path, monkeypatch):
    monkeypatch.setattr(FeatureStore, "MERGE_EVERY", 5)
    store = FeatureStore(tmp_path, DIM)
    ds, vs = digests(23), np.random.default_rng(1).standard_normal((23, DIM)).astype(np.float32)
    for i in range(23):
        store.append([(ds[i], vs[i])])
        assert store._recent.keys().__len__() < 5  # merged every 5 appends
        np.testing.assert_array_equal(store.vectors(store.rows(digest_keys(ds[:i + 1]))), vs[:i + 1])
    assert len(store) == 23
    store.append([(ds[0], np.zeros(DIM))])  # a later record of a known digest changes nothing
    np.testing.assert_array_equal(store.get(ds[0]), vs[0])


def test_opening_the_store_holds_no_python_object_per_record(tmp_path):
    ds = digests(3000)
    FeatureStore(tmp_path, DIM).append([(d, np.ones(DIM)) for d in ds])
    store = FeatureStore(tmp_path, DIM)
    assert store._recent == {}  # the index is two arrays
    assert store._keys.dtype == np.dtype("S32") and store._keys.nbytes == 32 * 3000
    assert store._rows.nbytes == 8 * 3000


def test_store_features_is_a_mapping_of_just_the_requested_images(tmp_path):
    store = FeatureStore(tmp_path, DIM)
    ds, vs = digests(6), np.random.default_rng(2).standard_normal((6, DIM)).astype(np.float32)
    store.append(list(zip(ds, vs)))
    wanted = ds[:4]
    view = StoreFeatures(store, store.rows(digest_keys(wanted + wanted[:1])))  # a repeat counts once
    assert len(view) == 4 and set(view) == set(wanted)
    assert ds[4] not in view and 42 not in view
    np.testing.assert_array_equal(view[ds[2]], vs[2])
    with pytest.raises(KeyError):
        view[ds[5]]


# ---------------------------------------------------------------- feature matrices

def _samples(ds: list[str]) -> SampleTable:
    return SampleTable.from_samples(Sample(Path(f"/img/{i}.png"), i % 3, d, "train") for i, d in enumerate(ds))


@pytest.mark.parametrize("max_in_memory", [1 << 30, 0])
def test_feature_matrix_equals_stacking_the_dict(tmp_path, monkeypatch, max_in_memory):
    monkeypatch.setattr(features_mod, "MATRIX_CHUNK_ROWS", 7)  # several blocks
    monkeypatch.setattr(store_mod, "LOOKUP_BLOCK", 3)  # lookups in blocks too
    ds = digests(40)
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
    store.append([(digests(1)[0], np.ones(DIM))])
    view = StoreFeatures(store, store.rows(digest_keys(digests(1))))
    x, y = feature_matrix(_samples([]), view, DIM)
    assert x.shape == (0, DIM) and y.shape == (0,) and y.dtype == np.int64
    with pytest.raises(KeyError):
        feature_matrix(_samples(digests(2)), view, DIM)


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


# ---------------------------------------------------------------- end to end on generated images


def test_generator_makes_ten_balanced_classes_and_is_reused(synthetic):
    counts = {d.name: len(list(d.glob("*.png"))) for d in synthetic.iterdir() if d.is_dir()}
    assert sorted(counts) == sorted(bench.SHAPES) and set(counts.values()) == {12}
    before = (synthetic / "circle" / "img_0000000.png").stat().st_mtime_ns
    assert bench.make_synthetic_folder(synthetic.parent, 120) == synthetic
    assert (synthetic / "circle" / "img_0000000.png").stat().st_mtime_ns == before  # not regenerated


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


@pytest.fixture(scope="module")
def model_dir(synthetic, tiny, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    cfg = TrainConfig(backbone=str(tiny), cache_dir=str(cache), quiet=True, head=HeadConfig(steps=100))
    out = tmp_path_factory.mktemp("model")
    retrain.train(synthetic, cfg).save(out, report=False)
    return out


@pytest.fixture
def folder_with_bad_files(synthetic, tmp_path) -> Path:
    """Nine good images and two unreadable ones, in a nested folder."""
    root = tmp_path / "to_predict"
    (root / "sub").mkdir(parents=True)
    for i, src in enumerate(sorted((synthetic / "square").glob("*.png"))[:9]):
        (root / ("sub" if i % 2 else ".") / f"good_{i}.png").write_bytes(src.read_bytes())
    (root / "broken.png").write_text("not, really \"an\" image")
    (root / "sub" / "empty.jpg").write_bytes(b"")
    return root


@pytest.mark.parametrize("name", ["preds.csv", "preds.jsonl"])
def test_predict_to_file_writes_one_valid_row_per_image(model_dir, folder_with_bad_files, tmp_path, monkeypatch,
                                                       name):
    monkeypatch.setattr(predict_mod, "STREAM_CHUNK", 4)  # several chunks
    clf = load(model_dir)
    out = tmp_path / "out" / name
    summary = predict_to_file(clf, [folder_with_bad_files], out, top_k=2)
    expected = [p.to_dict() for p in retrain.predict(clf, [folder_with_bad_files], top_k=2)]
    assert summary.rows == len(expected) == 11 and summary.failures == 2
    assert not out.with_name(name + ".partial").exists()
    if name.endswith(".jsonl"):
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert rows == expected
    else:
        with open(out, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["path", "unknown", "error", "label_1", "score_1", "label_2", "score_2"]
        assert [r["path"] for r in rows] == [e["path"] for e in expected]
        for row, exp in zip(rows, expected):
            if "error" in exp:
                assert row["error"] == exp["error"] and row["label_1"] == row["unknown"] == ""
            else:
                assert row["error"] == "" and row["unknown"] == str(exp["unknown"]).lower()
                assert [row["label_1"], row["label_2"]] == [p["label"] for p in exp["predictions"]]
                assert abs(float(row["score_1"]) - exp["predictions"][0]["score"]) < 2e-6
    bad = {Path(e["path"]).name for e in expected if "error" in e}
    assert bad == {"broken.png", "empty.jpg"}


def test_interrupted_predict_leaves_only_whole_rows_in_the_partial_file(model_dir, folder_with_bad_files, tmp_path,
                                                                         monkeypatch):
    clf = load(model_dir)
    real = clf.predict_paths

    def dies_after_five(paths, *a, **k):
        for i, pred in enumerate(real(paths, *a, **k)):
            if i == 5:
                raise KeyboardInterrupt
            yield pred
    monkeypatch.setattr(clf, "predict_paths", dies_after_five)
    out = tmp_path / "preds.jsonl"
    with pytest.raises(KeyboardInterrupt):
        predict_to_file(clf, [folder_with_bad_files], out)
    assert not out.exists()
    text = (tmp_path / "preds.jsonl.partial").read_text(encoding="utf-8")
    assert text.endswith("\n")
    assert len([json.loads(line) for line in text.splitlines()]) == 5


def test_predict_to_file_refuses_unknown_formats_missing_inputs_and_empty_folders(model_dir, tmp_path):
    with pytest.raises(UserError, match=r"\.csv or \.jsonl"):
        predict_to_file(model_dir, [tmp_path], tmp_path / "out.txt")
    with pytest.raises(UserError, match="image not found"):
        predict_to_file(model_dir, [tmp_path / "nope"], tmp_path / "out.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        predict_to_file(model_dir, [tmp_path / "empty"], tmp_path / "out.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing written, nothing left over


def test_cli_predict_output_flag(model_dir, folder_with_bad_files, tmp_path, capsys):
    from retrain.cli import retrain_main as main

    out = tmp_path / "p.csv"
    rc = main(["predict", str(model_dir), str(folder_with_bad_files), "--output", str(out), "--top-k", "1"])
    assert rc == 1  # unreadable files, as without --output
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 11 and sum(bool(r["error"]) for r in rows) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # results go to the file, not stdout
    assert "11" in captured.err and str(out) in captured.err


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
