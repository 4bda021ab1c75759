"""Tests for retrain.prediction: streaming predictions to CSV / JSON Lines (predict_to_file)."""
from __future__ import annotations

import csv
import importlib
import json
import os
from pathlib import Path

import pytest

import retrain
from retrain.api import TrainConfig
from retrain.errors import UserError
from retrain.head import HeadConfig
from retrain.prediction import load, predict_to_file

predict_mod = importlib.import_module("retrain.prediction")


@pytest.fixture(scope="module")
def model_dir(synthetic, tiny, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    cfg = TrainConfig(backbone=str(tiny), cache_dir=str(cache), quiet=True, head=HeadConfig(steps=100))
    out = tmp_path_factory.mktemp("model")
    retrain.train(synthetic, cfg).save(out, report=False)
    return out


@pytest.fixture
def folder_with_bad_files(synthetic, tmp_path) -> Path:
    """Nine good images and two unreadable ones, in a nested folder."""
    root = tmp_path / "to_predict"
    (root / "sub").mkdir(parents=True)
    for i, src in enumerate(sorted((synthetic / "square").glob("*.png"))[:9]):
        (root / ("sub" if i % 2 else ".") / f"good_{i}.png").write_bytes(src.read_bytes())
    (root / "broken.png").write_text("not, really \"an\" image")
    (root / "sub" / "empty.jpg").write_bytes(b"")
    return root


@pytest.mark.parametrize("name", ["preds.csv", "preds.jsonl"])
def test_predict_to_file_writes_one_valid_row_per_image(model_dir, folder_with_bad_files, tmp_path, monkeypatch,
                                                       name):
    monkeypatch.setattr(predict_mod, "STREAM_CHUNK", 4)  # several chunks
    clf = load(model_dir)
    out = tmp_path / "out" / name
    summary = predict_to_file(clf, [folder_with_bad_files], out, top_k=2)
    expected = [p.to_dict() for p in retrain.predict(clf, [folder_with_bad_files], top_k=2)]
    assert summary.rows == len(expected) == 11 and summary.failures == 2
    assert not out.with_name(name + ".partial").exists()
    if name.endswith(".jsonl"):
        rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
        assert rows == expected
    else:
        with open(out, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["path", "unknown", "error", "label_1", "score_1", "label_2", "score_2"]
        assert [r["path"] for r in rows] == [e["path"] for e in expected]
        for row, exp in zip(rows, expected):
            if "error" in exp:
                assert row["error"] == exp["error"] and row["label_1"] == row["unknown"] == ""
            else:
                assert row["error"] == "" and row["unknown"] == str(exp["unknown"]).lower()
                assert [row["label_1"], row["label_2"]] == [p["label"] for p in exp["predictions"]]
                assert abs(float(row["score_1"]) - exp["predictions"][0]["score"]) < 2e-6
    bad = {Path(e["path"]).name for e in expected if "error" in e}
    assert bad == {"broken.png", "empty.jpg"}


def test_interrupted_predict_writes_only_whole_rows_and_leaves_nothing(model_dir, folder_with_bad_files, tmp_path,
                                                                         monkeypatch):
    clf = load(model_dir)
    real = clf.predict_paths
    seen = []

    def dies_after_five(paths, *a, **k):
        for i, pred in enumerate(real(paths, *a, **k)):
            if i == 5:  # what a kill at this moment would leave: the temporary file beside FILE
                [partial] = tmp_path.glob("preds.jsonl.*.partial")
                seen.append(partial.read_text(encoding="utf-8"))
                raise KeyboardInterrupt
            yield pred
    monkeypatch.setattr(clf, "predict_paths", dies_after_five)
    out = tmp_path / "preds.jsonl"
    with pytest.raises(KeyboardInterrupt):
        predict_to_file(clf, [folder_with_bad_files], out)
    assert seen[0].endswith("\n") and len([json.loads(line) for line in seen[0].splitlines()]) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["to_predict"]  # neither FILE nor the temporary file


def test_predict_to_file_refuses_unknown_formats_missing_inputs_and_empty_folders(model_dir, tmp_path):
    with pytest.raises(UserError, match=r"\.csv or \.jsonl"):
        predict_to_file(model_dir, [tmp_path], tmp_path / "out.txt")
    with pytest.raises(UserError, match="image not found"):
        predict_to_file(model_dir, [tmp_path / "nope"], tmp_path / "out.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        predict_to_file(model_dir, [tmp_path / "empty"], tmp_path / "out.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing written, nothing left over


def test_cli_predict_output_flag(model_dir, folder_with_bad_files, tmp_path, capsys):
    from retrain.cli import retrain_main as main

    out = tmp_path / "p.csv"
    rc = main(["predict", str(model_dir), str(folder_with_bad_files), "--output", str(out), "--top-k", "1"])
    assert rc == 1  # unreadable files, as without --output
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 11 and sum(bool(r["error"]) for r in rows) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # results go to the file, not stdout
    assert "11" in captured.err and str(out) in captured.err


@pytest.mark.parametrize("name", ["preds.csv", "preds.jsonl"])
def test_an_existing_file_is_replaced_only_if_it_holds_earlier_predictions(model_dir, folder_with_bad_files, tmp_path,
                                                                          name, capsys):
    from retrain.cli import retrain_main as main

    out = tmp_path / name
    out.write_text("precious,notes\n1,2\n")  # what an auditor lost: a CSV of the user's own
    argv = ["predict", str(model_dir), str(folder_with_bad_files), "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already exists and is not a predictions file retrain wrote" in err and "--overwrite" in err
    assert out.read_text() == "precious,notes\n1,2\n" and not out.with_name(name + ".partial").exists()
    assert main(argv + ["--overwrite"]) == 1  # asked for: replaced (1: the two unreadable files)
    first = out.read_text()
    assert first.startswith("path,unknown,error,") or json.loads(first.splitlines()[0])["path"]
    assert main(argv) == 1 and out.read_text() == first  # an earlier predictions file: replaced without asking
    capsys.readouterr()
    assert main(["predict", str(model_dir), str(folder_with_bad_files), "--overwrite"]) == 2
    assert "--overwrite: only with --output" in capsys.readouterr().err


def test_an_output_that_is_a_pipe_is_refused_without_reading_it(model_dir, folder_with_bad_files, tmp_path, capsys):
    from retrain.cli import retrain_main as main

    pipe = tmp_path / "out.csv"
    os.mkfifo(pipe)  # reading it to see whether it holds predictions would block forever
    assert main(["predict", str(model_dir), str(folder_with_bad_files), "--output", str(pipe), "--overwrite"]) == 2
    assert "out.csv is a named pipe, not a regular file" in capsys.readouterr().err
    (tmp_path / "photo.jpg").write_bytes(b"a file")  # in the place of a folder
    assert main(["predict", str(model_dir), str(folder_with_bad_files), "--output", str(tmp_path / "photo.jpg" / "p.csv")]) == 2
    assert f"{tmp_path / 'photo.jpg'} is a file, not a folder" in capsys.readouterr().err


def a_photo(synthetic) -> Path:
    return sorted((synthetic / "square").glob("*.png"))[0]


@pytest.fixture
def odd_folder(synthetic, tmp_path) -> Path:
    """A folder holding one photo whose file name is not UTF-8 (byte 0xff), as `cp a.jpg $'x\\xff.png'` makes."""
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / os.fsdecode(b"x\xff.png")).write_bytes(a_photo(synthetic).read_bytes())
    return folder


@pytest.mark.parametrize("name", ["p.csv", "p.jsonl"])
def test_a_file_name_that_is_not_utf8_gets_its_row_in_the_predictions_file(model_dir, odd_folder, tmp_path, name):
    from retrain.cli import retrain_main as main

    out = tmp_path / name
    assert main(["predict", str(model_dir), str(odd_folder), "--output", str(out), "--top-k", "1"]) == 0
    odd = os.fsencode(odd_folder) + b"/x\xff.png"
    data = out.read_bytes()
    if name.endswith(".csv"):  # the name's own bytes, as ls and cut see them
        assert data.splitlines()[1].startswith(odd + b",")
    else:  # valid UTF-8 and valid JSON, with the name escaped (\udcff) and given back by json.loads
        row = json.loads(data.decode("utf-8"))
        assert b"\\udcff" in data and os.fsencode(row["path"]) == odd and row["predictions"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd", name]  # no partial file left behind


@pytest.mark.parametrize("flags", [[], ["--json"]])
def test_a_file_name_that_is_not_utf8_is_printed_without_a_crash(model_dir, odd_folder, capsysbinary, flags):
    """capsysbinary's stdout is strict UTF-8, as a terminal's is under PYTHONIOENCODING=utf-8."""
    from retrain.cli import retrain_main as main

    assert main(["predict", str(model_dir), str(odd_folder), "--top-k", "1", *flags]) == 0
    first = capsysbinary.readouterr().out.splitlines()[0]
    odd = os.fsencode(odd_folder) + b"/x\xff.png"
    if flags:
        assert os.fsencode(json.loads(first.decode("utf-8"))["path"]) == odd
    else:
        assert first.split(b"  (unknown")[0] == odd


def labels_file(tmp_path: Path, labels: list[str]) -> Path:
    path = tmp_path / "labels.txt"
    path.write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
    return path


@pytest.mark.parametrize("change, message", [
    (lambda labels: [], "has no labels (it is empty or holds only blank lines)"),
    (lambda labels: [" ", "", "\t"], "has no labels (it is empty or holds only blank lines)"),
    (lambda labels: [labels[1]] + labels[1:], "more than once"),
    (lambda labels: labels[::-1], "lists the model's classes in another order and would mislabel every prediction"),
])
def test_a_labels_file_that_cannot_name_the_classes_is_refused(model_dir, synthetic, tmp_path, capsys, change,
                                                               message):
    from retrain.cli import label_image_main, retrain_main

    stored = load(model_dir).labels
    labels, photo = labels_file(tmp_path, change(stored)), a_photo(synthetic)
    assert retrain_main(["predict", str(model_dir), str(photo), "--labels", str(labels)]) == 2
    assert label_image_main([f"--graph={model_dir}", f"--labels={labels}", f"--image={photo}"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(message in line for line in err), err
    assert "drop --labels (the model carries its labels)" in err[0]


def test_a_labels_file_in_the_models_order_or_renaming_its_classes_is_used(model_dir, synthetic, tmp_path):
    stored = load(model_dir).labels
    assert load(model_dir, labels_file(tmp_path, stored)).labels == stored
    renamed = [f"class {label}" for label in stored]  # the override's purpose: other names, same order
    assert load(model_dir, labels_file(tmp_path, renamed)).labels == renamed


def test_json_with_output_is_refused(model_dir, synthetic, tmp_path, capsys):
    from retrain.cli import retrain_main as main

    out = tmp_path / "p.csv"
    assert main(["predict", str(model_dir), str(a_photo(synthetic)), "--json", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--json: not with --output" in err and not out.exists()


def test_a_file_or_link_named_like_the_partial_file_is_never_written(model_dir, folder_with_bad_files, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "p.csv.partial").write_text("my notes")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out / "q.csv.partial").symlink_to(victim)
    for name in ("p.csv", "q.csv"):
        assert predict_to_file(model_dir, [folder_with_bad_files], out / name).rows == 11
    assert (out / "p.csv.partial").read_text() == "my notes" and victim.read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["p.csv", "p.csv.partial", "q.csv", "q.csv.partial"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert (out / "p.csv").stat().st_mode & 0o777 == 0o666 & ~umask  # as a plain open() makes it, not 0600


def test_a_named_pipe_among_the_images_is_skipped_with_its_reason_said_once(model_dir, synthetic, tmp_path, capsys):
    from retrain.cli import retrain_main as main

    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    assert main(["predict", str(model_dir), str(pipe), str(a_photo(synthetic))]) == 1
    err = capsys.readouterr().err
    assert f"{pipe}: skipped: a named pipe, not a regular file\n" in err and "skipped: skipped" not in err


def test_a_folder_that_cannot_be_listed_gets_a_row_saying_so(head_model, shapes_data, tmp_path, monkeypatch, capsys):
    import errno
    import shutil

    from retrain.cli import retrain_main

    photos = tmp_path / "photos"
    (photos / "locked").mkdir(parents=True)
    for src in sorted((shapes_data / "circles").iterdir())[:2]:
        shutil.copy(src, photos / src.name)
    real = os.scandir

    def scandir(path="."):  # as for a folder without read permission (chmod cannot stop root)
        if os.fspath(path) == str(photos / "locked"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    summary = predict_to_file(head_model.folder, [photos], tmp_path / "out.csv")
    rows = list(csv.DictReader(open(tmp_path / "out.csv", encoding="utf-8")))
    assert summary.rows == 3 and summary.failures == 1
    assert rows[-1]["path"] == str(photos / "locked") and rows[-1]["error"] == "cannot list this folder: Permission denied"
    api = retrain.predict(head_model.folder, [photos])  # the Python API says so too
    assert len(api) == 3 and api[-1].path == str(photos / "locked") and api[-1].error == rows[-1]["error"]
    assert retrain_main(["predict", str(head_model.folder), str(photos / "locked")]) == 1
    assert f"{photos / 'locked'}: skipped: cannot list this folder: Permission denied" in capsys.readouterr().err


def test_a_named_file_that_cannot_be_looked_at_gets_its_row_and_the_others_are_classified(head_model, shapes_data,
                                                                                       tmp_path):
    import shutil

    good = tmp_path / "good.jpg"
    shutil.copy(next((shapes_data / "circles").iterdir()), good)
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")  # stat fails (ELOOP), as in a locked folder
    preds = retrain.predict(head_model.folder, [good, tmp_path / "loop.jpg"])
    assert preds[0].error is None and preds[0].top
    assert preds[1].path == str(tmp_path / "loop.jpg") and "symbolic links" in preds[1].error
    with pytest.raises(UserError, match="image not found"):
        retrain.predict(head_model.folder, [good, tmp_path / "missing.jpg"])
