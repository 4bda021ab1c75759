"""The web app's workspace through its routes: classes, photos, undo, models, and what survives a restart."""
from __future__ import annotations

import errno
import io
import json
import shutil
import zipfile

import pytest
from fastapi.testclient import TestClient

from retrain.errors import UserError
from retrain.metrics import Evidence
from retrain.serve import ServeConfig, create_app
from retrain.trainjob import evidence_text
from retrain.workspace import Workspace

import test_serve
from test_serve import LOCAL, image_bytes, upload

# The module fixtures: a small trained model, and one with no test photos.
model_dir, classifier, untested_model_dir = test_serve.model_dir, test_serve.classifier, test_serve.untested_model_dir

ATTACKER = {"origin": "http://attacker.example"}


@pytest.fixture
def workspace(tmp_path):
    return tmp_path / "workspace"


def open_client(classifier, workspace):
    return TestClient(create_app(classifier, ServeConfig(workspace=str(workspace))), base_url=LOCAL)


@pytest.fixture
def client(classifier, workspace):
    with open_client(classifier, workspace) as c:
        yield c


def add_photos(client, name: str, kind: str, n: int, seed: int = 0) -> list[str]:
    client.post("/classes", json={"name": name})
    files = upload(*((f"{kind}{i}.png", image_bytes(kind, seed=seed + i, size=64)) for i in range(n)))
    r = client.post(f"/classes/{name}/images", files=files)
    assert r.status_code == 200, r.text
    return r.json()["added"]


def photos_of(client, name: str) -> list[str]:
    return client.get(f"/classes/{name}/photos").json()["photos"]


def test_class_names_are_unique_ignoring_case_and_long_ones_are_refused_with_the_limit(client):
    assert client.post("/classes", json={"name": "ants"}).status_code == 201
    r = client.post("/classes", json={"name": "Ants"})
    assert r.status_code == 409 and "'ants' exists already" in r.json()["error"]
    long = "a" * 70
    r = client.post("/classes", json={"name": long})
    assert r.status_code == 400 and r.json()["error"] == "class name too long: 70 characters, the limit is 64"
    assert client.post("/classes", json={"name": "b" * 64}).status_code == 201  # at the limit, kept whole
    assert [c["name"] for c in client.get("/classes").json()["classes"]] == ["ants", "b" * 64]
    assert photos_of(client, "ANTS") == []  # a class is found whatever the case in the address


def test_photos_are_listed_shown_moved_deleted_and_undone(client):
    circles = add_photos(client, "circles", "circles", 3)
    add_photos(client, "squares", "squares", 2, seed=10)
    later = add_photos(client, "circles", "circles", 1, seed=20)
    assert sorted(photos_of(client, "circles")[:3]) == sorted(circles) and photos_of(client, "circles")[3:] == later
    client.delete(f"/classes/circles/photos/{later[0]}")
    r = client.get(f"/photos/{circles[0]}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == image_bytes("circles", seed=0, size=64)

    r = client.post(f"/classes/circles/photos/{circles[0]}/move", json={"to": "Squares"})
    assert r.json() == {"photo": circles[0], "class": "squares"}
    assert circles[0] in photos_of(client, "squares") and circles[0] not in photos_of(client, "circles")
    r = client.post(f"/classes/circles/photos/{circles[1]}/move", json={"to": "nowhere"})
    assert r.status_code == 404 and "no class named 'nowhere'" in r.json()["error"]

    r = client.delete(f"/classes/circles/photos/{circles[1]}")
    assert r.status_code == 200 and r.json()["photo"] == circles[1]
    assert photos_of(client, "circles") == [circles[2]]
    assert client.get(f"/photos/{circles[1]}").status_code == 404
    assert client.post(f"/undo/{r.json()['undo']}").json()["restored"] is True
    assert sorted(photos_of(client, "circles")) == sorted(circles[1:])
    assert client.post(f"/undo/{r.json()['undo']}").status_code == 404  # once only


def test_the_time_estimates_say_what_the_accurate_run_will_do_on_these_photos(client):
    add_photos(client, "circles", "circles", 6)
    add_photos(client, "squares", "squares", 6, seed=10)
    estimates = client.get("/classes").json()["estimates"]
    assert 0 < estimates["fast"]["seconds"] <= estimates["accurate"]["seconds"]
    assert "2 validation photos are too few" in estimates["accurate"]["plan"]  # not a fine-tuning budget's worth


def test_deleting_a_class_keeps_it_in_the_trash_until_undone(client, workspace):
    photos = add_photos(client, "bees", "stripes", 4)
    r = client.delete("/classes/bees")
    assert r.status_code == 200 and r.json()["class"] == "bees"
    assert client.get("/classes").json()["classes"] == []
    assert len(list((workspace / "trash").rglob("*.png"))) == 4  # nothing is gone yet
    client.post(f"/undo/{r.json()['undo']}")
    assert client.get("/classes").json()["classes"] == [{"name": "bees", "images": 4}]
    assert sorted(photos_of(client, "bees")) == sorted(photos)


def test_a_photo_the_served_model_puts_in_another_class_is_questioned(client):
    add_photos(client, "stripes", "stripes", 2)  # the served model was trained on circles, squares, stripes
    r = client.post("/classes/stripes/images", files=upload(("ant.png", image_bytes("circles", seed=3))))
    doubt = r.json()["doubts"]
    assert len(doubt) == 1 and doubt[0].startswith("ant.png looks like 'circles' (")
    assert r.json()["images"] == 3  # added all the same: the person decides
    client.post("/classes", json={"name": "other"})  # a class the model does not know: no opinion
    r = client.post("/classes/other/images", files=upload(("ant2.png", image_bytes("circles", seed=4))))
    assert r.json()["doubts"] == []


def test_the_same_photo_in_another_class_is_refused_naming_that_class(client):
    add_photos(client, "ants", "circles", 1)
    client.post("/classes", json={"name": "bees"})
    r = client.post("/classes/bees/images", files=upload(("copy.png", image_bytes("circles", seed=0, size=64))))
    assert r.status_code == 422 and r.json()["error"] == "copy.png: the same photo is already in class 'ants'"


def test_a_photo_that_cannot_be_written_takes_no_room_in_the_workspace(classifier, workspace, monkeypatch):
    ws = Workspace(workspace, ServeConfig())
    try:
        folder, data = ws.data / ws.create("circles"), image_bytes("circles", size=64)

        def full_disk(path, data):
            raise OSError(errno.ENOSPC, "No space left on device")
        with monkeypatch.context() as m:
            m.setattr("retrain.workspace.atomic_write_bytes", full_disk)
            with pytest.raises(OSError):
                ws.add(folder, "a.png", data, classifier.prep)
        assert ws.used_bytes == 0 and not ws.writing
        assert ws.add(folder, "a.png", data, classifier.prep)["status"] == "added"
        assert ws.used_bytes == len(data)
    finally:
        ws.close()


@pytest.mark.parametrize("path", ["/photos/..%2F..%2Fetc%2Fpasswd", "/photos/" + "A" * 32 + ".png",
                                  "/photos/" + "a" * 32 + ".exe", "/classes/ants/photos/x.png",
                                  "/models/..%2Fdata/report.html", "/models/ABCDEF123456/mistakes",
                                  "/models/0123456789ab/findings", "/models/0123456789ab/model.zip"])
def test_names_from_requests_never_become_paths(client, path):
    client.post("/classes", json={"name": "ants"})
    method = "delete" if path.startswith("/classes") else "get"
    assert getattr(client, method)(path).status_code == 404


def test_undo_tokens_are_checked(client):
    for token in ("../../data", "0123456789ab", "x"):
        assert client.post(f"/undo/{token}").status_code == 404


@pytest.mark.parametrize("method, path, body", [
    ("DELETE", "/classes/ants", None), ("POST", "/undo/0123456789ab", None), ("PUT", "/model", {"model": "startup"}),
    ("POST", "/classes/ants/photos/x/move", {"to": "bees"}), ("DELETE", "/jobs/x", None),
    ("POST", "/jobs", {"quality": "fast"})])
def test_cross_origin_writes_to_new_routes_are_refused(client, method, path, body):
    client.post("/classes", json={"name": "ants"})
    r = client.request(method, path, json=body, headers=ATTACKER)
    assert r.status_code == 403 and "cross-origin" in r.json()["error"]
    assert client.get("/classes").json()["classes"] == [{"name": "ants", "images": 0}]


def keep_model(client, model_dir, model_id: str = "0123456789ab") -> str:
    """Keep a copy of `model_dir` as if a training run had made it (the store's own path)."""
    copy = client.app.state.serve.workspace.root / "jobs" / f"copy-{model_id}"
    shutil.copytree(model_dir, copy)
    client.app.state.serve.models.add(model_id, copy)
    return model_id


def test_models_switch_without_a_restart_and_show_their_report(client, model_dir, classifier):
    model = keep_model(client, model_dir)
    listing = client.get("/models").json()
    assert listing["active"] == model and [m["id"] for m in listing["models"]] == [model, "startup"]
    assert listing["models"][0]["per_class"]["circles"]["support"] > 0
    assert listing["models"][1]["name"] == model_dir.name  # the model the server started with, by its folder
    r = client.put("/model", json={"model": "startup"})
    assert r.status_code == 200 and r.json()["active"] == "startup"
    assert client.get("/labels").json()["model"] == "startup"
    assert client.put("/model", json={"model": "feedfeedfeed"}).status_code == 404
    r = client.get(f"/models/{model}/report.html")
    assert r.status_code == 200 and "Confusion matrix" in r.text
    assert "default-src 'none'" in r.headers["content-security-policy"]  # its inline styles, never scripts
    with zipfile.ZipFile(io.BytesIO(client.get(f"/models/{model}/model.zip").content)) as z:
        assert "report.html" in z.namelist()
    assert client.get(f"/models/{model}/findings").json()["notes"] == ["doctor's checks did not run for this model"]


def test_a_models_test_accuracy_comes_with_the_evidence_its_metrics_recorded(client, model_dir, untested_model_dir):
    tested = keep_model(client, model_dir)
    untested = keep_model(client, untested_model_dir, "0123456789ac")
    listed = {m["id"]: m for m in client.get("/models").json()["models"]}
    recorded = json.loads((model_dir / "metrics.json").read_text())["test_evidence"]
    n, accuracy = recorded["n"], recorded["accuracy"]
    assert 0 < n < 10 and not recorded["measurable"]  # two test photos a class
    assert listed[tested]["test_evidence"] == recorded  # metrics.json's record, not a second computation
    assert listed[tested]["test_accuracy"] == accuracy  # kept for older clients
    assert listed[tested]["test_accuracy_text"].startswith(
        f"not measurable on {n} test photos ({round(accuracy * n)}/{n} right; 95% CI ")
    evidence = listed[untested]["test_evidence"]
    assert [evidence[k] for k in ("accuracy", "n", "interval", "measurable")] == [None, 0, None, False]
    assert listed[untested]["test_accuracy"] is None
    assert listed[untested]["test_accuracy_text"] == "not measured: no test photos"
    assert client.get(f"/models/{untested}/mistakes").json() == {"mistakes": []}  # the page says why: no test photos


def test_a_figure_the_record_calls_unmeasurable_never_reads_as_a_measurement():
    enough = Evidence(accuracy=0.9, n=40, interval=[0.77, 0.96], measurable=True)
    assert evidence_text(enough) == "90.0% (N=40, 95% CI 76-97%)"  # the CLI's words (describe_accuracy)
    few_copies = Evidence(accuracy=0.9, n=40, interval=[0.77, 0.96], measurable=True, copies_of_training=2)
    assert evidence_text(few_copies).endswith(", inflated: 2 of them are copies of photos the model trained on")
    doubtful = Evidence(accuracy=0.9, n=40, interval=[0.77, 0.96], measurable=False, copies_of_training=35)
    assert evidence_text(doubtful) == ("not measurable on 40 test photos, 5 of them not trained on (36/40 right; 95% "
                                       "CI 76-97%)")  # said once: no "inflated" suffix repeating the copies


def test_one_server_per_workspace_and_a_stopped_one_leaves_no_run_behind(classifier, workspace):
    (workspace / "jobs" / "0123456789ab" / "data").mkdir(parents=True)  # as a server killed mid-run leaves it
    with open_client(classifier, workspace):
        assert not list((workspace / "jobs").iterdir())
        with pytest.raises(UserError, match="in use by another `retrain serve`"):
            with open_client(classifier, workspace):
                pass
    with open_client(classifier, workspace) as c:  # free again once the first has stopped
        assert c.get("/healthz").status_code == 200


def test_everything_is_still_there_after_a_restart(classifier, model_dir, workspace):
    with open_client(classifier, workspace) as c:
        photos = add_photos(c, "circles", "circles", 2)
        add_photos(c, "Stripes", "stripes", 1, seed=5)
        token = c.delete(f"/classes/circles/photos/{photos[0]}").json()["undo"]
        model = keep_model(c, model_dir)
    with TestClient(create_app(None, ServeConfig(workspace=str(workspace))), base_url=LOCAL) as c:
        assert c.get("/classes").json()["classes"] == [{"name": "circles", "images": 1}, {"name": "Stripes", "images": 1}]
        assert c.get("/labels").json()["model"] == model  # the model served last, with no model named
        c.post(f"/undo/{token}")  # and a deletion from before the restart can still be undone
        assert sorted(photos_of(c, "circles")) == sorted(photos)
    assert json.loads((workspace / "models" / "active.json").read_text()) == {"model": model}


def test_a_model_left_half_kept_by_a_killed_server_is_never_listed_broken(classifier, model_dir, workspace):
    # What an auditor met: killed while keeping a model, the server listed it after a restart and its download
    # answered 500 (the folder had moved in before its zip was written).
    models = workspace / "models"
    with open_client(classifier, workspace) as c:
        keep_model(c, model_dir, "aaaaaaaaaaaa")
    half = models / "bbbbbbbbbbbb"
    shutil.copytree(model_dir, half)  # moved in, zip not yet written: as an older retrain left it
    (half / ".model.zip").write_bytes(b"PK")
    partial = models / "cccccccccccc"
    partial.mkdir()
    shutil.copy(model_dir / "model.onnx", partial / "model.onnx")  # not a whole model: never listed
    with open_client(classifier, workspace) as c:
        listed = [m["id"] for m in c.get("/models").json()["models"]]
        assert "bbbbbbbbbbbb" in listed and "cccccccccccc" not in listed
        r = c.get("/models/bbbbbbbbbbbb/model.zip")  # zipped again at start-up, whole
        assert r.status_code == 200
        with zipfile.ZipFile(io.BytesIO(r.content)) as z:
            assert sorted(z.namelist()) == ["labels.txt", "metrics.json", "model.onnx", "report.html"]
        assert c.get("/models/cccccccccccc/model.zip").status_code == 404


def test_an_undo_never_puts_a_photo_in_two_classes_or_makes_a_class_past_the_limit(classifier, workspace):
    with open_client(classifier, workspace) as c:
        [photo] = add_photos(c, "forest", "circles", 1)
        token = c.delete(f"/classes/forest/photos/{photo}").json()["undo"]
        c.post("/classes", json={"name": "café"})
        r = c.post("/classes/café/images", files=upload(("again.png", image_bytes("circles", seed=0, size=64))))
        assert r.json()["added"] == [photo]  # the same bytes, now in another class
        r = c.post(f"/undo/{token}")
        assert r.status_code == 409 and "now in 'café'" in r.json()["error"]
        assert photos_of(c, "forest") == [] and photos_of(c, "café") == [photo]  # nothing moved
        c.delete(f"/classes/café/photos/{photo}")
        assert c.post(f"/undo/{token}").json()["restored"] and photos_of(c, "forest") == [photo]  # now it may
    config = ServeConfig(workspace=str(workspace), max_classes=2)
    with TestClient(create_app(classifier, config), base_url=LOCAL) as c:
        c.delete("/classes/café")
        token = c.delete("/classes/forest").json()["undo"]
        assert [c.post("/classes", json={"name": n}).status_code for n in "ab"] == [201, 201]
        r = c.post(f"/undo/{token}")
        assert r.status_code == 409 and "there are 2 already (the most)" in r.json()["error"]
        assert [x["name"] for x in c.get("/classes").json()["classes"]] == ["a", "b"]


def test_a_tiff_photo_is_shown_as_a_png_browsers_can_draw(client):
    from PIL import Image

    client.post("/classes", json={"name": "scans"})
    tiff = io.BytesIO()
    Image.open(io.BytesIO(image_bytes("circles", size=64))).save(tiff, format="TIFF")
    [photo] = client.post("/classes/scans/images", files=upload(("scan.tif", tiff.getvalue()))).json()["added"]
    assert photo.endswith(".tif")  # stored as sent
    r = client.get(f"/photos/{photo}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    [png] = client.post("/classes/scans/images", files=upload(("c.png", image_bytes("stripes", size=64)))).json()["added"]
    assert client.get(f"/photos/{png}").content == (client.app.state.serve.workspace.find_photo(png)).read_bytes()


def test_a_field_a_route_does_not_know_is_refused_not_dropped(client):
    for method, path, body in (("post", "/jobs", {"quality": "fast", "time_budget": 1}),
                               ("post", "/classes", {"name": "x9", "color": "red"}),
                               ("put", "/model", {"model": "startup", "now": True})):
        r = getattr(client, method)(path, json=body)
        extra = next(k for k in body if k not in ("quality", "name", "model"))
        assert r.status_code == 422 and f"body.{extra}: Extra inputs are not permitted" in r.json()["error"], r.text
    assert client.get("/classes").json()["classes"] == []  # nothing was made


def test_training_with_an_empty_class_names_it(client):
    add_photos(client, "ants", "circles", 3)
    r = client.post("/jobs", json={"quality": "fast"})
    assert r.status_code == 400 and r.json()["error"].startswith("add photos to at least two classes first")
    add_photos(client, "bees", "squares", 3)
    client.post("/classes", json={"name": "wasps"})
    r = client.post("/jobs", json={"quality": "fast"})
    assert r.status_code == 400
    assert r.json()["error"] == "every class needs photos: none yet in wasps (add some, or delete it)"
