"""Screenshots of each step of the web app, for anyone to look at the pages without clicking through them.

Run: .venv/bin/python tests/web_screenshots.py OUT_DIR [--model MODEL_DIR]

Starts `retrain serve` (in this process, on a free loopback port, with a throwaway workspace),
drives the same flow as the browser test (webflow.py) in Debian's headless Chromium with a fake
webcam, and writes OUT_DIR/<step>.png. Without --model the server starts with the bundled
ImageNet classifier. Takes about a minute on two cores.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from webflow import FAKE_CAMERA, Flow  # noqa: E402


def start_server(model: str | None, workspace: Path):
    import socket

    import uvicorn

    from retrain.serve import ServeConfig, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(model, ServeConfig(workspace=str(workspace))), host="127.0.0.1",
                                        port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    return srv, f"http://127.0.0.1:{port}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", help="model folder to start the server with (default: ImageNet)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        srv, url = start_server(args.model, Path(tmp) / "workspace")
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS + FAKE_CAMERA)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)

        def shot(name: str, full_page: bool) -> None:
            page.screenshot(path=str(args.out / f"{name}.png"), full_page=full_page)
            print(args.out / f"{name}.png")

        flow = Flow(page, url, Path(tmp) / "photos", shot)
        flow.create_classes()
        planted = flow.upload()
        flow.webcam()
        flow.train()
        flow.try_model()
        flow.doubt()
        flow.understand()
        flow.fix(planted, "circles")
        flow.delete_with_undo("camera")
        flow.train("9-retraining")
        flow.reload()
        browser.close()
        srv.should_exit = True
    return 0


if __name__ == "__main__":
    sys.exit(main())
