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


def typed_idx(array: np.ndarray, code: int) -> bytes:
    """An IDX file of another value type (0x09 int8, 0x0B int16, 0x0D float32), big-endian as the format says."""
    big = array.astype(array.dtype.newbyteorder(">"))
    return bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + big.tobytes()


@pytest.mark.parametrize("images, labels, message", [
    (idx_bytes(np.zeros((2, 3, 3), np.uint8)), idx_bytes(np.array([0, 12], np.uint8)),
     "labels run from 0 to 12, but 'digits' names classes 0 to 9"),
    (idx_bytes(np.zeros((2, 3, 3), np.uint8)), typed_idx(np.array([0, -1], np.int8), 0x09),
     "labels run from -1 to 0"),  # -1 would have gone into the last class
    (typed_idx(np.full((2, 3, 3), 0.5, np.float32), 0x0D), idx_bytes(np.array([0, 1], np.uint8)),
     "the images are float32 values; import-idx reads 8-bit"),  # would have been all black
    (typed_idx(np.full((2, 3, 3), 999, np.int16), 0x0B), idx_bytes(np.array([0, 1], np.uint8)),
     "the images are int16 values"),  # would have wrapped around
    (idx_bytes(np.zeros((0, 3, 3), np.uint8)), idx_bytes(np.zeros(0, np.uint8)), "hold no images"),
    (bytes([0, 0, 8, 3, 0, 0]), idx_bytes(np.array([0, 1], np.uint8)), "truncated: its header names 3 dimensions"),
])
def test_idx_files_that_cannot_become_photos_in_their_classes_are_refused(images, labels, message, tmp_path):
    (tmp_path / "i.idx").write_bytes(images)
    (tmp_path / "l.idx").write_bytes(labels)
    with pytest.raises(UserError, match=message):
        idx_to_folders(tmp_path / "i.idx", tmp_path / "l.idx", tmp_path / "out")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["i.idx", "l.idx"]


def test_import_idx_never_writes_into_a_folder_that_holds_files(idx_pair, tmp_path):
    images_file, labels_file, _, _ = idx_pair
    mine = tmp_path / "photos" / "0" / "00000.png"
    mine.parent.mkdir(parents=True)
    mine.write_text("precious")
    with pytest.raises(UserError, match="already exists and holds files: give a new or empty folder"):
        idx_to_folders(images_file, labels_file, tmp_path / "photos")
    assert mine.read_text() == "precious" and [p.name for p in (tmp_path / "photos").iterdir()] == ["0"]
    (tmp_path / "empty").mkdir()
    assert idx_to_folders(images_file, labels_file, tmp_path / "empty") == 10  # an empty folder is fine
    with pytest.raises(UserError, match="at least 1"):
        idx_to_folders(images_file, labels_file, tmp_path / "new", limit_per_class=0)


@pytest.mark.parametrize("spelling", ["--limit-per-class", "--limit_per_class"])
def test_the_import_idx_command(idx_pair, tmp_path, capsys, spelling):
    images_file, labels_file, _, _ = idx_pair
    assert retrain_main(["import-idx", str(images_file), str(labels_file), str(tmp_path / "out"), spelling, "1"]) == 0
    assert "Wrote 3 PNG images" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0", "1", "2"]
