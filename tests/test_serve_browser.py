"""The web app driven in headless Chromium (Debian's) through Playwright, with Chromium's fake webcam.

The whole flow of issue #17 in one test (webflow.py holds the steps, shared with the screenshots
script), and a second tab following and cancelling a run.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

import test_serve
from retrain.serve import ServeConfig, create_app
from test_serve import free_port
from webflow import FAKE_CAMERA, Flow, card, count_is, shape_photos

pytestmark = [pytest.mark.slow, pytest.mark.browser]
model_dir = test_serve.model_dir  # the module fixture: a small trained model to start the server with
untested_model_dir = test_serve.untested_model_dir  # and one with no test photos


@pytest.fixture(scope="module")
def browser(chromium):
    """conftest's Chromium again, launched with a fake webcam that needs no permission prompt."""
    from conftest import CHROMIUM, CHROMIUM_ARGS

    launched = chromium.browser_type.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS + FAKE_CAMERA)
    yield launched
    launched.close()


@pytest.fixture
def server(model_dir, tmp_path):
    """uvicorn on a free loopback port, in a background thread, with a fresh workspace."""
    with serving(model_dir, ServeConfig(workspace=str(tmp_path / "workspace"))) as url:
        yield url


@contextmanager
def serving(model_dir: Path, config: ServeConfig) -> Iterator[str]:
    """uvicorn serving `model_dir` under `config` on a free loopback port, in a background thread; its URL."""
    import uvicorn

    port = free_port()
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
def context(browser):
    """A browser context whose pages fail the test on a logged error."""
    ctx = browser.new_context()
    errors = []

    def watch(pg) -> None:
        pg.set_default_timeout(30_000)
        # Chromium logs every 4xx answer as a failed resource load; the tests send some on purpose.
        pg.on("console", lambda msg: msg.type == "error" and "the server responded with a status of 4" not in msg.text
              and errors.append(msg.text))
        pg.on("pageerror", lambda e: errors.append(str(e)))
    ctx.on("page", watch)
    yield ctx
    ctx.close()
    assert not errors, errors


def test_the_whole_flow_collect_train_try_understand_fix_retrain_reload(context, server, tmp_path):
    flow = Flow(context.new_page(), server, tmp_path)
    flow.create_classes()
    planted = flow.upload()
    flow.webcam()
    first_log = flow.train()
    assert "Found 36 images in 3 classes" in first_log  # the whole log, the split summary included
    flow.try_model()
    flow.doubt()
    flow.understand()
    flow.fix(planted, "circles")
    flow.delete_with_undo("camera")
    second_log = flow.train("9-retraining")
    assert "Found 36 images in 3 classes" in second_log and "extracting" not in second_log  # every feature cached
    flow.reload()
    assert flow.download() == ["labels.txt", "metrics.json", "model.onnx", "report.html"]


def test_try_photos_show_in_order_unreadable_ones_without_an_image_and_pasted_ones_too(context, server, tmp_path):
    page = context.new_page()
    page.goto(server + "/")
    page.wait_for_function("() => document.getElementById('model-info').textContent.startsWith('3 classes')")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a png")
    circle, = shape_photos(tmp_path, "circles", 1, seed=5)
    stripes, = shape_photos(tmp_path, "stripes", 1, seed=6)
    page.set_input_files("#files", [circle, str(broken), stripes])
    page.wait_for_function("() => document.querySelectorAll('#results .predictions, #results .error').length === 3")
    cards = page.query_selector_all("#results .card")
    assert [c.query_selector(".name").inner_text() for c in cards] == ["circles_5_0.png", "broken.png", "stripes_6_0.png"]
    assert [c.get_attribute("data-top") for c in cards] == ["circles", None, "stripes"]
    assert cards[1].query_selector("img") is None and "not a JPEG" in cards[1].inner_text()  # no broken image
    page.evaluate("""() => {
        const canvas = document.createElement("canvas");
        canvas.width = canvas.height = 64;
        canvas.getContext("2d").fillRect(0, 0, 64, 64);
        canvas.toBlob(blob => {
            const data = new DataTransfer();
            data.items.add(new File([blob], "pasted.png", {type: "image/png"}));
            document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data}));
        });
    }""")
    page.wait_for_selector("#results .card:nth-child(4)[data-top]")
    assert page.inner_text("#results .card:nth-child(4) .name") == "pasted.png"


def test_a_second_tab_follows_and_cancels_a_run(context, server, tmp_path):
    first, second = context.new_page(), context.new_page()
    first.goto(server + "/")
    for name, kind in (("circles", "circles"), ("stripes", "stripes")):
        first.fill("#class-name", name)
        first.click("#add-class button")
        first.wait_for_selector(card(name))
        first.set_input_files(f"{card(name)} input[type=file]", shape_photos(tmp_path / name, kind, 6, seed=len(name)))
        count_is(first, name, 6)
    second.goto(server + "/")
    first.click("#train")
    second.wait_for_selector("#cancel:not([hidden])")  # the other tab sees the run and may cancel it
    assert second.is_disabled("#train")
    second.click("#cancel")
    for page in (first, second):
        page.wait_for_function("() => document.getElementById('job-status').textContent === 'Cancelled.'")
        assert page.is_hidden("#progress") and page.is_hidden("#job-error")  # no full bar, no stale error
        assert page.is_enabled("#train")


def place_model(model: Path, workspace: Path, model_id: str, mtime: float) -> None:
    """A trained model in the workspace's store, as a finished run leaves it (the store lists its folder)."""
    from retrain.modelstore import zip_model

    shutil.copytree(model, workspace / "models" / model_id)
    zip_model(workspace / "models" / model_id)
    os.utime(workspace / "models" / model_id, (mtime, mtime))  # the store lists newest first


def test_test_accuracy_is_shown_with_its_evidence_and_no_test_photos_are_said(context, server, tmp_path, model_dir,
                                                                              untested_model_dir):
    workspace = tmp_path / "workspace"
    place_model(model_dir, workspace, "0123456789ab", time.time() - 60)
    place_model(untested_model_dir, workspace, "0123456789ac", time.time())  # the newest: step 4 shows it
    recorded = json.loads((model_dir / "metrics.json").read_text())["test_evidence"]
    page = context.new_page()
    page.goto(server + "/")
    page.wait_for_function("() => document.querySelectorAll('#model-select option').length === 3")
    untested, tested = [page.inner_text(f"#model-select option[value='{i}']") for i in ("0123456789ac", "0123456789ab")]
    assert untested.endswith("(circles, stripes; test accuracy not measured: no test photos)")
    assert f"; test accuracy not measurable on {recorded['n']} test photos (" in tested and "95% CI" in tested
    page.wait_for_function("() => document.getElementById('mistakes').textContent.startsWith('No test photos')")
    assert "no test photos" in page.inner_text("#per-class")
    assert "No mistakes" not in page.inner_text("#understand-step")
    page.select_option("#model-select", "0123456789ab")  # served now, so step 4 shows it
    page.wait_for_function("() => document.getElementById('serving').textContent.includes('not measurable on')")
    expected = f"No mistakes on the {recorded['n']} test photos." if recorded["accuracy"] == 1 else "→"
    page.wait_for_function(f"() => document.getElementById('mistakes').textContent.includes({json.dumps(expected)})")


def test_big_photos_go_in_requests_under_the_servers_body_limit(context, model_dir, tmp_path):
    # What an auditor met: eight 4.6 MB phone photos in one request were refused whole (413), none added.
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    photos = []
    for i in range(5):  # noise compresses badly: ~190 KB a photo, over 400 KB in any two
        photos.append(tmp_path / f"noise_{i}.png")
        Image.fromarray(rng.integers(0, 256, (250, 250, 3), dtype=np.uint8)).save(photos[-1])
    config = ServeConfig(workspace=str(tmp_path / "workspace"), max_upload_bytes=400_000)
    with serving(model_dir, config) as url:
        page = context.new_page()
        page.goto(url + "/")
        page.fill("#class-name", "noise")
        page.click("#add-class button")
        page.wait_for_selector(card("noise"))
        page.set_input_files(f"{card('noise')} input[type=file]", [str(p) for p in photos])
        count_is(page, "noise", 5)
        page.close()  # before the server goes: the page polls it
