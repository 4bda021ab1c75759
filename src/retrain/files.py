"""Writing files so that a crash never leaves a half-written one behind; arrays that spill to disk."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
from filelock import FileLock

from .guards import file_sha256, not_a_regular_file


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _process_umask()  # read once, at import: os.umask can only be read by setting it, racing other threads


def empty_matrix(n: int, dim: int, max_in_memory: int, spill_dir: Path | None = None) -> np.ndarray:
    """(n, dim) float32 zeros: an ordinary array up to `max_in_memory` bytes, else an np.memmap
    over an unlinked temporary file in `spill_dir` (default: the system's), which memory pressure can evict."""
    if n * dim * 4 <= max_in_memory:
        return np.zeros((n, dim), np.float32)
    # An unlinked file: the mapping keeps it alive, the OS removes it when the mapping goes.
    with tempfile.TemporaryFile(prefix="retrain-matrix-", dir=spill_dir) as f:
        f.truncate(n * dim * 4)
        return np.memmap(f, dtype=np.float32, mode="r+", shape=(n, dim))


def _mode_for(path: Path) -> int:
    """The permissions of the file `path` replaces, else a new file's under the umask (mkstemp's are 0600)."""
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):
            return stat.S_IMODE(st.st_mode)
    except OSError:
        pass
    return 0o666 & ~_UMASK


def give_mode_of(fd: int, path: Path) -> None:
    """Give the temporary file open at `fd` the permissions it will have as `path` (see _mode_for); on a file
    system without modes (vfat) it keeps what it has, rather than failing the write."""
    try:
        os.fchmod(fd, _mode_for(path))
    except OSError:
        pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside `path`, fsync, then rename over it (never over a pipe or a device)."""
    path = Path(path)
    refusal = not_a_regular_file(path)
    if refusal and not path.is_dir():  # a folder fails at the rename, with the usual error
        raise refusal
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        e.filename = str(path)  # the file asked for (messages name it), not a temporary name
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            give_mode_of(f.fileno(), path)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            e.filename = str(path)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    # A file name that is not UTF-8 reaches us with surrogates (os.fsdecode): written as a \udcff
    # escape, which is what JSON spells it, instead of failing the whole write.
    atomic_write_bytes(path, text.encode("utf-8", "backslashreplace"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def default_cache_dir() -> Path:
    """Where backbones and features are cached: $RETRAIN_CACHE, else the XDG cache dir."""
    if os.environ.get("RETRAIN_CACHE"):
        return Path(os.environ["RETRAIN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "retrain"


def prune_least_recent(folder: Path, keep: int, wanted: Callable[[os.DirEntry], bool]) -> int:
    """Remove the entries of `folder` that `wanted` picks, least recently modified first, beyond the
    `keep` newest (files, or folders with what they hold); returns how many went."""
    try:
        entries = sorted((e.stat().st_mtime, e.path, e.is_dir(follow_symlinks=False))
                         for e in os.scandir(folder) if wanted(e))
    except OSError:
        return 0
    removed = 0
    for _, path, is_dir in entries[:max(len(entries) - keep, 0)]:
        try:
            shutil.rmtree(path) if is_dir else os.unlink(path)
            removed += 1
        except OSError:  # another process removed it first
            pass
    return removed


def cached_file(path: Path, build: Callable[[], bytes], check: Callable[[Path], str | None]) -> Path:
    """`path`, built once by `build()` and verified on every later use; rebuilt, with a one-line note, if damaged.

    The SHA-256 of what was written is kept beside it (PATH.sha256). A file from before that
    existed is judged by `check` (None if sound, else why not) and then gets its digest. Without
    this, one flipped byte in a cached backbone was a protobuf error on every run until the user
    found and deleted the file.
    """
    if _damage(path, check) is None:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # one process builds; the others wait, then find it sound
        damage = _damage(path, check)
        if damage is None:
            return path
        if path.exists():
            print(f"Note: the cached {path.name} is damaged ({damage}): rebuilding it.", file=sys.stderr)
        data = build()
        atomic_write_bytes(path, data)
        atomic_write_text(_digest_path(path), hashlib.sha256(data).hexdigest())
    return path


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _damage(path: Path, check: Callable[[Path], str | None]) -> str | None:
    """None if `path` is sound; "missing" or why it is damaged otherwise."""
    if not path.is_file():
        return "missing"
    try:
        expected = _digest_path(path).read_text(encoding="utf-8").strip()
    except (OSError, ValueError):  # no digest yet: a cache from before digests, or a build killed between files
        problem = check(path)
        if problem is None:
            atomic_write_text(_digest_path(path), _hex_digest(path))
        return problem
    return None if _hex_digest(path) == expected else "its SHA-256 does not match the one recorded when it was built"


def _hex_digest(path: Path) -> str:
    return file_sha256(path, max_bytes=1 << 40).hex()  # a cached network may be far bigger than any photo

