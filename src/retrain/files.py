"""Writing files so that a crash never leaves a half-written one behind; arrays that spill to disk."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def empty_matrix(n: int, dim: int, max_in_memory: int, spill_dir: Path | None = None) -> np.ndarray:
    """(n, dim) float32 zeros: an ordinary array up to `max_in_memory` bytes, else an np.memmap
    over an unlinked temporary file in `spill_dir` (default: the system's), which memory pressure can evict."""
    if n * dim * 4 <= max_in_memory:
        return np.zeros((n, dim), np.float32)
    # An unlinked file: the mapping keeps it alive, the OS removes it when the mapping goes.
    with tempfile.TemporaryFile(prefix="retrain-matrix-", dir=spill_dir) as f:
        f.truncate(n * dim * 4)
        return np.memmap(f, dtype=np.float32, mode="r+", shape=(n, dim))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def default_cache_dir() -> Path:
    """Where backbones and features are cached: $RETRAIN_CACHE, else the XDG cache dir."""
    if os.environ.get("RETRAIN_CACHE"):
        return Path(os.environ["RETRAIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "retrain"
