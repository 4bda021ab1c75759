"""Training-time distortions of live images (fine-tuning only; inference uses preprocess.py).

Two recipes: retrain.py's four distortion flags, meaning what they meant there, and the
modern default for fine-tuning (random resized crop, horizontal flip, colour jitter).
Every draw comes from the generator passed in, so a seed reproduces an epoch exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance


@dataclass(frozen=True)
class Augment:
    size: int  # side of the square training crop
    flip: bool = True
    crop_scale: tuple[float, float] = (0.25, 1.0)  # random resized crop: fraction of the area
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.25  # factor drawn from [1 - b, 1 + b]
    contrast: float = 0.25
    saturation: float = 0.25
    legacy_crop: float = 0.0  # retrain.py --random_crop / 100
    legacy_scale: float = 0.0  # retrain.py --random_scale / 100
    legacy: bool = False  # use retrain.py's recipe (only the flags given) instead of the modern one

    @classmethod
    def from_retrain_flags(cls, size: int, flip_left_right: bool, random_crop: int, random_scale: int,
                           random_brightness: int) -> "Augment":
        """retrain.py's distortions: margin crop, scale up, flip, brightness multiply; nothing else."""
        return cls(size=size, flip=flip_left_right, brightness=random_brightness / 100, contrast=0.0,
                   saturation=0.0, legacy_crop=random_crop / 100, legacy_scale=random_scale / 100, legacy=True)


def _modern_crop(img: Image.Image, aug: Augment, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(*aug.crop_scale)
        ratio = math.exp(rng.uniform(math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1])))
        cw, ch = math.sqrt(area * ratio), math.sqrt(area / ratio)
        if cw <= w and ch <= h:
            left, top = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
            return img.resize((aug.size, aug.size), Image.Resampling.BILINEAR,
                              box=(left, top, left + cw, top + ch), reducing_gap=3.0)
    side = min(w, h)  # fall back to the centre square
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    return img.resize((aug.size, aug.size), Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)


def _legacy_crop(img: Image.Image, aug: Augment, rng: np.random.Generator) -> Image.Image:
    """retrain.py: scale the centre square up by (1 + crop) * (1 + U(0, scale)), crop a random window."""
    w, h = img.size
    side = min(w, h)
    zoom = (1 + aug.legacy_crop) * (1 + rng.uniform(0, aug.legacy_scale))
    window = side / zoom
    left = (w - side) / 2 + rng.uniform(0, side - window)
    top = (h - side) / 2 + rng.uniform(0, side - window)
    return img.resize((aug.size, aug.size), Image.Resampling.BILINEAR,
                      box=(left, top, left + window, top + window), reducing_gap=3.0)


def augment(img: Image.Image, aug: Augment, rng: np.random.Generator) -> np.ndarray:
    """One random distortion of an RGB image: (size, size, 3) uint8."""
    out = _legacy_crop(img, aug, rng) if aug.legacy else _modern_crop(img, aug, rng)
    if aug.flip and rng.uniform() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for amount, enhancer in ((aug.brightness, ImageEnhance.Brightness), (aug.contrast, ImageEnhance.Contrast),
                             (aug.saturation, ImageEnhance.Color)):
        if amount:
            out = enhancer(out).enhance(rng.uniform(1 - amount, 1 + amount))
    return np.asarray(out, dtype=np.uint8)
