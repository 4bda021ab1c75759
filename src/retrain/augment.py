"""Training-time distortions of live images (fine-tuning only; inference uses preprocess.py).

Two recipes: retrain.py's four distortion flags, meaning what they meant there, and the
modern default for fine-tuning (random resized crop, horizontal flip, colour jitter).
Every draw comes from the generator passed in, so a seed reproduces an epoch exactly. Drawing
(`draw_distortion`) is apart from applying (`apply_distortion` with PIL here; data.py applies
the same draws with PyTorch on a GPU), so both devices share one recipe.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

from .config import Augment


@dataclass(frozen=True)
class Distortion:
    """One draw of the distortions for one image; applied by PIL here or by PyTorch on a GPU (data.py)."""

    box: tuple[float, float, float, float]  # crop window in source pixels: left, top, right, bottom
    flip: bool = False
    brightness: float = 1.0  # enhancement factors: 1 leaves the image as it is
    contrast: float = 1.0
    saturation: float = 1.0


def _modern_box(w: int, h: int, aug: Augment, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Random resized crop: a window of random area fraction and aspect ratio, else the centre square."""
    for _ in range(10):
        area = w * h * rng.uniform(*aug.crop_scale)
        ratio = math.exp(rng.uniform(math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])))
        cw, ch = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if cw <= w and ch <= h:
            left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            return left, top, left + cw, top + ch
    side = min(w, h)
    return (w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2


def _legacy_box(w: int, h: int, aug: Augment, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """retrain.py: scale the centre square up by (1 + crop) * (1 + U(0, scale)), crop a random window."""
    side = min(w, h)
    zoom = (1 + aug.legacy_crop) * (1 + rng.uniform(0, aug.legacy_scale))
    window = side / zoom
    left = (w - side) / 2 + rng.uniform(0, side - window)
    top = (h - side) / 2 + rng.uniform(0, side - window)
    return left, top, left + window, top + window


def draw_distortion(w: int, h: int, aug: Augment, rng: np.random.Generator) -> Distortion:
    """The random choices for one w x h image, in a fixed order so a seed reproduces them."""
    box = _legacy_box(w, h, aug, rng) if aug.legacy else _modern_box(w, h, aug, rng)
    flip = bool(aug.flip and rng.uniform() < 0.5)
    factors = [rng.uniform(1 - a, 1 + a) if a else 1.0 for a in (aug.brightness, aug.contrast, aug.saturation)]
    return Distortion(box, flip, *factors)


def apply_distortion(img: Image.Image, d: Distortion, size: int) -> np.ndarray:
    """`d` applied to an RGB image with PIL: (size, size, 3) uint8."""
    out = img.resize((size, size), Image.Resampling.BILINEAR, box=d.box, reducing_gap=3.0)
    if d.flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for factor, enhancer in ((d.brightness, ImageEnhance.Brightness), (d.contrast, ImageEnhance.Contrast),
                             (d.saturation, ImageEnhance.Color)):
        if factor != 1.0:
            out = enhancer(out).enhance(factor)
    return np.asarray(out, dtype=np.uint8)


def augment(img: Image.Image, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """One random distortion of an RGB image: (size, size, 3) uint8."""
    return apply_distortion(img, draw_distortion(*img.size, aug, rng), aug.size)
