"""IDX import (`retrain import-idx`, used by `make demo`): files written here, read back as class folders."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from retrain.cli import retrain_main
from retrain.datasets import CLASS_NAMES, idx_to_folders, read_idx
from retrain.errors import UserError


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x0000_08_<ndim>, big-endian dimensions, the values."""
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


@pytest.fixture
def idx_pair(tmp_path):
    """Ten 6x5 images whose pixels all equal their index, labelled 0, 1, 2, 0, 1, 2, ..."""
    images = np.repeat(np.arange(10, dtype=np.uint8)[:, None, None], 30, axis=1).reshape(10, 6, 5)
    labels = (np.arange(10) % 3).astype(np.uint8)
    (tmp_path / "images.idx.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (tmp_path / "labels.idx").write_bytes(idx_bytes(labels))
    return tmp_path / "images.idx.gz", tmp_path / "labels.idx", images, labels


def test_read_idx_reads_plain_and_gzipped_files(idx_pair):
    images_file, labels_file, images, labels = idx_pair
    np.testing.assert_array_equal(read_idx(images_file), images)
    np.testing.assert_array_equal(read_idx(labels_file), labels)


@pytest.mark.parametrize("raw, message", [(b"\x00\x00\x07\x01abcd", "bad magic number"),
                                          (bytes([0, 0, 8, 1]) + struct.pack(">I", 9) + b"\x01\x02", "truncated")])
def test_read_idx_refuses_what_is_not_whole_idx(raw, message, tmp_path):
    (tmp_path / "x.idx").write_bytes(raw)
    with pytest.raises(UserError, match=message):
        read_idx(tmp_path / "x.idx")


def test_idx_to_folders_writes_each_image_under_its_class(idx_pair, tmp_path):
    images_file, labels_file, images, labels = idx_pair
    assert idx_to_folders(images_file, labels_file, tmp_path / "out", class_names="fashion", limit_per_class=2) == 6
    for k in range(3):
        files = sorted((tmp_path / "out" / CLASS_NAMES["fashion"][k]).glob("*.png"))
        assert [int(f.stem) for f in files] == [k, k + 3]  # the first two of the class, named by index
        assert all((np.asarray(Image.open(f)) == int(f.stem)).all() for f in files)


def test_labels_beyond_the_class_names_are_refused(tmp_path):
    (tmp_path / "i.idx").write_bytes(idx_bytes(np.zeros((2, 3, 3), np.uint8)))
    (tmp_path / "l.idx").write_bytes(idx_bytes(np.array([0, 12], np.uint8)))
    with pytest.raises(UserError, match="labels go up to 12, but 'digits' names only 10 classes"):
        idx_to_folders(tmp_path / "i.idx", tmp_path / "l.idx", tmp_path / "out")


@pytest.mark.parametrize("spelling", ["--limit-per-class", "--limit_per_class"])
def test_the_import_idx_command(idx_pair, tmp_path, capsys, spelling):
    images_file, labels_file, _, _ = idx_pair
    assert retrain_main(["import-idx", str(images_file), str(labels_file), str(tmp_path / "out"), spelling, "1"]) == 0
    assert "Wrote 3 PNG images" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0", "1", "2"]
