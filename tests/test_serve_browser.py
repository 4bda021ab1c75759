"""The two web pages of `retrain serve`, driven in headless Chromium (Debian's) through Playwright."""
from __future__ import annotations

import io
import threading
import time
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest

from retrain.serve import ServeConfig, create_app

from conftest import draw_shape
from test_serve import free_port, model_dir  # noqa: F401  (model_dir: the module's trained model fixture)

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):  # noqa: F811
    """uvicorn on a free loopback port, in a background thread."""
    import uvicorn

    port = free_port()
    config = ServeConfig(workspace_parent=str(tmp_path_factory.mktemp("serve-workspace")))
    srv = uvicorn.Server(uvicorn.Config(create_app(model_dir, config), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def page(chromium):
    """A fresh page in conftest's Chromium (skips where there is none); fails on a logged error."""
    context = chromium.new_context()
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    errors = []

    def on_console(msg) -> None:
        # Chromium logs every 4xx answer as a failed resource load; the tests send some on purpose.
        if msg.type == "error" and "the server responded with a status of 4" not in msg.text:
            errors.append(msg.text)

    pg.on("console", on_console)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    context.close()
    assert not errors, errors


def photos(folder: Path, kind: str, n: int, seed: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{kind}_{i}.png"
        draw_shape(kind, rng, 96).save(path)
        paths.append(str(path))
    return paths


def test_predict_page_shows_the_top_predictions_as_bars(page, server, tmp_path):  # page first: skips early
    page.goto(server + "/")
    page.wait_for_function("() => document.getElementById('model-info').textContent.includes('3 classes')")
    circle = photos(tmp_path, "circles", 1, seed=5)[0]
    stripes = photos(tmp_path, "stripes", 1, seed=6)[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    page.set_input_files("#files", [circle, stripes, str(broken)])
    page.wait_for_function("() => document.querySelectorAll('.card .predictions, .card .error').length === 3")
    tops = {}
    for card in page.query_selector_all(".card"):
        name = card.query_selector(".name").inner_text()
        labels = [x.inner_text() for x in card.query_selector_all(".bar .label")]
        tops[name] = labels
        if name == "broken.png":
            assert "not a JPEG" in card.query_selector(".error").inner_text()
        else:
            assert len(labels) == 3 and card.query_selector("img").is_visible()
    assert tops["circles_0.png"][0] == "circles" and tops["stripes_0.png"][0] == "stripes"


def test_train_page_trains_a_model_to_download(page, server, tmp_path):
    page.goto(server + "/train")
    for kind in ("circles", "stripes"):
        page.fill("#class-name", kind)
        page.click("#add-class button")
        card = f".class-card[data-class='{kind}']"
        page.wait_for_selector(card)
        page.set_input_files(f"{card} input[type=file]", photos(tmp_path / kind, kind, 8, seed=len(kind)))
        page.wait_for_function(f"() => document.querySelector(\"{card} .count\").textContent === '8 photos'")
    page.fill("#class-name", "../../etc/passwd")
    page.click("#add-class button")
    page.wait_for_selector("#class-error:not([hidden])")
    assert "invalid class name" in page.inner_text("#class-error")

    page.fill("#steps", "40")
    page.click("#train")
    page.wait_for_selector("#job:not([hidden])")
    page.wait_for_selector("#download", state="visible", timeout=120_000)
    assert "accuracy" in page.inner_text("#accuracy") or "Trained on" in page.inner_text("#accuracy")
    href = page.get_attribute("#download", "href")
    with urllib.request.urlopen(server + href, timeout=30) as r:
        data = r.read()
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert sorted(z.namelist()) == ["labels.txt", "metrics.json", "model.onnx"]
        assert z.read("labels.txt").decode().split() == ["circles", "stripes"]
