"""Decoding any image file into the (S, S, 3) uint8 array a backbone takes, or UnreadableImage.

Every image here is generated with Pillow/numpy in tmp_path or in memory; no model is run.
"""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from retrain.decode import MAX_DECODED_PIXELS, UnreadableImage, load_image
from retrain.preprocess import Preprocessing

from conftest import assert_colour, assert_square

PREP = Preprocessing()
S = PREP.size

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
EXIF_ORIENTATION = 0x0112


# ---------------------------------------------------------------- helpers

def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def halves(size, left, right, mode="RGB") -> Image.Image:
    """Image whose left half is `left` and right half is `right`."""
    w, h = size
    img = Image.new(mode, size, left)
    img.paste(Image.new(mode, (w - w // 2, h), right), (w // 2, 0))
    return img


def peak_rss_delta_mb(code: str) -> tuple[float, dict]:
    """Run `code` in a fresh interpreter; return (peak RSS growth in MB while it ran, its JSON result).

    A fresh process keeps the measurement clean. It reads VmHWM (the peak RSS of the process's
    own address space) rather than getrusage's ru_maxrss: Linux carries ru_maxrss over from the
    parent across fork/vfork + exec, so after a memory-hungry test it would already sit at the
    parent's peak and hide any growth. `code` must set a JSON-serialisable variable `result`.
    """
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc/self/status to read peak memory")
    script = textwrap.dedent("""
        import json
        from retrain.decode import load_image, UnreadableImage
        from retrain.preprocess import Preprocessing
        import numpy as np
        from PIL import Image
        def peak_kb():
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        before = peak_kb()
    """) + textwrap.dedent(code) + textwrap.dedent("""
        after = peak_kb()
        print(json.dumps({"delta_kb": after - before, "result": result}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return report["delta_kb"] / 1024, report["result"]


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR is patched to claim width x height (CRC fixed up)."""
    data = bytearray(encode(Image.new("L", (8, 8), 0), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# ---------------------------------------------------------------- modes and formats

def test_rgb_jpeg_odd_aspect_ratio(tmp_path):
    img = Image.new("RGB", (517, 293), (30, 120, 200))
    arr = load_image(write(tmp_path / "odd.jpg", encode(img, "JPEG", quality=95)), PREP)
    assert_square(arr)
    assert_colour(arr, (30, 120, 200), tol=4)


def test_accepts_str_path_and_bytes_alike(tmp_path):
    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)), "PNG")
    path = write(tmp_path / "r.png", data)
    from_path, from_str, from_bytes = load_image(path, PREP), load_image(str(path), PREP), load_image(data, PREP)
    assert_square(from_path)
    np.testing.assert_array_equal(from_path, from_str)
    np.testing.assert_array_equal(from_path, from_bytes)


def test_other_sizes_follow_preprocessing():
    arr = load_image(encode(Image.new("RGB", (100, 60), RED), "PNG"), Preprocessing(size=64))
    assert_square(arr, 64)
    assert_colour(arr, RED, tol=0)


def test_grayscale_L(tmp_path):
    img = Image.new("L", (300, 200), 77)
    for fmt, name in (("PNG", "g.png"), ("JPEG", "g.jpg")):
        arr = load_image(write(tmp_path / name, encode(img, fmt)), PREP)
        assert_square(arr)
        assert_colour(arr, (77, 77, 77), tol=2)


def test_palette_with_transparency_is_white_where_transparent(tmp_path):
    img = Image.new("P", (200, 100), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)  # index 0 black (transparent), 1 green
    img.paste(1, (100, 0, 200, 100))
    path = write(tmp_path / "p.png", encode(img, "PNG", transparency=0))
    with Image.open(path) as check:
        assert check.mode == "P" and check.info.get("transparency") == 0
    arr = load_image(path, PREP)
    assert_square(arr)
    # 200x100 -> 512x256 -> centre crop x 144..368: columns < 112 come from the left (transparent) half.
    assert_colour(arr[:, :100], WHITE, tol=0)
    assert_colour(arr[:, -100:], GREEN, tol=0)


def test_rgba_alpha_zero_becomes_white(tmp_path):
    img = halves((200, 100), (0, 0, 0, 0), (255, 0, 0, 255), mode="RGBA")
    arr = load_image(write(tmp_path / "a.png", encode(img, "PNG")), PREP)
    assert_square(arr)
    assert_colour(arr[:, :100], WHITE, tol=0)
    assert_colour(arr[:, -100:], RED, tol=0)


def test_la_half_transparent_is_composited_on_white():
    img = Image.new("LA", (64, 64), (0, 128))  # black at ~50% alpha over white -> mid grey
    arr = load_image(encode(img, "PNG"), PREP)
    assert_square(arr)
    assert_colour(arr, (127, 127, 127), tol=2)


def test_16_bit_png_uses_full_8_bit_range(tmp_path):
    ramp = np.linspace(0, 65535, 256, dtype=np.float64).round().astype(np.uint16)
    a16 = np.tile(ramp, (256, 1))  # 256x256, left to right 0 .. 65535
    path = write(tmp_path / "deep.png", encode(Image.fromarray(a16), "PNG"))
    with Image.open(path) as check:
        assert check.mode.startswith("I")  # Pillow's 16-bit grey modes
    arr = load_image(path, PREP)
    assert_square(arr)
    # The central crop of a 0..65535 ramp spans roughly 16/256 .. 240/256 of the 8-bit range.
    assert arr.min() < 25 and arr.max() > 230, (arr.min(), arr.max())
    assert not (arr == 255).all()
    # Monotonic left to right, identical channels (grey).
    row = arr[S // 2, :, 0].astype(int)
    assert (np.diff(row) >= 0).all()
    assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()


def test_16_bit_png_mid_grey_is_mid_grey():
    a16 = np.full((50, 50), 32768, dtype=np.uint16)
    arr = load_image(encode(Image.fromarray(a16), "PNG"), PREP)
    assert_colour(arr, (128, 128, 128), tol=1)


def test_cmyk_jpeg(tmp_path):
    img = Image.new("CMYK", (300, 200), (0, 255, 255, 0))  # pure red in CMYK
    path = write(tmp_path / "cmyk.jpg", encode(img, "JPEG", quality=95))
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    arr = load_image(path, PREP)
    assert_square(arr)
    assert_colour(arr, RED, tol=10)


@pytest.mark.parametrize("orientation, top, bottom", [(6, RED, BLUE), (8, BLUE, RED)])
def test_exif_orientation_is_applied(tmp_path, orientation, top, bottom):
    # Stored pixels: left half red, right half blue.
    # Orientation 6 = "rotate 90 degrees clockwise to display": the left (red) edge ends up on top.
    # Orientation 8 = "rotate 90 degrees counter-clockwise": the left (red) edge ends up at the bottom.
    img = halves((400, 300), RED, BLUE)
    exif = img.getexif()
    exif[EXIF_ORIENTATION] = orientation
    path = write(tmp_path / f"rot{orientation}.jpg", encode(img, "JPEG", quality=95, exif=exif))
    arr = load_image(path, PREP)
    assert_square(arr)
    margin = 20  # away from the JPEG-blurred red/blue boundary at the middle row
    assert_colour(arr[: S // 2 - margin], top, tol=30)
    assert_colour(arr[S // 2 + margin:], bottom, tol=30)


def test_exif_orientation_identity_leaves_image_alone(tmp_path):
    img = halves((400, 300), RED, BLUE)
    exif = img.getexif()
    exif[EXIF_ORIENTATION] = 1
    arr = load_image(write(tmp_path / "rot1.jpg", encode(img, "JPEG", quality=95, exif=exif)), PREP)
    assert_colour(arr[:, : S // 2 - 20], RED, tol=30)
    assert_colour(arr[:, S // 2 + 20:], BLUE, tol=30)


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (120, 90), c) for c in (RED, GREEN, BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3
    arr = load_image(path, PREP)
    assert_square(arr)
    assert_colour(arr, RED, tol=0)


@pytest.mark.parametrize("fmt, suffix, kw, tol", [
    ("WEBP", ".webp", {"lossless": True}, 0),
    ("WEBP", ".webp", {"quality": 90}, 12),
    ("BMP", ".bmp", {}, 0),
    ("TIFF", ".tif", {}, 0),
    ("GIF", ".gif", {}, 0),
    ("PNG", ".png", {}, 0),
])
def test_other_formats(tmp_path, fmt, suffix, kw, tol):
    img = halves((300, 240), (200, 40, 40), (40, 40, 200))
    arr = load_image(write(tmp_path / f"x{suffix}", encode(img, fmt, **kw)), PREP)
    assert_square(arr)
    assert_colour(arr[:, :80], (200, 40, 40), tol=tol)
    assert_colour(arr[:, -80:], (40, 40, 200), tol=tol)


def test_one_pixel_image(tmp_path):
    arr = load_image(write(tmp_path / "dot.png", encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG")), PREP)
    assert_square(arr)
    assert_colour(arr, (10, 200, 30), tol=0)


def test_one_bit_image():
    img = halves((64, 32), 0, 1, mode="1")
    arr = load_image(encode(img, "PNG"), PREP)
    assert_square(arr)
    assert_colour(arr[:, :80], (0, 0, 0), tol=0)
    assert_colour(arr[:, -80:], WHITE, tol=0)


def test_big_jpeg_still_gives_right_size_and_content(tmp_path):
    # 4000x3000: the decoder's draft mode shrinks it while decoding; the result must still be right.
    img = halves((4000, 3000), (220, 30, 30), (30, 30, 220))
    path = write(tmp_path / "big.jpg", encode(img, "JPEG", quality=90))
    arr = load_image(path, PREP)
    assert_square(arr)
    assert_colour(arr[:, : S // 2 - 8], (220, 30, 30), tol=15)
    assert_colour(arr[:, S // 2 + 8:], (30, 30, 220), tol=15)


# ---------------------------------------------------------------- unreadable files

def test_zero_byte_file(tmp_path):
    path = write(tmp_path / "empty.jpg", b"")
    with pytest.raises(UnreadableImage, match="empty"):
        load_image(path, PREP)
    with pytest.raises(UnreadableImage, match="empty"):
        load_image(b"", PREP)


@pytest.mark.parametrize("content", [
    b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n",
    "just some text, not a photo \u00e9\u00e8\n".encode(),
    b"\x00" * 100,
])
def test_non_image_saved_as_jpg(tmp_path, content):
    path = write(tmp_path / "page.jpg", content)
    with pytest.raises(UnreadableImage, match="not a recognised image format"):
        load_image(path, PREP)


def test_missing_file_is_unreadable(tmp_path):
    with pytest.raises(UnreadableImage):
        load_image(tmp_path / "nope.jpg", PREP)


def test_truncated_jpeg_is_unreadable_or_valid(tmp_path):
    rng = np.random.default_rng(2)
    data = encode(Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)), "JPEG")
    for cut in (len(data) // 2, len(data) - 10, 200, 20, 3):
        try:
            arr = load_image(write(tmp_path / f"cut{cut}.jpg", data[:cut]), PREP)
        except UnreadableImage as e:
            assert str(e)
        else:
            assert_square(arr)


def test_decompression_bomb_refused_before_decoding(tmp_path):
    path = write(tmp_path / "bomb.png", png_claiming(30000, 30000))
    with Image.open(path) as check:
        assert check.size == (30000, 30000)  # the crafted header really claims 900 Mpx
    assert 30000 * 30000 > MAX_DECODED_PIXELS
    with pytest.raises(UnreadableImage, match="pixel limit") as info:
        load_image(path, PREP)
    assert "30000x30000" in str(info.value)

    # And it is refused cheaply: decoding it would need ~900 MB (grey) or 2.7 GB (RGB).
    delta_mb, result = peak_rss_delta_mb(f"""
        try:
            load_image({str(path)!r}, Preprocessing())
            result = "decoded"
        except UnreadableImage as e:
            result = str(e)
    """)
    assert "pixel limit" in result
    assert delta_mb < 500, f"peak memory grew by {delta_mb:.0f} MB"


def test_image_just_over_pixel_limit_in_one_dimension_refused():
    # 1 x 70M pixels: tiny area in bytes, but over the pixel limit.
    with pytest.raises(UnreadableImage, match="pixel limit"):
        load_image(png_claiming(70_000_000, 1), PREP)


def test_thin_strip_does_not_blow_up_memory():
    delta_mb, result = peak_rss_delta_mb("""
        import io
        buf = io.BytesIO()
        Image.new("RGB", (2, 3000), (200, 0, 0)).save(buf, "PNG")
        arr = load_image(buf.getvalue(), Preprocessing())
        result = [list(arr.shape), int(arr[..., 0].min()), int(arr[..., 1].max())]
    """)
    assert result == [[S, S, 3], 200, 0]  # the output itself is right...
    assert delta_mb < 100, f"peak memory grew by {delta_mb:.0f} MB for a 6000-pixel image"


@pytest.mark.parametrize("mode, colour, key", [("RGB", (10, 20, 30), (10, 20, 30)), ("L", 10, 10)])
def test_colour_key_transparency_becomes_white(mode, colour, key):
    data = encode(Image.new(mode, (50, 50), colour), "PNG", transparency=key)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == key
    assert_colour(load_image(data, PREP), WHITE, tol=0)


# ---------------------------------------------------------------- fuzzing

def _seed_files() -> list[bytes]:
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    exif = img.getexif()
    exif[EXIF_ORIENTATION] = 6
    return [
        encode(img, "JPEG", quality=80, exif=exif),
        encode(img, "JPEG", progressive=True),
        encode(img, "PNG"),
        encode(img.convert("RGBA"), "PNG"),
        encode(img.convert("P"), "GIF"),
        encode(img, "WEBP"),
        encode(img, "BMP"),
    ]


SEEDS = _seed_files()


@st.composite
def mutated_image_bytes(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    kind = draw(st.sampled_from(["truncate", "flip", "prefix", "overwrite", "mixed"]))
    if kind in ("truncate", "mixed"):
        data = data[: draw(st.integers(0, len(data)))]
    if kind in ("flip", "mixed") and data:
        for _ in range(draw(st.integers(1, 12))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    if kind == "overwrite" and data:
        i = draw(st.integers(0, len(data) - 1))
        chunk = draw(st.binary(min_size=1, max_size=16))
        data[i: i + len(chunk)] = chunk
    if kind == "prefix":
        data = bytearray(draw(st.binary(min_size=1, max_size=32))) + data
    return bytes(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated_image_bytes())
def test_fuzz_load_image_only_returns_array_or_raises_unreadable(data):
    try:
        arr = load_image(data, PREP)
    except UnreadableImage as e:
        assert str(e)
    else:
        assert_square(arr)



def test_decode_all_in_processes_equals_threads_and_reports_failures(tmp_path):
    from retrain.decode import decode_all

    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (40 + 3 * i, 60, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    paths.insert(5, tmp_path / "bad.jpg")
    prep = Preprocessing(size=32)
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    seen = []
    in_threads, failed_t = decode_all(paths, prep, 2, processes=False)
    in_processes, failed_p = decode_all(paths, prep, 2, processes=True, progress=seen.append)
    assert list(failed_t) == list(failed_p) == [5] and "not a recognised image format" in failed_p[5]
    np.testing.assert_array_equal(in_threads, in_processes)
    np.testing.assert_array_equal(in_processes[0], load_image(paths[0], prep))
    assert in_processes.shape == (13, 32, 32, 3) and not in_processes[5].any() and sum(seen) == 13
    if os.path.isdir("/dev/shm"):
        assert set(os.listdir("/dev/shm")) <= before  # the shared block is gone


def test_a_float_image_in_zero_to_one_is_not_decoded_black_and_16_bit_stays_exact(tmp_path):
    from PIL import Image

    from retrain.decode import _to_rgb

    ramp = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    Image.fromarray(ramp).save(tmp_path / "float.tiff")
    with Image.open(tmp_path / "float.tiff") as img:
        pixels = np.asarray(_to_rgb(img))
    assert pixels.min() == 0 and pixels.max() == 255 and 120 < pixels.mean() < 135
    deep = np.random.default_rng(0).integers(0, 65536, (300, 70), dtype=np.uint16)  # rows past one band
    expected = np.clip(deep.astype(np.float64) * (255 / 65535), 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(_to_rgb(Image.fromarray(deep)))[..., 0], expected)
