"""Decode any image file into the square uint8 RGB array a backbone takes, or say why not."""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .preprocess import Preprocessing, fit_to_square

# Pixels we agree to decode after JPEG draft scaling: a 12-megapixel photo is 12e6;
# a 30000x30000 PNG (a decompression bomb) is refused before any pixel is decoded.
MAX_DECODED_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = None  # we enforce MAX_DECODED_PIXELS ourselves, after draft()


class UnreadableImage(Exception):
    """The file is not an image we can decode; the message says why."""


def _open(source: str | os.PathLike | bytes) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise UnreadableImage("empty file (0 bytes)")
        return Image.open(io.BytesIO(source))
    if os.path.getsize(source) == 0:
        raise UnreadableImage("empty file (0 bytes)")
    return Image.open(source)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any mode (palette, alpha, 16-bit, CMYK, grayscale) to 8-bit RGB, transparency on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns on odd-but-readable files; we judge by result
            img = _open(source)
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
    except (FileNotFoundError, PermissionError, IsADirectoryError) as e:  # vanished since the scan
        raise UnreadableImage(f"cannot read: {e.strerror or e}") from None
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
