"""Decode any image file into the square uint8 RGB array a backbone takes, or say why not."""
from __future__ import annotations

import io
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from multiprocessing import get_context, shared_memory
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .guards import UnsafeFile, open_regular, read_failure
from .preprocess import Preprocessing, fit_to_square

# Pixels we agree to decode after JPEG draft scaling: a 12-megapixel photo is 12e6;
# a 30000x30000 PNG (a decompression bomb) is refused before any pixel is decoded.
MAX_DECODED_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = None  # we enforce MAX_DECODED_PIXELS ourselves, after draft()


class UnreadableImage(Exception):
    """The file is not an image we can decode; the message says why."""


def _open(source: str | os.PathLike | bytes, files: ExitStack) -> Image.Image:
    """The image at `source`; a file opened here is closed by `files` (PIL leaves a given file open)."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise UnreadableImage("empty file (0 bytes)")
        return Image.open(io.BytesIO(source))
    f = files.enter_context(open_regular(source))  # never a pipe, a device or an endless file
    if os.fstat(f.fileno()).st_size == 0:
        raise UnreadableImage("empty file (0 bytes)")
    return Image.open(f)


def _scaled_to_bytes(arr: np.ndarray, scale: float, rows: int = 256) -> np.ndarray:
    """arr * scale, clipped to 0-255, as uint8: a band of rows at a time (one 8000x8000 16-bit photo in float64
    at once is 512 MB, twice over for the clip)."""
    out = np.empty(arr.shape, np.uint8)
    for i in range(0, arr.shape[0], rows):
        out[i:i + rows] = np.clip(arr[i:i + rows].astype(np.float64) * scale, 0, 255)
    return out


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any mode (palette, alpha, 16-bit, CMYK, grayscale) to 8-bit RGB, transparency on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(_scaled_to_bytes(arr, 255.0 / top), "L")
    elif img.mode == "F":
        arr = np.asarray(img)
        # Floats all within [0, 1] are a normalised image (black if read as 0-255), others 0-255 levels.
        img = Image.fromarray(_scaled_to_bytes(arr, 255.0 if 0 <= arr.min() and arr.max() <= 1 else 1.0), "L")
    if "transparency" in img.info and img.mode in ("P", "L", "RGB"):
        img = img.convert("RGBA")  # palette or colour-key transparency becomes a real alpha channel
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def open_rgb(source: str | os.PathLike | bytes, min_side: int) -> Image.Image:
    """Decode `source` (a path or the file's bytes) to an 8-bit RGB image, EXIF rotation applied.

    The first frame of an animation is used, and big JPEGs are decoded at a reduced scale
    (draft mode) that keeps both sides >= `min_side`. Raises UnreadableImage with a reason.
    """
    try:
        with warnings.catch_warnings(), ExitStack() as files:
            warnings.simplefilter("ignore")  # PIL warns on odd-but-readable files; we judge by result
            img = _open(source, files)
            with img:
                img.draft("RGB", (min_side, min_side))  # JPEG only: decode at 1/2, 1/4, 1/8 scale
                w, h = img.size
                if w * h > MAX_DECODED_PIXELS:
                    raise UnreadableImage(
                        f"image is {w}x{h} pixels, over the {MAX_DECODED_PIXELS:,}-pixel limit "
                        "(possible decompression bomb)")
                if w < 1 or h < 1:
                    raise UnreadableImage(f"image has no pixels ({w}x{h})")
                img.load()
                img = ImageOps.exif_transpose(img) or img
                return _to_rgb(img)
    except UnreadableImage:
        raise
    except UnidentifiedImageError:
        raise UnreadableImage("not a recognised image format") from None
    except (FileNotFoundError, PermissionError, IsADirectoryError, UnsafeFile) as e:  # vanished since the scan
        raise UnreadableImage(read_failure(e)) from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise UnreadableImage(f"cannot decode: {e}") from None
    except (MemoryError, RecursionError, IndexError, KeyError, TypeError, ZeroDivisionError) as e:
        # Hostile files can trip decoder bugs; skipping them beats killing a long run.
        raise UnreadableImage(f"decoder failed: {type(e).__name__}: {e}") from None


def load_image(source: str | os.PathLike | bytes, prep: Preprocessing) -> np.ndarray:
    """Decode `source` to the (size, size, 3) uint8 array the model takes (see preprocess.py)."""
    img = open_rgb(source, prep.resize_target())
    try:
        return fit_to_square(img, prep)
    except (OSError, ValueError, MemoryError) as e:
        raise UnreadableImage(f"cannot resize: {e}") from None


def describe(path: str | os.PathLike) -> str:
    """Short path for messages: parent folder and file name."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


# ------------------------------------------------------------- many files into one array

PROCESS_MIN = 1000  # below this many images, worker processes cost more to start than they save
# 16 cores (GPU machine): 1,381 JPEGs/s from threads, 2,308 from processes; 2 cores: threads
# 842, processes 505 (each process first imports retrain). Processes pay only with many cores.
PROCESS_MIN_WORKERS = 8
CHUNK = 64  # images per task
_shared: tuple[shared_memory.SharedMemory, np.ndarray] | None = None  # a worker process's view of the array


def _attach(name: str, shape: tuple[int, ...]) -> None:
    """Worker-process initializer: map the parent's shared array."""
    global _shared
    shm = shared_memory.SharedMemory(name=name)
    _shared = shm, np.ndarray(shape, np.uint8, buffer=shm.buf)


def _decode_chunk(start: int, paths: Sequence[str | os.PathLike], prep: Preprocessing,
                  target: np.ndarray | None = None) -> list[tuple[int, str]]:
    """Decode paths into rows start.. of `target` (a worker process's shared array if None); [(row, why)] failed."""
    out = _shared[1] if target is None else target
    failed = []
    for i, path in enumerate(paths, start):
        try:
            out[i] = load_image(path, prep)
        except UnreadableImage as e:
            failed.append((i, str(e)))
    return failed


def _collect(futures: list[Future], progress: Callable[[int], None] | None) -> dict[int, str]:
    failures: dict[int, str] = {}
    for future, n in futures:
        failures |= dict(future.result())
        if progress:
            progress(n)
    return failures


def _spawn_can_start() -> bool:
    """Spawned workers re-run the main script: impossible when it has no file (python - < script)."""
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    return main is None or os.path.exists(main)


def decode_all(paths: Sequence[str | os.PathLike], prep: Preprocessing, workers: int, *,
               processes: bool | None = None, progress: Callable[[int], None] | None = None
               ) -> tuple[np.ndarray, dict[int, str]]:
    """Every path through `load_image` into one (N, S, S, 3) uint8 array; {row: reason} for those that failed.

    Threads share Python's GIL, so with many cores large sets go to worker processes that write
    straight into shared memory. processes None: PROCESS_MIN images or more and PROCESS_MIN_WORKERS
    workers or more.
    """
    shape = (len(paths), prep.size, prep.size, 3)
    if processes is None:
        processes = workers >= PROCESS_MIN_WORKERS and len(paths) >= PROCESS_MIN and _spawn_can_start()
    chunks = [(s, list(paths[s:s + CHUNK])) for s in range(0, len(paths), CHUNK)]
    if not processes:
        out = np.zeros(shape, np.uint8)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            return out, _collect([(pool.submit(_decode_chunk, s, c, prep, out), len(c)) for s, c in chunks], progress)
    shm = shared_memory.SharedMemory(create=True, size=max(1, int(np.prod(shape))))
    try:  # spawn, not fork: the parent may hold CUDA or other threads that a fork would copy half-made
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_attach,
                                 initargs=(shm.name, shape)) as pool:
            failures = _collect([(pool.submit(_decode_chunk, s, c, prep), len(c)) for s, c in chunks], progress)
        return np.ndarray(shape, np.uint8, buffer=shm.buf).copy(), failures
    finally:
        shm.close()
        shm.unlink()
