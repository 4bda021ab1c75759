"""Importers that turn other dataset formats into the folder-of-class-folders layout."""
from __future__ import annotations

import gzip
import os
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
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    count = int(np.prod(dims))
    if len(raw) - 4 - 4 * ndim < count * dtype.itemsize:
        raise UserError(f"{path} is truncated: expected {count} values of shape {dims}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=4 + 4 * ndim).reshape(dims)


def idx_to_folders(images: str | os.PathLike, labels: str | os.PathLike, output: str | os.PathLike,
                   class_names: str = "digits", limit_per_class: int | None = None) -> int:
    """Write IDX images as PNGs into OUTPUT/<class>/<index>.png; returns how many were written."""
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise UserError(f"expected N images of HxW and N labels, got shapes {x.shape} and {y.shape}")
    names = CLASS_NAMES[class_names]
    if y.max() >= len(names):
        raise UserError(f"labels go up to {int(y.max())}, but '{class_names}' names only {len(names)} classes")
    out = Path(output)
    written = np.zeros(len(names), int)
    for i, (img, label) in enumerate(zip(x, y)):
        if limit_per_class is not None and written[label] >= limit_per_class:
            continue
        folder = out / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.astype(np.uint8), "L").save(folder / f"{i:05d}.png")
        written[label] += 1
    return int(written.sum())
