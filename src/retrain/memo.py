"""Small results kept on disk under a digest of what made them, so that a rerun finds them again.

The report's plots were two thirds of a rerun's time (2 of 3 s on intel_scenes), although a rerun
that saves the same model for the same photos draws the same pictures. Each entry is one file,
written atomically and checked when read (a damaged one is made again); the least recently used
beyond a count are removed, so the folder stays small.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from .files import atomic_write_bytes, prune_least_recent
from .guards import open_regular

MAX_ENTRY_BYTES = 64 << 20  # far above any plot: a link to an endless file is not read to its end


def digest(*parts: object) -> str:
    """A SHA-256 over `parts`: bytes as they are, arrays by dtype, shape and bytes, anything else by its JSON form."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, bytes):
            h.update(b"bytes %d " % len(part))
            h.update(part)
        elif isinstance(part, np.ndarray):
            h.update(f"array {part.dtype.str} {part.shape}".encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=repr).encode())
        h.update(b"\0")
    return h.hexdigest()


class DiskMemo:
    """Files named by a key in `folder`: read back when sound, else made by the caller and kept."""

    def __init__(self, folder: Path, suffix: str, sound: Callable[[bytes], bool], keep: int) -> None:
        self.folder, self.suffix, self.sound, self.keep = Path(folder), suffix, sound, keep
        self.made = 0  # entries made (not found) by this memo
        self.unwritable: OSError | None = None  # why the last entry made could not be kept

    def get(self, key: str, make: Callable[[], bytes]) -> bytes:
        path = self.folder / f"{key}{self.suffix}"
        try:
            with open_regular(path, MAX_ENTRY_BYTES) as f:  # never a pipe's endless wait
                data = f.read()
        except OSError:  # not kept yet, or unreadable: make it
            data = None
        if data is not None and self.sound(data):
            with contextlib.suppress(OSError):  # a read-only or shared cache: still a hit
                os.utime(path)  # recently used: pruned last
            return data
        data = make()
        self.made += 1
        try:
            atomic_write_bytes(path, data)
        except OSError as e:  # a cache that cannot be written costs the next run time, never this one its result
            self.unwritable = e
        return data

    def prune(self) -> int:
        """Remove the least recently used entries beyond `keep`; returns how many went."""
        return prune_least_recent(self.folder, self.keep,
                                  lambda e: e.name.endswith(self.suffix) and e.is_file(follow_symlinks=False))
