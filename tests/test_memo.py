"""memo: results kept under a digest of what made them, checked when read, pruned least recently used first."""
from __future__ import annotations

import os

import numpy as np
import pytest

from retrain.memo import DiskMemo, digest


def test_a_digest_tells_arrays_apart_by_values_dtype_and_shape():
    a = np.arange(6, dtype=np.uint8)
    assert digest(a, "x", 1) == digest(a.copy(), "x", 1)
    others = [a + 1, a.astype(np.int16), a.reshape(2, 3), a[::-1].copy()]
    assert len({digest(a)} | {digest(o) for o in others}) == 1 + len(others)
    assert digest({"b": 1, "a": [1.5]}) == digest({"a": [1.5], "b": 1})  # key order does not matter
    assert digest("ab", "c") != digest("a", "bc")  # parts are kept apart


def memo(folder, keep=10) -> DiskMemo:
    return DiskMemo(folder, ".bin", lambda data: data.startswith(b"ok"), keep)


def test_a_result_is_made_once_then_found_again(tmp_path):
    calls = []

    def make() -> bytes:
        calls.append(1)
        return b"ok result"
    first, second = memo(tmp_path), memo(tmp_path)
    assert first.get("k", make) == b"ok result" and first.made == 1
    assert second.get("k", make) == b"ok result" and second.made == 0
    assert len(calls) == 1 and (tmp_path / "k.bin").read_bytes() == b"ok result"


def test_a_damaged_entry_is_made_again_and_replaced(tmp_path):
    (tmp_path / "k.bin").write_bytes(b"garbage")
    m = memo(tmp_path)
    assert m.get("k", lambda: b"ok again") == b"ok again" and m.made == 1
    assert (tmp_path / "k.bin").read_bytes() == b"ok again"


def test_a_folder_that_cannot_be_written_still_gives_the_result(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    m = memo(blocker / "memo")
    assert m.get("k", lambda: b"ok") == b"ok" and m.made == 1
    assert m.prune() == 0


def test_prune_keeps_the_most_recently_used(tmp_path):
    m = memo(tmp_path, keep=3)
    for i in range(5):
        m.get(f"k{i}", lambda: b"ok")
        os.utime(tmp_path / f"k{i}.bin", (1000 + i, 1000 + i))
    m.get("k0", lambda: pytest.fail("k0 is kept"))  # used now: the newest
    (tmp_path / "other.txt").write_text("not an entry")
    assert m.prune() == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k0.bin", "k3.bin", "k4.bin", "other.txt"]


def test_a_pipe_in_the_folder_is_made_anew_and_a_failed_touch_keeps_the_hit(tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "k.bin")  # a plain open would wait for a writer forever
    m = memo(tmp_path)
    assert m.get("k", lambda: b"ok") == b"ok" and m.made == 1
    m.get("j", lambda: b"ok j")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "utime", refuse)  # a cache another user owns, or a read-only mount
    again = memo(tmp_path)
    assert again.get("j", lambda: pytest.fail("a hit")) == b"ok j" and again.made == 0
