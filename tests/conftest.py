"""Shared fixtures: a per-session cache (backbones are exported once), generated and real datasets."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the whole run, so each backbone is exported to ONNX only once."""
    path = Path(os.environ.get("RETRAIN_TEST_CACHE") or tmp_path_factory.mktemp("retrain-cache"))
    os.environ["RETRAIN_CACHE"] = str(path)
    return path


def cache_with_lite0(cache_dir: Path, path: Path) -> Path:
    """A new cache at `path` holding only the session cache's exported Lite0: no features, splits or checkpoints
    (exporting the backbone again would only add time)."""
    from retrain.backbones import get_backbone
    from retrain.graphs import extractor_path

    exported = extractor_path(get_backbone("lite0"), cache_dir)
    (path / "backbones").mkdir(parents=True)
    shutil.copyfile(exported, path / "backbones" / exported.name)
    return path


def shared_dataset(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"real dataset {name} not present at {path}")
    return path


def real_photos() -> list[Path]:
    """Photos of many sizes: 500x375-ish JPEGs, 100x100 hands (upscaled), 92-640 px hands."""
    photos = sorted((shared_dataset("hymenoptera") / "val" / "bees").glob("*.jpg"))[:25]
    photos += sorted((shared_dataset("sign_language_digits") / "3").iterdir())[:10]
    photos += sorted((shared_dataset("rock_paper_scissors") / "testing" / "rock").iterdir())[:15]
    return photos


def decoded(path: Path) -> np.ndarray:
    """What a user's own code hands the any-size model: the whole photo (no JPEG draft scaling), upright, RGB."""
    from retrain.decode import open_rgb

    return np.asarray(open_rgb(path, sys.maxsize))


def hex_digests(n: int, tag: str = "") -> list[str]:
    """n distinct sha256 hex digests (of f"{tag}{i}"): stand-ins for image contents in the feature store."""
    return [hashlib.sha256(f"{tag}{i}".encode()).hexdigest() for i in range(n)]


def draw_shape(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    """A random-coloured image of one shape kind: the classes of the generated datasets."""
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    fg = tuple(int(255 - v) for v in bg)
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    lo, hi = int(size * rng.uniform(0.1, 0.3)), int(size * rng.uniform(0.7, 0.9))
    if kind == "circles":
        d.ellipse([lo, lo, hi, hi], fill=fg)
    elif kind == "squares":
        d.rectangle([lo, lo, hi, hi], fill=fg)
    else:  # stripes
        step = max(4, size // int(rng.integers(4, 9)))
        for x in range(0, size, 2 * step):
            d.rectangle([x, 0, x + step - 1, size], fill=fg)
    noise = rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))


def real_subset(source: Path, root: Path, per_class: int, pattern: str = "*") -> Path:
    """The first `per_class` photos (by name, matching `pattern`) of each class folder under `source`, copied to `root`.

    Split folders (training/, testing/) keep their layout: a class folder is one that holds files.
    """
    for folder in sorted(p for p in source.rglob("*") if p.is_dir() and any(f.is_file() for f in p.iterdir())):
        target = root / folder.relative_to(source)
        target.mkdir(parents=True)
        for photo in sorted(f for f in folder.glob(pattern) if f.is_file())[:per_class]:
            shutil.copy(photo, target / photo.name)
    return root


def make_dataset(root: Path, per_class: int = 16, classes=("circles", "squares", "stripes"), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for kind in classes:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(kind, rng, int(rng.integers(64, 160))).save(root / kind / f"{kind}_{i:03d}.jpg", quality=90)
    return root


def photo(kind: str, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """A shape over a random background with some detail: unlike plain shapes, no two share a
    perceptual hash, and unlike flat images, a recompressed copy keeps its hash."""
    background = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
    background = background.resize((size, size), Image.Resampling.BICUBIC)
    return Image.blend(background, draw_shape(kind, rng, size), 0.6)


def photo_folder(root: Path, per_class: int, seed: int = 0, classes=("circles", "squares", "stripes")) -> Path:
    rng = np.random.default_rng(seed)
    for kind in classes:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            photo(kind, rng).save(root / kind / f"{kind[0]}{i:02d}.jpg", quality=90)
    return root


def planted_folder(root: Path) -> Path:
    """train/ + val/ photo folders with one of every problem `retrain doctor` looks for planted."""
    photo_folder(root / "train", per_class=20, seed=1)
    photo_folder(root / "val", per_class=5, seed=2)
    train, val = root / "train", root / "val"
    shutil.copyfile(train / "circles/c00.jpg", train / "circles/c00 copy.jpg")  # exact, within class
    shutil.copyfile(train / "squares/s01.jpg", train / "stripes/s01 again.jpg")  # exact, two classes
    shutil.copyfile(val / "circles/c00.jpg", train / "circles/leaked.jpg")  # exact, two splits
    with Image.open(train / "squares/s02.jpg") as img:  # near: smaller and recompressed, same class
        img.resize((60, 60), Image.Resampling.BILINEAR).save(train / "squares/s02 small.jpg", quality=60)
    with Image.open(train / "stripes/s03.jpg") as img:  # near: mirrored, in val
        ImageOps.mirror(img).save(val / "stripes/s03 mirrored.png")
    (train / "circles/c05.jpg").rename(train / "squares/c05.jpg")  # flipped labels
    (train / "stripes/s06.jpg").rename(train / "circles/s06.jpg")
    return root


def assert_square(arr: np.ndarray, size: int | None = None) -> None:
    """arr is one (size, size, 3) uint8 image; size defaults to Preprocessing()'s."""
    if size is None:
        from retrain.preprocess import Preprocessing

        size = Preprocessing().size
    assert isinstance(arr, np.ndarray)
    assert arr.shape == (size, size, 3)
    assert arr.dtype == np.uint8


def assert_colour(region: np.ndarray, rgb, tol: int = 12) -> None:
    """Every pixel of `region` is within `tol` of `rgb` (per channel)."""
    diff = np.abs(region.reshape(-1, 3).astype(int) - np.array(rgb)).max()
    assert diff <= tol, f"max channel difference {diff} from {rgb}; mean colour {region.reshape(-1, 3).mean(0)}"


@pytest.fixture
def shapes(tmp_path) -> Path:
    """A small generated dataset of three visually distinct classes, for a test that changes it."""
    return make_dataset(tmp_path / "shapes")


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory) -> Path:
    """The same dataset as `shapes`, made once per run: for tests that only read it (never change it)."""
    return make_dataset(tmp_path_factory.mktemp("shared") / "shapes")


def quick_config(cache_dir: Path, **kw):
    """A head on cached features, 300 steps at most: the quick model most tests need."""
    from retrain.config import HeadConfig, TrainConfig

    return TrainConfig(cache_dir=str(cache_dir), quiet=True, head=HeadConfig(steps=300, seed=0), **{"mode": "head"} | kw)


@functools.cache
def bench_scale():
    """benchmarks/bench_scale.py as a module: its synthetic-folder generator and tiny backbone serve the tests too."""
    spec = importlib.util.spec_from_file_location("bench_scale", Path(__file__).resolve().parents[1] / "benchmarks" /
                                                  "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """bench_scale's folder of 120 generated 32x32 PNGs in 10 classes."""
    return bench_scale().make_synthetic_folder(tmp_path_factory.mktemp("scale"), 120)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """bench_scale's 2-convolution ONNX CNN: a backbone that costs nothing to run."""
    return bench_scale().tiny_backbone(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@dataclass
class SharedModel:
    model: object  # retrain.TrainedModel
    folder: Path  # saved there, without report.html: copy it before changing anything in it


@pytest.fixture(scope="session")
def head_model(shapes_data, cache_dir, tmp_path_factory) -> SharedModel:
    """quick_config's model of `shapes_data`, trained once per run for every test that only reads it."""
    import retrain

    model = retrain.train(shapes_data, quick_config(cache_dir))
    return SharedModel(model, model.save(tmp_path_factory.mktemp("shared") / "model", report=False))


@pytest.fixture(scope="session")
def real_model(cache_dir):
    """real_model(name, sub="") trains the head on a real dataset's folder once per run (default settings
    otherwise, unknown threshold "auto"), skipping if the dataset is absent: for tests that only read the model."""
    import retrain
    from retrain.config import TrainConfig

    trained = {}

    def get(name: str, sub: str = ""):
        if (name, sub) not in trained:
            config = TrainConfig(cache_dir=str(cache_dir), quiet=True, unknown_threshold="auto", mode="head")
            trained[name, sub] = retrain.train(shared_dataset(name) / sub, config)
        return trained[name, sub]
    return get


CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="session")
def chromium():
    """Debian's headless Chromium through Playwright; skips, saying why, where either is missing."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; `make test` does it as root)")
    with sync_api.sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        except Exception as e:  # a broken or incompatible Chromium: say so rather than error
            pytest.skip(f"cannot start {CHROMIUM}: {str(e).splitlines()[0]}")
        yield browser
        browser.close()
