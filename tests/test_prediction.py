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


def test_interrupted_predict_leaves_only_whole_rows_in_the_partial_file(model_dir, folder_with_bad_files, tmp_path,
                                                                         monkeypatch):
    clf = load(model_dir)
    real = clf.predict_paths

    def dies_after_five(paths, *a, **k):
        for i, pred in enumerate(real(paths, *a, **k)):
            if i == 5:
                raise KeyboardInterrupt
            yield pred
    monkeypatch.setattr(clf, "predict_paths", dies_after_five)
    out = tmp_path / "preds.jsonl"
    with pytest.raises(KeyboardInterrupt):
        predict_to_file(clf, [folder_with_bad_files], out)
    assert not out.exists()
    text = (tmp_path / "preds.jsonl.partial").read_text(encoding="utf-8")
    assert text.endswith("\n")
    assert len([json.loads(line) for line in text.splitlines()]) == 5


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
    assert "is not a regular file (a pipe or a device)" in capsys.readouterr().err
