"""`retrain serve`: the HTTP API, its limits, hostile requests, training in the background, SIGTERM.

The workspace's own routes (photos, undo, models, persistence) are in test_serve_workspace.py.
"""
from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import retrain
from retrain.api import TrainConfig
from retrain.cli import retrain_main
from retrain.head import HeadConfig
from retrain.prediction import load
from retrain.batching import Batcher
from retrain.jobs import Job
from retrain.serve import STATIC, ServeConfig, create_app
from retrain.trainjob import run as run_worker
from retrain.webconfig import ApiError

from conftest import draw_shape, make_dataset
from test_decode import png_claiming

LOCAL = "http://127.0.0.1"


@pytest.fixture(scope="module")
def model_dir(cache_dir, tmp_path_factory) -> Path:
    """A small shapes classifier on the real Lite0 backbone, trained once per module."""
    data = make_dataset(tmp_path_factory.mktemp("serve-data") / "shapes")
    config = TrainConfig(cache_dir=str(cache_dir), quiet=True, head=HeadConfig(steps=200, seed=0))
    return retrain.train(data, config).save(tmp_path_factory.mktemp("serve-model") / "model")


@pytest.fixture(scope="module")
def untested_model_dir(cache_dir, tmp_path_factory) -> Path:
    """A model trained on 4 photos a class: too few to hold any out, so it has no test photos at all."""
    data = make_dataset(tmp_path_factory.mktemp("untested-data") / "shapes", per_class=4,
                        classes=("circles", "stripes"))
    config = TrainConfig(cache_dir=str(cache_dir), quiet=True, mode="head", head=HeadConfig(steps=50, seed=0))
    return retrain.train(data, config).save(tmp_path_factory.mktemp("untested-model") / "model")


@pytest.fixture(scope="module")
def classifier(model_dir):
    return load(model_dir)


@pytest.fixture
def serve_config(tmp_path) -> ServeConfig:
    return ServeConfig(workspace=str(tmp_path / "workspace"), max_upload_bytes=4 << 20)


@pytest.fixture
def client(classifier, serve_config):
    with TestClient(create_app(classifier, serve_config), base_url=LOCAL) as c:
        yield c


def image_bytes(kind: str, seed: int = 7, size: int = 150, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    draw_shape(kind, np.random.default_rng(seed), size).save(buf, fmt)
    return buf.getvalue()


def upload(*items: tuple[str, bytes]) -> list:
    return [("files", (name, data, "image/png")) for name, data in items]


def predict_ok(client, kind: str = "circles") -> dict:
    r = client.post("/predict", files=upload((f"{kind}.png", image_bytes(kind))))
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------- predictions

def test_predict_one_image_returns_ranked_labels(client):
    result = predict_ok(client, "stripes")["results"][0]
    assert result["file"] == "stripes.png" and result["unknown"] is False
    labels = [p["label"] for p in result["predictions"]]
    scores = [p["score"] for p in result["predictions"]]
    assert labels[0] == "stripes" and sorted(labels) == ["circles", "squares", "stripes"]
    assert scores == sorted(scores, reverse=True) and abs(sum(scores) - 1) < 1e-4


def test_predict_several_images_in_order_with_top_k(client):
    kinds = ["squares", "circles", "stripes"]
    files = upload(*((f"{k}.jpg", image_bytes(k, seed=i, fmt="JPEG")) for i, k in enumerate(kinds)))
    r = client.post("/predict?top_k=2", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["file"] for x in results] == [f"{k}.jpg" for k in kinds]
    assert [x["predictions"][0]["label"] for x in results] == kinds
    assert all(len(x["predictions"]) == 2 for x in results)


def test_labels_health_metrics_and_openapi(client, classifier):
    assert client.get("/labels").json() == {"labels": classifier.labels, "model": "startup"}
    assert client.get("/healthz").json()["status"] == "ok"
    predict_ok(client)
    client.post("/predict", content=b"{}", headers={"content-type": "application/json"})
    m = client.get("/metrics").json()
    assert m["requests"]["POST /predict"] == {"200": 1, "415": 1}
    assert m["latency_ms"]["POST /predict"]["count"] == 2 and m["latency_ms"]["POST /predict"]["p99"] > 0
    assert m["predict"]["images"] == 1 and m["predict"]["in_flight"] == 0
    spec = client.get("/openapi.json").json()
    assert "multipart/form-data" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"/labels", "/healthz", "/metrics", "/classes", "/jobs", "/models", "/model", "/undo/{token}",
            "/photos/{photo}", "/models/{model_id}/report.html"} <= set(spec["paths"])


def test_pages_are_served_and_load_nothing_from_the_internet(client):
    for path, marker in (("/", 'id="drop"'), ("/train", 'id="add-class"')):
        r = client.get(path)
        assert r.status_code == 200 and marker in r.text
        assert "default-src 'self'" in r.headers["content-security-policy"]
    for f in STATIC.iterdir():
        assert client.get(f"/static/{f.name}").status_code == 200
        text = f.read_text()
        assert "http://" not in text and "https://" not in text, f"{f.name} refers to another site"


# ---------------------------------------------------------------- hostile requests

HOSTILE = {
    "wrong content type": (lambda: {"content": b'{"files": 1}', "headers": {"content-type": "application/json"}},
                           415, "multipart/form-data"),
    "no file part": (lambda: {"headers": {"content-type": "multipart/form-data; boundary=b"},
                              "content": b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nx\r\n--b--\r\n'},
                     400, "no image"),
    "broken multipart": (lambda: {"content": b"garbage", "headers": {"content-type": "multipart/form-data"}},
                         400, "boundary"),
    "zero bytes": (lambda: {"files": upload(("empty.png", b""))}, 422, "empty file"),
    "truncated png": (lambda: {"files": upload(("cut.png", image_bytes("circles")[:400]))}, 422, "cut.png"),
    "truncated jpeg": (lambda: {"files": upload(("cut.jpg", image_bytes("circles", fmt="JPEG")[:300]))}, 422, "cut.jpg"),
    "huge dimensions": (lambda: {"files": upload(("bomb.png", png_claiming(30000, 30000)))}, 422, "30000x30000"),
    "not an image": (lambda: {"files": upload(("notes.txt", b"just some text\n" * 10))}, 415, "not a JPEG"),
    "text named .jpg": (lambda: {"files": [("files", ("photo.jpg", b"<svg></svg>", "image/jpeg"))]}, 415, "content"),
    "too many files": (lambda: {"files": upload(*[(f"{i}.png", b"x") for i in range(17)])}, 400, "Too many files"),
    "body over the limit": (lambda: {"files": upload(("big.png", b"\x89PNG\r\n\x1a\n" + bytes(5 << 20)))},
                            413, "MiB limit"),
    "path-like top_k": (lambda: {"params": {"top_k": "../../etc/passwd"}, "files": upload(("a.png", image_bytes("circles")))},
                        422, "top_k"),
    "top_k of zero": (lambda: {"params": {"top_k": 0}, "files": upload(("a.png", image_bytes("circles")))},
                      422, "top_k"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_predict_request_gets_a_clear_4xx_and_serving_goes_on(client, case):
    make, status, words = HOSTILE[case]
    r = client.post("/predict", **make())
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    predict_ok(client)


def test_one_bad_image_fails_the_request_and_names_it(client):
    files = upload(("good.png", image_bytes("circles")), ("bad.png", b"nope"))
    r = client.post("/predict", files=files)
    assert r.status_code == 415 and r.json()["error"].startswith("bad.png: ")


def test_path_like_file_name_is_only_echoed_as_a_base_name(client):
    r = client.post("/predict", files=upload(("../../etc/passwd", image_bytes("circles"))))
    assert r.status_code == 200 and r.json()["results"][0]["file"] == "passwd"


def test_unknown_route_and_method_are_json_errors(client):
    assert client.get("/nowhere").json() == {"error": "Not Found"}
    assert client.get("/predict").status_code == 405


def test_other_host_names_and_cross_origin_writes_are_refused(client):
    r = client.get("/labels", headers={"host": "attacker.example"})  # DNS rebinding
    assert r.status_code == 403 and "Host" in r.json()["error"]
    r = client.post("/classes", json={"name": "x"}, headers={"origin": "http://attacker.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["error"]
    r = client.post("/classes", json={"name": "x"}, headers={"origin": LOCAL})
    assert r.status_code == 201


def test_full_queue_answers_503_with_retry_after(client, serve_config):
    gate = client.app.state.serve.gate
    gate.inside = gate.limit  # as if max_queue requests were in progress
    r = client.post("/predict", files=upload(("a.png", image_bytes("circles"))))
    assert r.status_code == 503 and r.headers["retry-after"] == str(serve_config.retry_after_s)
    assert "busy" in r.json()["error"]
    gate.inside = 0
    predict_ok(client)
    assert client.get("/metrics").json()["predict"]["refused_busy"] == 1


# ---------------------------------------------------------------- batching

class FakeModel:
    """Stands in for a Classifier: records batch sizes; row i's 'probabilities' are its first pixel."""

    def __init__(self, fail: bool = False):
        self.sizes: list[int] = []
        self.fail = fail

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        self.sizes.append(len(batch))
        if self.fail:
            raise RuntimeError("boom")
        time.sleep(0.01)
        return batch[:, 0, 0, :1].astype(np.float32)


def _run_requests(model: FakeModel, max_batch: int, sizes: list[int]) -> list[np.ndarray]:
    async def main():
        batcher = Batcher(max_batch)
        runner = asyncio.create_task(batcher.run())
        requests = [np.full((n, 2, 2, 3), i, np.uint8) for i, n in enumerate(sizes)]
        try:
            return await asyncio.gather(*(batcher.classify(model, r) for r in requests), return_exceptions=True)
        finally:
            runner.cancel()
            batcher.runner.shutdown()
    # In a thread of its own: a session-wide Playwright keeps an event loop running in the main thread.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result()


def test_batcher_merges_waiting_requests_up_to_max_batch():
    model = FakeModel()
    results = _run_requests(model, max_batch=8, sizes=[3, 3, 3, 1, 12])
    # In arrival order; a request over max_batch runs alone, max_batch images a call (--max_batch 1: no batching).
    assert model.sizes == [6, 4, 8, 4]
    for i, (res, n) in enumerate(zip(results, [3, 3, 3, 1, 12])):
        assert res.shape == (n, 1) and (res == i).all()  # every request gets exactly its own rows


def test_batcher_failure_fails_those_requests_only():
    results = _run_requests(FakeModel(fail=True), max_batch=4, sizes=[1, 1])
    assert all(isinstance(r, ApiError) and r.status == 500 and "boom" in r.message for r in results)


# ---------------------------------------------------------------- training through the API

@pytest.mark.parametrize("name", ["../../etc/passwd", "..", ".hidden", "train", "Validation", "a/b", "a\\b",
                                  "", " ", "two\nlines", "_under", "nul\x00"])
def test_bad_class_names_are_refused(client, name):
    r = client.post("/classes", json={"name": name})
    assert r.status_code == 400 and "invalid class name" in r.json()["error"]
    assert client.get("/classes").json()["classes"] == []


@pytest.mark.parametrize("name", ["daisy", "Golden retriever", "café", "R2-D2", "v1.5"])
def test_good_class_names_are_kept(client, name):
    assert client.post("/classes", json={"name": name}).status_code == 201
    assert client.get("/classes").json()["classes"] == [{"name": name, "images": 0}]


def test_uploads_go_under_server_chosen_names_in_the_workspace(client, tmp_path):
    client.post("/classes", json={"name": "circles"})
    good = image_bytes("circles")
    files = upload(("../../../evil.png", good), ("again.png", good), ("junk.png", b"MZ\x90\x00"),
                   ("zero.png", b""))
    r = client.post("/classes/circles/images", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["added"]) == 1 and body["images"] == 1  # the same photo twice is stored once, and said so
    assert len(body["duplicates"]) == 1 and body["duplicates"][0] in ("evil.png", "again.png")  # the later one
    assert [x["file"] for x in body["rejected"]] == ["junk.png", "zero.png"]
    root = client.app.state.serve.workspace.root
    stored = [p for p in root.rglob("*") if p.is_file() and p.name != ".serve.lock"]
    assert len(stored) == 1 and stored[0].parent == root / "data" / "circles"
    assert stored[0].suffix == ".png" and len(stored[0].stem) == 32
    assert not list(tmp_path.rglob("evil*"))
    r = client.post("/classes/circles/images", files=upload(("junk.png", b"MZ")))
    assert r.status_code == 422 and "junk.png" in r.json()["error"]
    for path in ("/classes/nope/images", "/classes/..%2F..%2Fetc/images"):
        assert client.post(path, files=upload(("a.png", good))).status_code in (400, 404)


def test_training_needs_two_classes_with_photos(client):
    client.post("/classes", json={"name": "only"})
    r = client.post("/jobs", json={"quality": "fast"})
    assert r.status_code == 400 and "two classes" in r.json()["error"]
    r = client.post("/jobs", json={"quality": "best"})
    assert r.status_code == 422 and "fast or accurate" in r.json()["error"]
    assert client.get("/jobs/../../etc").status_code == 404
    assert client.get("/models/abc/model.zip").status_code == 404


def wait_for_job(client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["status"] != "running":
            return job
        time.sleep(0.25)
    raise AssertionError(f"training did not finish in {timeout} s: {job}")


def test_train_in_background_while_serving_then_download(client, tmp_path):
    for kind in ("circles", "stripes"):
        client.post("/classes", json={"name": kind})
        files = upload(*((f"{i}.png", image_bytes(kind, seed=100 + i, size=96)) for i in range(8)))
        assert client.post(f"/classes/{kind}/images", files=files).json()["images"] == 8
    job = client.post("/jobs", json={"quality": "fast"}).json()
    assert job["status"] == "running"
    r = client.post("/jobs", json={"quality": "fast"})
    assert r.status_code == 409 and job["id"] in r.json()["error"]  # one run at a time, and which one
    start = time.perf_counter()
    predict_ok(client)  # predictions go on while the training subprocess runs
    assert time.perf_counter() - start < 5
    assert client.get(f"/models/{job['id']}/model.zip").status_code == 404
    job = wait_for_job(client, job["id"])
    assert job["status"] == "done", job
    assert job["result"]["classes"] == ["circles", "stripes"] and job["progress"] == 1.0
    # One test photo a class: the accuracy comes with its N and interval, and says it cannot be claimed.
    evidence = job["result"]["test_evidence"]
    assert evidence["n"] == 2 and evidence["measurable"] is False and len(evidence["interval"]) == 2
    assert job["result"]["test_accuracy"] == evidence["accuracy"]  # kept for older clients
    assert job["result"]["test_accuracy_text"].startswith("not measurable on 2 test photos (")
    assert any(line.startswith("Found 16 images in 2 classes; split") for line in job["log"])  # the whole log
    assert not any("/tmp" in line or "Saved" in line for line in job["log"])
    # The new model is served at once, without a restart.
    assert client.get("/labels").json() == {"labels": ["circles", "stripes"], "model": job["id"]}
    assert predict_ok(client, "stripes")["results"][0]["predictions"][0]["label"] == "stripes"

    r = client.get(job["download"])
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        assert sorted(z.namelist()) == ["labels.txt", "metrics.json", "model.onnx", "report.html"]
        assert "Confusion matrix" in z.read("report.html").decode()
        z.extractall(tmp_path / "downloaded")
    assert load(tmp_path / "downloaded").labels == ["circles", "stripes"]


def test_training_state_is_folded_from_the_worker_events(tmp_path):
    job = Job("j", tmp_path, "fast")
    job.read_event({"type": "progress", "stage": "Extracting features (lite0)", "done": 8, "total": 16, "unit": "img"})
    job.read_event({"type": "log", "message": "Found 16 images in 2 classes"})
    state = job.to_dict()
    assert state["stage"] == "Extracting features (lite0)" and state["progress"] == 0.5
    job.read_event({"type": "error", "message": "no usable training images left for class(es): cats"})
    state = job.to_dict()
    assert state["stage"] == "failed" and state["progress"] is None  # not the last stage it was in
    assert state["log"] == ["Found 16 images in 2 classes"]
    assert state["error"].startswith("no usable training images")
    done = Job("k", tmp_path, "fast")
    done.read_event({"type": "stage", "stage": "Checking the photos (doctor)"})
    done.read_event({"type": "done", "result": {"model": "m"}})
    assert done.to_dict()["stage"] == "done"


def test_a_run_that_said_done_is_not_cancelled_and_keeps_its_model(tmp_path):
    # What an auditor met: cancelled in the second between the done event and the worker's exit, the run ended
    # "cancelled" with its results shown and its model thrown away.
    from unittest import mock

    from retrain.jobs import Trainer

    trainer = Trainer(workspace=None, finished=lambda job, folder: None)
    job = Job("j", tmp_path, "fast", process=mock.Mock())
    trainer.jobs["j"] = job
    job.read_event({"type": "done", "result": {"model": "m"}})
    assert trainer.cancel("j").status == "running" and not job.process.terminate.called
    running = Job("r", tmp_path, "fast", process=mock.Mock())
    trainer.jobs["r"] = running
    assert trainer.cancel("r").status == "cancelled" and running.process.terminate.called


def test_the_worker_reports_a_user_error_as_an_error_event(tmp_path, cache_dir):
    for kind in ("cats", "dogs"):
        (tmp_path / "data" / kind).mkdir(parents=True)
        (tmp_path / "data" / kind / "a.png").write_bytes(b"not an image at all")
    events = []
    spec = {"data": str(tmp_path / "data"), "output": str(tmp_path / "model"), "quality": "fast",
            "cache_dir": str(cache_dir)}
    assert run_worker(spec, events.append) == 2
    assert events[-1]["type"] == "error" and "no usable training images" in events[-1]["message"]
    assert not (tmp_path / "model").exists()  # nothing half-written


def test_cancelled_training_says_so(client):
    for kind in ("circles", "squares"):
        client.post("/classes", json={"name": kind})
        client.post(f"/classes/{kind}/images", files=upload(("a.png", image_bytes(kind))))
    job = client.post("/jobs", json={"quality": "fast"}).json()
    assert client.delete(f"/jobs/{job['id']}").json()["status"] == "cancelled"
    job = wait_for_job(client, job["id"], timeout=30)
    assert job["status"] == "cancelled" and job["progress"] is None and job["download"] is None
    assert client.get("/models").json()["models"][0]["id"] == "startup"  # no model kept from it


# ---------------------------------------------------------------- the command

def test_serve_command_refuses_a_workspace_it_cannot_make(model_dir, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "file"))
    assert retrain_main(["serve", str(model_dir), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert f"cannot use {tmp_path / 'file'}/retrain/workspace as the workspace" in err and "Traceback" not in err


def test_serve_command_refuses_a_missing_model(tmp_path, capsys):
    assert retrain_main(["serve", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "model not found" in err and "Traceback" not in err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("server did not start")


def get_json(port: int, path: str) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", path)
    return json.loads(conn.getresponse().read())


def test_sigterm_finishes_the_request_in_flight_then_exits(model_dir, tmp_path):
    port = free_port()
    env = os.environ | {"XDG_DATA_HOME": str(tmp_path)}  # where the server keeps its default workspace
    proc = subprocess.Popen([sys.executable, "-m", "retrain", "serve", str(model_dir), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        wait_until_up(port, proc)
        boundary = "edge"
        body = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="c.png"\r\n'
                f"Content-Type: image/png\r\n\r\n").encode() + image_bytes("circles") + f"\r\n--{boundary}--\r\n".encode()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.putrequest("POST", "/predict")
        conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        conn.send(body[:100])  # the request is in flight: headers and part of the body sent
        deadline = time.monotonic() + 10
        while get_json(port, "/metrics")["receiving_bodies"] != 1:  # its body is being read
            assert time.monotonic() < deadline, "request never reached the handler"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # still finishing our request
        conn.send(body[100:])
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["results"][0]["predictions"][0]["label"] == "circles"
        conn.close()
        # uvicorn re-raises the signal once shut down, so a supervisor sees "ended by SIGTERM"
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
        log = proc.stderr.read().decode()
        assert "Finished server process" in log and "Traceback" not in log, log
        assert (tmp_path / "retrain" / "workspace" / "data").is_dir()  # the workspace stays for the next run
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_progress_subscribers_get_counts_and_log_lines_as_data(monkeypatch):
    from retrain.progress import progress, say, subscribed

    monkeypatch.setenv("RETRAIN_PROGRESS", "bars")  # even where a bar would be drawn
    events = []
    with subscribed(events.append):
        bar = progress(total=16, desc="Extracting features (lite0)", unit="img")
        bar.update(8)
        bar.update(8)
        say("Found 16 images")
    bar = progress(total=4, desc="after", unit="img")
    bar.update(4)
    assert events[-2] == {"type": "progress", "stage": "Extracting features (lite0)", "done": 16, "total": 16,
                          "unit": "img"}
    assert events[-1] == {"type": "log", "message": "Found 16 images"}
    assert all(e.get("stage") != "after" for e in events)  # nothing once unsubscribed
