"""The web app's whole flow as a person would click through it, for the browser tests and the screenshots script.

Three classes: circles and stripes from uploaded generated photos (one circle planted among the
stripes), and "camera" from the fake webcam Chromium offers with FAKE_CAMERA. Then train, try,
understand, fix the planted photo, retrain, reload, download.
"""
from __future__ import annotations

import hashlib
import io
import urllib.request
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np

from conftest import draw_shape

FAKE_CAMERA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
PER_CLASS = 12
TRAIN_TIMEOUT_MS = 240_000


def shape_photos(folder: Path, kind: str, n: int, seed: int, size: int = 80) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{kind}_{seed}_{i}.png"
        draw_shape(kind, rng, size).save(path)
        paths.append(str(path))
    return paths


def photo_id(path: str) -> str:
    """The name the server stores a photo under: its content hash and sniffed extension."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:32] + Path(path).suffix


def card(name: str) -> str:
    return f".class-card[data-class='{name}']"


def count_is(page, name: str, n: int) -> None:
    page.wait_for_function(f"() => document.querySelector(\"{card(name)} .count\")?.textContent === '{n} photos'")


class Flow:
    def __init__(self, page, server: str, folder: Path, shot: Callable[[str, bool], None] | None = None):
        """shot(name, full_page): called at each step worth a screenshot."""
        self.page, self.server, self.folder = page, server, folder
        self.shot = shot or (lambda name, full_page: None)

    def add_class(self, name: str) -> None:
        self.page.fill("#class-name", name)
        self.page.click("#add-class button")

    def create_classes(self) -> None:
        self.page.goto(self.server + "/")
        for name in ("circles", "stripes", "camera"):
            self.add_class(name)
            self.page.wait_for_selector(card(name))
        self.add_class("Circles")  # names are unique ignoring case
        self.page.wait_for_selector("#class-error:not([hidden])")
        assert "exists already" in self.page.inner_text("#class-error")
        self.add_class("x" * 70)  # refused with the limit, never cut
        self.page.wait_for_function("() => document.getElementById('class-error').textContent.includes('limit is 64')")
        self.shot("1-classes", True)

    def upload(self) -> str:
        """Upload circles and stripes, with one circle among the stripes; the planted photo's id."""
        circles = shape_photos(self.folder / "circles", "circles", PER_CLASS, seed=1)
        stripes = shape_photos(self.folder / "stripes", "stripes", PER_CLASS - 1, seed=2)
        planted = shape_photos(self.folder / "planted", "circles", 1, seed=3)
        self.page.set_input_files(f"{card('circles')} input[type=file]", circles)
        count_is(self.page, "circles", PER_CLASS)
        self.page.set_input_files(f"{card('stripes')} input[type=file]", stripes + planted)
        count_is(self.page, "stripes", PER_CLASS)
        self.page.set_input_files(f"{card('stripes')} input[type=file]", stripes[:2])  # again: said, not added
        self.page.wait_for_function(f"() => document.querySelector(\"{card('stripes')} .note\").textContent"
                                    ".includes('2 already in this class')")
        count_is(self.page, "stripes", PER_CLASS)
        return photo_id(planted[0])

    def webcam(self, name: str = "camera", n: int = PER_CLASS) -> None:
        self.page.click(f"{card(name)} button.camera")
        self.page.wait_for_function("() => document.getElementById('camera-video').videoWidth > 0")
        for i in range(n):
            self.page.click("#capture")
            self.page.wait_for_function(f"() => document.getElementById('camera-count').textContent === '{i + 1} taken'")
        self.shot("2-webcam", False)
        self.page.click("#camera-done")
        count_is(self.page, name, n)
        self.shot("3-photos", True)

    def train(self, step: str = "4-training") -> str:
        """Train fast; the run's log."""
        self.page.check("input[name=quality][value=fast]")
        self.page.click("#train")
        self.page.wait_for_selector("#cancel:not([hidden])")
        self.page.wait_for_function("() => document.getElementById('log').textContent.includes('Per class') || "
                                    "document.getElementById('job-status').textContent !== 'Training:'")
        self.shot(step, True)
        self.page.wait_for_function("() => document.getElementById('job-status').textContent === 'Done.'",
                                    timeout=TRAIN_TIMEOUT_MS)
        assert self.page.is_hidden("#job-error")
        return self.page.inner_text("#log")

    def try_model(self) -> None:
        self.page.wait_for_function("() => document.getElementById('model-info').textContent.startsWith('3 classes')")
        held_out = shape_photos(self.folder / "held-out", "circles", 1, seed=9)
        self.page.set_input_files("#files", held_out)
        self.page.wait_for_selector("#results .card[data-top]")
        assert self.page.get_attribute("#results .card", "data-top") == "circles"
        self.page.click("#live")
        self.page.wait_for_selector("#live-result[data-top]")
        assert self.page.get_attribute("#live-result", "data-top") == "camera"
        self.shot("5-try", True)
        self.page.click("#live")

    def doubt(self) -> None:
        """A circle added to stripes is questioned by the new model; delete it from its card."""
        photo = shape_photos(self.folder / "doubt", "circles", 1, seed=8)
        self.page.set_input_files(f"{card('stripes')} input[type=file]", photo)
        self.page.wait_for_function(f"() => document.querySelector(\"{card('stripes')} .note\").textContent"
                                    ".includes(\"looks like 'circles'\")")
        self.page.click(f"{card('stripes')} .thumb[data-photo='{photo_id(photo[0])}']")
        self.page.click("#delete-photo")
        count_is(self.page, "stripes", PER_CLASS)

    def understand(self) -> None:
        self.page.wait_for_selector("#understand-step:not([hidden])")
        assert "circles" in self.page.inner_text("#per-class")
        self.page.frame_locator("#report").locator("#confusion-matrix").wait_for()
        self.page.locator("#report").scroll_into_view_if_needed()
        self.shot("6-understand", True)

    def fix(self, photo: str, target: str) -> None:
        """Open a photo doctor suspects of being mislabelled, and move it to its class."""
        finding = self.page.locator("#findings li", has_text="possibly mislabelled").filter(
            has=self.page.locator(f".thumb[data-photo='{photo}']"))
        assert "looks like circles" in finding.inner_text()
        finding.locator(f".thumb[data-photo='{photo}']").click()
        self.page.select_option("#move-to", target)
        self.shot("7-photo", False)
        self.page.click("#move")
        self.page.wait_for_selector(f"{card(target)} .thumb[data-photo='{photo}']")

    def delete_with_undo(self, name: str) -> None:
        """Delete one photo and undo it; ask to delete a class, keep it, delete it, undo, delete for good."""
        first = self.page.get_attribute(f"{card(name)} .thumb", "data-photo")
        self.page.click(f"{card(name)} .thumb[data-photo='{first}']")
        self.page.click("#delete-photo")
        count_is(self.page, name, PER_CLASS - 1)
        self.page.click("#undo")
        count_is(self.page, name, PER_CLASS)
        self.add_class("spare")
        self.page.set_input_files(f"{card('spare')} input[type=file]",
                                  shape_photos(self.folder / "spare", "squares", 2, seed=4))
        count_is(self.page, "spare", 2)
        self.page.click(f"{card('spare')} .delete-class")
        assert "2 photos" in self.page.inner_text("#confirm-text")
        self.shot("8-confirm", False)
        self.page.click("#confirm-no")
        assert self.page.is_visible(card("spare"))
        self.page.click(f"{card('spare')} .delete-class")
        self.page.click("#confirm-yes")
        self.page.wait_for_selector(card("spare"), state="detached")
        self.page.click("#undo")
        count_is(self.page, "spare", 2)
        self.page.click(f"{card('spare')} .delete-class")
        self.page.click("#confirm-yes")
        self.page.wait_for_selector(card("spare"), state="detached")

    def reload(self) -> None:
        self.page.reload()
        for name in ("circles", "stripes", "camera"):
            count_is(self.page, name, PER_CLASS + (name == "circles") - (name == "stripes"))
        self.page.wait_for_function("() => document.querySelectorAll('#model-select option').length === 3")
        self.page.wait_for_selector("#understand-step:not([hidden])")
        self.shot("10-after-reload", True)

    def download(self) -> list[str]:
        with urllib.request.urlopen(self.server + self.page.get_attribute("#download", "href"), timeout=30) as r:
            with zipfile.ZipFile(io.BytesIO(r.read())) as z:
                return sorted(z.namelist())
