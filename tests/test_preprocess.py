"""Tests for retrain.preprocess: the square crop (in Python and as an ONNX graph) and the normalisation."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from retrain.preprocess import (IMAGE_NAME, INPUT_NAME, Preprocessing, fit_to_square, geometry_graph, normalize_torch,
                                normalizer_graph)

from conftest import assert_colour, assert_square, draw_shape

PREP = Preprocessing()

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def test_fit_to_square_crops_wide_image_centre():
    # 1000x100: blue | red centre stripe | green. Scaling the short side to 256 makes it 2560 wide;
    # the 224-wide centre crop covers only original x = 456..544, inside the red stripe.
    img = Image.new("RGB", (1000, 100), BLUE)
    img.paste(Image.new("RGB", (400, 100), RED), (300, 0))
    img.paste(Image.new("RGB", (300, 100), GREEN), (700, 0))
    arr = fit_to_square(img, PREP)
    assert_square(arr)
    assert_colour(arr, RED, tol=0)  # the blue and green edges are cropped away, not squashed in


def test_fit_to_square_crops_tall_image_centre():
    img = Image.new("RGB", (100, 1000), BLUE)
    img.paste(Image.new("RGB", (100, 400), RED), (0, 300))
    arr = fit_to_square(img, PREP)
    assert_colour(arr, RED, tol=0)


def test_fit_to_square_crop_fraction_trims_border():
    # A 256x256 image is already at the resize target (224 / 0.875): the result is its exact centre.
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    np.testing.assert_array_equal(fit_to_square(Image.fromarray(a), PREP), a[16:240, 16:240])


def test_fit_to_square_whole_short_side_with_crop_fraction_one():
    # crop_fraction=1: the square covers the whole short side; only the long side is cropped,
    # so the 10-px red bands at the far left and right of a 120x60 image disappear.
    img = Image.new("RGB", (120, 60), GREEN)
    img.paste(Image.new("RGB", (10, 60), RED), (0, 0))
    img.paste(Image.new("RGB", (10, 60), RED), (110, 0))
    arr = fit_to_square(img, Preprocessing(size=60, crop_fraction=1.0))
    assert_square(arr, 60)
    assert_colour(arr, GREEN, tol=0)


def test_normalize_torch_matches_onnx_normalizer():
    ort = pytest.importorskip("onnxruntime")
    torch = pytest.importorskip("torch")
    for prep in (PREP, Preprocessing(size=32, mean=120.5, std=57.25)):
        batch = np.random.default_rng(5).integers(0, 256, (3, prep.size, prep.size, 3), dtype=np.uint8)
        batch[0, 0, 0] = (0, 255, 128)
        model = normalizer_graph(prep, 17)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        (onnx_out,) = session.run(None, {INPUT_NAME: batch})
        torch_out = normalize_torch(torch.from_numpy(batch), prep).numpy()
        assert onnx_out.shape == torch_out.shape == (3, 3, prep.size, prep.size)
        assert onnx_out.dtype == torch_out.dtype == np.float32
        np.testing.assert_allclose(torch_out, onnx_out, rtol=0, atol=1e-6)
        # And both are (pixel - mean) / std in NCHW.
        expected = (batch.transpose(0, 3, 1, 2).astype(np.float32) - prep.mean) / prep.std
        np.testing.assert_allclose(onnx_out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size, prep", [
    ((37, 53), Preprocessing()), ((150, 150), Preprocessing()), ((640, 90), Preprocessing()), ((1, 300), Preprocessing()),
    ((700, 523), Preprocessing()), ((333, 500), Preprocessing()),  # PIL 13 alone would resize this one vertically first
    ((4000, 3000), Preprocessing()),  # a crop over 6x the output: PIL's reducing_gap is not used
    ((523, 700), Preprocessing(size=240, crop_fraction=0.9)),  # a box that float32 cannot hold exactly
    ((1, 40_000_001), Preprocessing()),  # row numbers past 2^24, which a float32 box cannot hold
])
def test_geometry_graph_is_fit_to_square_in_onnx(size, prep):
    """The in-graph resize and crop give fit_to_square's pixels, bit for bit."""
    rng = np.random.default_rng(sum(size))
    base = draw_shape("circles", rng, 64).resize(size, Image.Resampling.BICUBIC)
    noisy = np.clip(np.asarray(base, np.int16) + rng.integers(-40, 40, (size[1], size[0], 3), dtype=np.int16), 0, 255)
    image = np.ascontiguousarray(noisy.astype(np.uint8))
    session = ort.InferenceSession(geometry_graph(prep, 17).SerializeToString(), providers=["CPUExecutionProvider"])
    ours = session.run(None, {IMAGE_NAME: image})[0][0].astype(int)
    pil = fit_to_square(Image.fromarray(image), prep).astype(int)
    np.testing.assert_array_equal(ours, pil)
