"""Hostile folders end to end: `retrain train` and `retrain doctor` skip each bad file by name.

test_decode.py and test_scan.py check each case at its own stage; here they all sit in one
folder (Korean and space-laden names included) and go through training and the doctor.
"""
from __future__ import annotations

import errno
import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import retrain
import retrain.decode as decode_mod
import retrain.scan as scan_mod
from retrain.api import TrainConfig
from retrain.cli import retrain_main
from retrain.head import HeadConfig

from conftest import draw_shape

CAT, DOG = "고양이 사진", "big dog"  # a Korean class name with a space, and a plain one

# file name -> (class, what the report must say about it)
UNREADABLE = {
    "empty.jpg": (CAT, "empty file"),
    "page.jpg": (CAT, "not a recognised image format"),
    "truncated.jpg": (DOG, "cannot decode"),
    "bomb.png": (DOG, "decompression bomb"),
    "gone.jpg": (DOG, "No such file"),  # a dangling link
}


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height: a decompression bomb's first bytes."""
    data = bytearray(encode(Image.new("L", (8, 8), 0), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def hostile_folder(root: Path) -> Path:
    """Two classes of 12 good photos each, plus every hostile case from issue 4."""
    rng = np.random.default_rng(0)
    for cls, kind in ((CAT, "circles"), (DOG, "stripes")):
        (root / cls).mkdir(parents=True)
        for i in range(12):
            draw_shape(kind, rng, 96).save(root / cls / f"사진 {i}.jpg", quality=90)
    cat, dog = root / CAT, root / DOG
    # unreadable
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "page.jpg").write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    whole = encode(draw_shape("stripes", rng, 300), "JPEG", quality=95)
    (dog / "truncated.jpg").write_bytes(whole[: len(whole) * 2 // 5])
    (dog / "bomb.png").write_bytes(png_claiming(30000, 30000))
    os.symlink(root / "nowhere.jpg", dog / "gone.jpg")
    # odd but readable
    frames = [draw_shape("circles", rng, 80) for _ in range(3)]
    frames[0].save(cat / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    Image.fromarray((np.asarray(draw_shape("circles", rng, 64).convert("L"), np.uint16) * 257)).save(cat / "deep.png")
    palette = draw_shape("circles", rng, 64).convert("P")
    palette.save(cat / "palette.png", transparency=0)
    draw_shape("stripes", rng, 64).convert("CMYK").save(dog / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    draw_shape("stripes", rng, 80).save(dog / "rotated.jpg", exif=exif.tobytes())
    draw_shape("stripes", rng, 80).save(dog / "photo.webp", quality=90)
    Image.new("RGB", (1, 1), (200, 30, 30)).save(dog / "dot.png")
    # the file system
    (dog / "2019" / "여름 휴가").mkdir(parents=True)
    draw_shape("stripes", rng, 90).save(dog / "2019" / "여름 휴가" / "nested.jpg")  # counts for its class folder
    os.symlink(dog, dog / "loop")  # a folder link back to itself
    (cat / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (dog / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (dog / "notes.txt").write_text("not a photo")
    return root


def new_photo(path: Path) -> Path:
    """A photo no cache has seen (fresh entropy, even with a persistent RETRAIN_TEST_CACHE), so its
    features must be computed from the file."""
    Image.fromarray(np.random.default_rng().integers(0, 256, (64, 64, 3), np.uint8)).save(path)
    return path


@pytest.fixture
def hostile(tmp_path) -> Path:
    return hostile_folder(tmp_path / "내 사진 폴더")


def quick(cache_dir, **kw) -> TrainConfig:
    return TrainConfig(cache_dir=str(cache_dir), quiet=True, head=HeadConfig(steps=100), **kw)


def test_training_skips_each_hostile_file_by_name(hostile, cache_dir):
    model = retrain.train(hostile, quick(cache_dir))
    skipped = {Path(s.path).name: s.reason for s in model.metrics.skipped_files}
    assert set(skipped) == set(UNREADABLE)
    for name, (_, reason) in UNREADABLE.items():
        assert reason in skipped[name], (name, skipped[name])
    assert model.classes == sorted([CAT, DOG])
    # 12 photos each + animated, 16-bit, palette | cmyk, rotated, webp, 1x1, nested; hidden and text files ignored
    assert sum(model.metrics.num_images.values()) == 12 + 3 + 12 + 5


def test_doctor_reports_each_hostile_file(hostile, cache_dir, capsys):
    assert retrain_main(["doctor", str(hostile), "--json", "--quiet", "--cache_dir", str(cache_dir)]) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert "Traceback" not in err
    unreadable = {Path(u["path"]).name: u["reason"] for u in report["unreadable"]}
    assert set(unreadable) == set(UNREADABLE)
    for name, (cls, reason) in UNREADABLE.items():
        assert reason in unreadable[name]
        assert any(u["path"].startswith(f"{cls}/") for u in report["unreadable"] if u["path"].endswith(name))
    assert {Path(f["path"]).name for f in report["animated"]} == {"animated.gif"}
    assert {Path(f["path"]).name for f in report["tiny"]} == {"dot.png"}
    assert {Path(f["path"]).name for f in report["huge"]} == {"bomb.png"}
    assert {"I;16", "P", "CMYK", "RGB"} <= set(report["modes"])
    assert {"JPEG", "PNG", "GIF", "WEBP"} <= set(report["formats"])
    assert report["ignored_files"] == 1  # notes.txt; .DS_Store and Thumbs.db are hidden
    assert report["exact_duplicates"] == []


def test_doctor_text_report_on_hostile_folder(hostile, cache_dir, capsys):
    assert retrain_main(["doctor", str(hostile), "--quiet", "--cache_dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert f"{CAT}/empty.jpg: empty file (0 bytes)" in out
    assert "! unreadable, skipped by training: 5" in out
    assert "dot.png (PNG RGB, 1x1)" in out


@pytest.mark.subprocess
def test_korean_and_space_names_end_to_end_through_the_cli(tmp_path, cache_dir):
    """`retrain train` then `retrain predict` in a fresh process, every path non-ASCII with spaces."""
    root = tmp_path / "내 사진"
    rng = np.random.default_rng(3)
    for cls, kind in (("고양이", "circles"), ("강아지 사진", "stripes"), ("새 (birds)", "squares")):
        (root / cls / "하위 폴더").mkdir(parents=True)
        for i in range(10):
            draw_shape(kind, rng, 96).save(root / cls / ("하위 폴더" if i % 2 else ".") / f"사진 {i}.jpg")
    out = tmp_path / "모델 출력"
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    run = [sys.executable, "-m", "retrain"]
    train = subprocess.run(run + ["train", str(root), "--output", str(out), "--cache_dir", str(cache_dir),
                                  "--steps", "100", "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert train.returncode == 0, train.stderr
    assert (out / "labels.txt").read_text(encoding="utf-8").split("\n")[:3] == ["강아지 사진", "고양이", "새 (birds)"]
    probe = tmp_path / "새 이미지.png"
    draw_shape("stripes", np.random.default_rng(99), 96).save(probe)
    pred = subprocess.run(run + ["predict", str(out), str(probe), "--json"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert pred.returncode == 0, pred.stderr
    result = json.loads(pred.stdout)
    assert result["path"] == str(probe) and result["predictions"][0]["label"] == "강아지 사진"


def test_file_vanishing_mid_run_is_skipped(tmp_path, cache_dir, monkeypatch):
    """Deleted after the scan hashed it, before its features were computed."""
    root = hostile_folder(tmp_path / "d")
    victim = new_photo(root / CAT / "사라질 사진.jpg")
    real_hash_all = scan_mod._hash_all

    def hash_then_delete(paths, *a, **k):
        digests = real_hash_all(paths, *a, **k)
        victim.unlink(missing_ok=True)
        return digests

    monkeypatch.setattr(scan_mod, "_hash_all", hash_then_delete)
    model = retrain.train(root, quick(cache_dir))
    skipped = {Path(s.path).name: s.reason for s in model.metrics.skipped_files}
    assert "No such file" in skipped["사라질 사진.jpg"]


def test_file_unreadable_for_permissions_mid_run_is_skipped(tmp_path, cache_dir, monkeypatch):
    """chmod 000 does not stop root (test_scan covers it for other users): the open fails instead."""
    root = hostile_folder(tmp_path / "d")
    victim = new_photo(root / DOG / "잠긴 사진.jpg")
    real_open = decode_mod.open_regular  # how the decoder opens every file (the scan's hashing has its own)

    def guarded_open(path, *a, **k):
        if Path(path) == victim:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(decode_mod, "open_regular", guarded_open)
    model = retrain.train(root, quick(cache_dir))
    skipped = {Path(s.path).name: s.reason for s in model.metrics.skipped_files}
    assert skipped["잠긴 사진.jpg"] == "cannot read: Permission denied"
