"""Opening user files safely: only regular files, up to a size limit, and never an open that blocks.

A named pipe called `pipe.jpg` blocks a plain open() until some writer appears (forever, in a
photo folder), and a link `x.jpg -> /dev/zero` reads an endless stream. Every read of a user's
image (hashing, decoding, header peeks) goes through `open_regular`, which refuses both with a
reason the scan and the decoder report as they report any unreadable file.
"""
from __future__ import annotations

import errno
import hashlib
import os
import stat
from typing import BinaryIO

# Bigger than any image we would decode: a 64-megapixel 16-bit RGBA TIFF, uncompressed, is 512 MB.
MAX_FILE_BYTES = 512 << 20

_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


class UnsafeFile(OSError):
    """A file we refuse to read: not a regular file, or over MAX_FILE_BYTES. `strerror` says which.

    An OSError, so every caller that already skips unreadable files skips these too.
    """


def _refusal(st: os.stat_result, max_bytes: int) -> UnsafeFile | None:
    for test, kind in _KINDS:
        if test(st.st_mode):
            return UnsafeFile(errno.EINVAL, f"{kind}, not a regular file")
    if not stat.S_ISREG(st.st_mode):
        return UnsafeFile(errno.EINVAL, "not a regular file")
    if st.st_size > max_bytes:
        return UnsafeFile(errno.EFBIG, f"file is {st.st_size:,} bytes, over the {max_bytes:,}-byte limit for an image")
    return None


def check_regular(path: str | os.PathLike, max_bytes: int | None = None) -> None:
    """Raise UnsafeFile (or the OSError of stat) unless `path`, links followed, is a regular file within the limit."""
    refusal = _refusal(os.stat(path), MAX_FILE_BYTES if max_bytes is None else max_bytes)
    if refusal:
        refusal.filename = os.fspath(path)
        raise refusal


def open_regular(path: str | os.PathLike, max_bytes: int | None = None) -> BinaryIO:
    """`path` opened for binary reading, if it is a regular file within the size limit; else UnsafeFile.

    Checked by stat before opening (so a pipe is never opened) and again on the open descriptor
    (so a file swapped for a pipe in between is caught); the open itself is non-blocking.
    """
    check_regular(path, max_bytes)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        refusal = _refusal(os.fstat(fd), MAX_FILE_BYTES if max_bytes is None else max_bytes)
        if refusal:
            refusal.filename = os.fspath(path)
            raise refusal
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_sha256(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The SHA-256 of a regular file's bytes, read a MiB at a time (never a pipe, a device or an endless file)."""
    h = hashlib.sha256()
    with open_regular(path, max_bytes) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


def read_failure(e: OSError) -> str:
    """The reason an unreadable file is skipped, for scan and decode alike."""
    if isinstance(e, UnsafeFile):
        return f"skipped: {e.strerror}"
    return f"cannot read: {e.strerror or e}"


def not_a_regular_file(path: str | os.PathLike) -> UnsafeFile | None:
    """Why a file may not be written over at `path` (a named pipe, a device, a folder...); None for a
    regular file, a symbolic link (replaced, not followed) or nothing there."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
        return None
    refusal = _refusal(st, MAX_FILE_BYTES)
    if refusal:
        refusal.filename = os.fspath(path)
    return refusal
