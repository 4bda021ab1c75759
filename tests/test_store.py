"""Tests for retrain.store: the append-only, checksummed feature store and its index (random vectors, no model)."""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest

import retrain.store as store_mod
from retrain.scan import digest_keys
from retrain.store import STORE_FILE, FeatureStore, StoreFeatures

from conftest import hex_digests

DIM = 16
INDEX_DIM = 8


def digests(n: int, tag: str = "", *, allow_trailing_zero: bool = False) -> list[str]:
    """n distinct sha256 hex digests.

    By default digests whose last byte is 00 are left out: those hit a separate bug (see
    test_digest_ending_in_zero_byte_survives_reload) that the other tests should not trip over.
    """
    out, i = [], 0
    while len(out) < n:
        d = hashlib.sha256(f"{tag}:{i}".encode()).hexdigest()
        i += 1
        if allow_trailing_zero or not d.endswith("00"):
            out.append(d)
    return out


def vectors(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def record_size(dim: int = DIM) -> int:
    return 32 + 4 * dim + 4  # digest, float32 vector, crc32


def assert_store_holds(store: FeatureStore, items) -> None:
    for d, v in items:
        assert d in store, d
        got = store.get(d)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, v)


# ---------------------------------------------------------------- FeatureStore

def test_empty_store(tmp_path):
    store = FeatureStore(tmp_path / "new" / "folder", DIM)
    assert len(store) == 0 and store.corrupt == 0
    assert digests(1)[0] not in store
    store.append([])  # a no-op, creates nothing
    assert not (tmp_path / "new" / "folder" / STORE_FILE).exists()


def test_append_then_reopen_returns_identical_vectors(tmp_path):
    ds, vs = digests(50), vectors(50)
    store = FeatureStore(tmp_path, DIM)
    store.append(list(zip(ds[:20], vs[:20])))
    store.append(list(zip(ds[20:], vs[20:])))
    assert len(store) == 50
    assert_store_holds(store, zip(ds, vs))  # in the same process

    again = FeatureStore(tmp_path, DIM)
    assert len(again) == 50 and again.corrupt == 0
    assert_store_holds(again, zip(ds, vs))  # and after reopening
    assert (tmp_path / STORE_FILE).stat().st_size == 50 * record_size()


def test_float64_and_list_inputs_are_stored_as_float32(tmp_path):
    d = digests(2)
    v64 = np.linspace(-1, 1, DIM)  # float64
    store = FeatureStore(tmp_path, DIM)
    store.append([(d[0], v64), (d[1], list(range(DIM)))])
    again = FeatureStore(tmp_path, DIM)
    np.testing.assert_array_equal(again.get(d[0]), v64.astype(np.float32))
    np.testing.assert_array_equal(again.get(d[1]), np.arange(DIM, dtype=np.float32))


def test_first_record_for_a_digest_wins(tmp_path):
    d = digests(1)[0]
    store = FeatureStore(tmp_path, DIM)
    store.append([(d, np.ones(DIM))])
    store.append([(d, np.zeros(DIM))])
    np.testing.assert_array_equal(store.get(d), np.ones(DIM, np.float32))
    np.testing.assert_array_equal(FeatureStore(tmp_path, DIM).get(d), np.ones(DIM, np.float32))


def test_torn_record_is_ignored_then_truncated_by_next_append(tmp_path):
    ds, vs = digests(8), vectors(8)
    FeatureStore(tmp_path, DIM).append(list(zip(ds[:5], vs[:5])))
    path = tmp_path / STORE_FILE
    with open(path, "ab") as f:  # a killed run left part of a record behind
        f.write(b"\xab" * (record_size() - 3))
    assert path.stat().st_size == 6 * record_size() - 3

    store = FeatureStore(tmp_path, DIM)
    assert len(store) == 5 and store.corrupt == 0  # the partial record is simply not there
    assert_store_holds(store, zip(ds[:5], vs[:5]))

    store.append(list(zip(ds[5:], vs[5:])))
    assert path.stat().st_size == 8 * record_size()  # torn bytes cut off, records stay aligned
    again = FeatureStore(tmp_path, DIM)
    assert len(again) == 8 and again.corrupt == 0
    assert_store_holds(again, zip(ds, vs))


def test_torn_record_longer_than_one_record(tmp_path):
    # A torn multi-record write: one whole (garbage) record plus a fraction.
    ds, vs = digests(3), vectors(3)
    FeatureStore(tmp_path, DIM).append(list(zip(ds[:2], vs[:2])))
    with open(tmp_path / STORE_FILE, "ab") as f:
        f.write(b"\x00" * (record_size() + 7))
    store = FeatureStore(tmp_path, DIM)
    assert len(store) == 2 and store.corrupt == 1  # the whole garbage record fails its crc
    store.append([(ds[2], vs[2])])
    again = FeatureStore(tmp_path, DIM)
    assert len(again) == 3 and again.corrupt == 1
    assert_store_holds(again, zip(ds, vs))


@pytest.mark.parametrize("where", ["digest", "vector", "crc"])
def test_flipped_bytes_fail_the_crc(tmp_path, where):
    ds, vs = digests(5), vectors(5)
    FeatureStore(tmp_path, DIM).append(list(zip(ds, vs)))
    path = tmp_path / STORE_FILE
    data = bytearray(path.read_bytes())
    offset = 2 * record_size() + {"digest": 5, "vector": 32 + 4 * 3 + 1, "crc": record_size() - 2}[where]
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))

    store = FeatureStore(tmp_path, DIM)
    assert store.corrupt == 1
    assert len(store) == 4
    assert ds[2] not in store  # so its image gets recomputed
    assert_store_holds(store, [(d, v) for i, (d, v) in enumerate(zip(ds, vs)) if i != 2])


def test_recomputed_record_after_corruption_is_used(tmp_path):
    ds, vs = digests(3), vectors(3)
    FeatureStore(tmp_path, DIM).append(list(zip(ds, vs)))
    path = tmp_path / STORE_FILE
    data = bytearray(path.read_bytes())
    data[record_size() + 40] ^= 0xFF
    path.write_bytes(bytes(data))
    store = FeatureStore(tmp_path, DIM)
    assert ds[1] not in store
    store.append([(ds[1], vs[1])])
    again = FeatureStore(tmp_path, DIM)
    assert again.corrupt == 1 and len(again) == 3
    assert_store_holds(again, zip(ds, vs))


def test_store_file_is_raw_records_never_pickled(tmp_path, monkeypatch):
    ds, vs = digests(4), vectors(4)
    FeatureStore(tmp_path, DIM).append(list(zip(ds, vs)))
    data = (tmp_path / STORE_FILE).read_bytes()
    assert not data.startswith(b"\x80") and not data.startswith(b"\x93NUMPY")  # no pickle / .npy header
    assert len(data) == 4 * record_size()
    for i, (d, v) in enumerate(zip(ds, vs)):
        rec = data[i * record_size(): (i + 1) * record_size()]
        assert rec[:32] == bytes.fromhex(d)
        np.testing.assert_array_equal(np.frombuffer(rec[32:32 + 4 * DIM], "<f4"), v)

    def forbidden(*a, **k):
        raise AssertionError("the feature store must never unpickle")
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(np, "load", forbidden)
    store = FeatureStore(tmp_path, DIM)
    assert_store_holds(store, zip(ds, vs))


def test_dimension_is_part_of_the_record_layout(tmp_path):
    ds, vs = digests(3), vectors(3, dim=8)
    FeatureStore(tmp_path, 8).append(list(zip(ds, vs)))
    other = FeatureStore(tmp_path, 4)  # the wrong dim: records don't line up, none pass the crc
    assert len(other) == 0


def test_digest_ending_in_zero_byte_survives_reload(tmp_path):
    d = next(x for x in digests(2000, "z", allow_trailing_zero=True) if x.endswith("00"))
    v = vectors(1)[0]
    FeatureStore(tmp_path, DIM).append([(d, v)])
    store = FeatureStore(tmp_path, DIM)
    assert store.corrupt == 0
    assert d in store
    np.testing.assert_array_equal(store.get(d), v)


def _append_worker(folder: str, tag: str, seed: int, start, n: int) -> None:
    store = FeatureStore(Path(folder), DIM)
    ds, vs = digests(n, tag), vectors(n, seed)
    start.wait()  # both processes are ready: now append at the same time
    for i in range(0, n, 2):  # many small appends, to interleave with the other process
        store.append(list(zip(ds[i:i + 2], vs[i:i + 2])))


def test_two_processes_appending_concurrently(tmp_path):
    ctx = mp.get_context("spawn")
    start = ctx.Barrier(2, timeout=60)
    procs = [ctx.Process(target=_append_worker, args=(str(tmp_path), tag, seed, start, 200))
             for tag, seed in (("p1", 1), ("p2", 2))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = FeatureStore(tmp_path, DIM)
    assert store.corrupt == 0
    assert len(store) == 400
    assert_store_holds(store, zip(digests(200, "p1"), vectors(200, 1)))
    assert_store_holds(store, zip(digests(200, "p2"), vectors(200, 2)))
    assert (tmp_path / STORE_FILE).stat().st_size == 400 * record_size()


# ---------------------------------------------------------------- the memory-mapped index (vectors of INDEX_DIM floats)

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


@pytest.fixture
def messy_store(tmp_path, monkeypatch) -> Path:
    """A store with repeats (first wins), a damaged record, a torn tail, digests ending in 00,
    and more appends than one merge of the recent dict (MERGE_EVERY made small)."""
    monkeypatch.setattr(FeatureStore, "MERGE_EVERY", 16)
    rng = np.random.default_rng(0)
    ds = hex_digests(100) + [d for d in hex_digests(3000, "z") if d.endswith("00")][:3]
    store = FeatureStore(tmp_path, INDEX_DIM)
    for start in range(0, len(ds), 7):
        batch = ds[start:start + 7]
        store.append([(d, rng.standard_normal(INDEX_DIM)) for d in batch])
    store.append([(d, np.full(INDEX_DIM, 9.0)) for d in ds[:10]])  # repeats: must not win
    size = 32 + 4 * INDEX_DIM + 4
    data = bytearray((tmp_path / STORE_FILE).read_bytes())
    data[5 * size + 40] ^= 0xFF  # damage record 5
    (tmp_path / STORE_FILE).write_bytes(bytes(data) + b"\x01" * (size // 2))  # and a torn tail
    return tmp_path


def test_memory_mapped_store_reads_exactly_what_the_dict_reader_read(messy_store, monkeypatch):
    reference, corrupt = old_store_reading(messy_store / STORE_FILE, INDEX_DIM)
    store = FeatureStore(messy_store, INDEX_DIM)
    assert store.corrupt == corrupt == 1
    assert len(store) == len(reference) == 103  # 103 distinct digests, the damaged one recovered by its repeat
    np.testing.assert_array_equal(store.get(hex_digests(100)[5]), np.full(INDEX_DIM, 9.0, np.float32))
    for d, v in reference.items():
        assert d in store
        got = store.get(d)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, v)
    # The vectorised lookup agrees with the per-digest one, misses included, in blocks or not.
    asked = list(reference) + hex_digests(5, "absent")
    rows = store.rows(digest_keys(asked))
    assert (rows[-5:] == -1).all() and (rows[:-5] >= 0).all()
    monkeypatch.setattr(store_mod, "LOOKUP_BLOCK", 10)
    np.testing.assert_array_equal(store.rows(digest_keys(asked)), rows)
    np.testing.assert_array_equal(store.vectors(rows[:-5]), np.stack([reference[d] for d in asked[:-5]]))


def test_appends_after_open_are_found_before_and_after_a_merge(tmp_path, monkeypatch):
    monkeypatch.setattr(FeatureStore, "MERGE_EVERY", 5)
    store = FeatureStore(tmp_path, INDEX_DIM)
    ds, vs = hex_digests(23), np.random.default_rng(1).standard_normal((23, INDEX_DIM)).astype(np.float32)
    for i in range(23):
        store.append([(ds[i], vs[i])])
        assert store._recent.keys().__len__() < 5  # merged every 5 appends
        np.testing.assert_array_equal(store.vectors(store.rows(digest_keys(ds[:i + 1]))), vs[:i + 1])
    assert len(store) == 23
    store.append([(ds[0], np.zeros(INDEX_DIM))])  # a later record of a known digest changes nothing
    np.testing.assert_array_equal(store.get(ds[0]), vs[0])


def test_opening_the_store_holds_no_python_object_per_record(tmp_path):
    ds = hex_digests(3000)
    FeatureStore(tmp_path, INDEX_DIM).append([(d, np.ones(INDEX_DIM)) for d in ds])
    store = FeatureStore(tmp_path, INDEX_DIM)
    assert store._recent == {}  # the index is two arrays
    assert store._keys.dtype == np.dtype("S32") and store._keys.nbytes == 32 * 3000
    assert store._rows.nbytes == 8 * 3000


def test_store_features_is_a_mapping_of_just_the_requested_images(tmp_path):
    store = FeatureStore(tmp_path, INDEX_DIM)
    ds, vs = hex_digests(6), np.random.default_rng(2).standard_normal((6, INDEX_DIM)).astype(np.float32)
    store.append(list(zip(ds, vs)))
    wanted = ds[:4]
    view = StoreFeatures(store, store.rows(digest_keys(wanted + wanted[:1])))  # a repeat counts once
    assert len(view) == 4 and set(view) == set(wanted)
    assert ds[4] not in view and 42 not in view
    np.testing.assert_array_equal(view[ds[2]], vs[2])
    with pytest.raises(KeyError):
        view[ds[5]]
