"""Importers that turn other dataset formats into the folder-of-class-folders layout."""
from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UserError
from .guards import open_regular

CLASS_NAMES = {
    "fashion": ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                "Ankle_boot"],
    "digits": [str(i) for i in range(10)],
}
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed or not, into a numpy array."""
    path = Path(path)
    try:
        with open_regular(path, max_bytes=4 << 30) as f:  # not a pipe or device: they would block or never end
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise UserError(f"{path} is truncated: its header names {ndim} dimensions but holds fewer")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    count = int(np.prod(dims))
    if len(raw) - 4 - 4 * ndim < count * dtype.itemsize:
        raise UserError(f"{path} is truncated: expected {count} values of shape {dims}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=4 + 4 * ndim).reshape(dims)


def idx_to_folders(images: str | os.PathLike, labels: str | os.PathLike, output: str | os.PathLike,
                   class_names: str = "digits", limit_per_class: int | None = None) -> int:
    """Write IDX images as PNGs into OUTPUT/<class>/<index>.png; returns how many were written.

    OUTPUT must be new or empty: the class folders are written aside and renamed into place when
    complete, so no file of the user's is replaced and an interrupted import leaves nothing half.
    """
    if limit_per_class is not None and limit_per_class < 1:
        raise UserError(f"--limit_per_class must be at least 1 (got {limit_per_class})")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists{' and holds files' if out.is_dir() else ' as a file'}: give a new or "
                        "empty folder for the class folders")
    x, y = read_idx(images), read_idx(labels)
    names = CLASS_NAMES[class_names]
    _check_idx_pair(x, y, names, class_names)
    staging = out.with_name(f".{out.name}.{os.getpid()}.partial")
    staging.mkdir(parents=True)
    try:
        written = np.zeros(len(names), int)
        for i, (img, label) in enumerate(zip(x, y)):
            if limit_per_class is not None and written[label] >= limit_per_class:
                continue
            folder = staging / names[label]
            folder.mkdir(exist_ok=True)
            Image.fromarray(img, "L").save(folder / f"{i:05d}.png")
            written[label] += 1
        if out.exists():
            out.rmdir()  # empty, as checked
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return int(written.sum())


def _check_idx_pair(x: np.ndarray, y: np.ndarray, names: list[str], class_names: str) -> None:
    """One line for images and labels that cannot become 8-bit photos in the named classes."""
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise UserError(f"expected N images of HxW and N labels, got shapes {x.shape} and {y.shape}")
    if not len(y):
        raise UserError("the IDX files hold no images")
    if x.dtype != np.uint8:  # floats in [0, 1] would become black, 16-bit values would wrap around
        kind = x.dtype.newbyteorder("=").name
        raise UserError(f"the images are {kind} values; import-idx reads 8-bit (unsigned byte) images, as MNIST's")
    if y.min() < 0 or y.max() >= len(names):
        raise UserError(f"labels run from {int(y.min())} to {int(y.max())}, but '{class_names}' names classes 0 to "
                        f"{len(names) - 1}")
