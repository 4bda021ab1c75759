"""Hostile input, round two (issue 16): each case asserts its exact outcome.

skipped-with-reason (special files), refused-with-message (numbers, outputs, encodings, metadata,
ports), or recovered (damaged cache, divergence, a full disk, stalled or vanished HTTP clients).
Training runs use a tiny ONNX CNN backbone and a few small generated photos, so the module is quick.
"""
from __future__ import annotations

import errno
import http.client
import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import retrain
import retrain.pipeline as api_mod
import retrain.guards as guards
from retrain.api import TrainConfig
from retrain.cli import retrain_main
from retrain.config import FinetuneConfig
from retrain.connections import guarded_protocol
from retrain.decode import UnreadableImage, load_image
from retrain.errors import UserError
from retrain.graphs import extractor_path
from retrain.head import Diverged, HeadConfig, train_head
from retrain.outputs import MARKER
from retrain.prediction import load
from retrain.scan import scan_dataset
from retrain.serve import ServeConfig, create_app

from conftest import make_dataset
from test_serve import free_port, image_bytes


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile-cache")


@pytest.fixture
def photos(tmp_path) -> Path:
    return make_dataset(tmp_path / "photos", per_class=6, classes=("ants", "bees"))


@pytest.fixture(scope="module")
def model_dir(tiny, cache, tmp_path_factory) -> Path:
    data = make_dataset(tmp_path_factory.mktemp("data") / "photos", per_class=6, classes=("ants", "bees"))
    config = TrainConfig(backbone=str(tiny), cache_dir=str(cache), quiet=True, head=HeadConfig(steps=30))
    return retrain.train(data, config).save(tmp_path_factory.mktemp("model") / "model", report=False)


def train_args(tiny: Path, cache: Path) -> list[str]:
    return ["--backbone", str(tiny), "--cache_dir", str(cache), "--quiet", "--steps", "20"]


def run_cli(capsys, *args) -> tuple[int, str]:
    try:
        code = retrain_main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """Exit status 2, and stderr one line `retrain: error: ...` holding every needle, no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("retrain: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@contextmanager
def deadline(seconds: float):
    """Fail, instead of hanging the suite, if the body blocks (e.g. opening a named pipe)."""
    import signal

    def expired(*_):
        raise AssertionError(f"blocked for over {seconds} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def plant_special_files(folder: Path) -> dict[str, str]:
    """A named pipe, a link to /dev/zero and a socket, each named like a photo; name -> expected reason."""
    os.mkfifo(folder / "pipe.jpg")
    os.symlink("/dev/zero", folder / "zero.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock.png"))
    sock.close()  # the socket file stays
    return {"pipe.jpg": "skipped: a named pipe, not a regular file",
            "zero.jpg": "skipped: a character device, not a regular file",
            "sock.png": "skipped: a socket, not a regular file"}


# ---------------------------------------------------------------- 1. only regular files are read

def test_scan_skips_pipe_device_link_and_socket_with_reasons(photos):
    expected = plant_special_files(photos / "ants")
    with deadline(20):
        dataset = scan_dataset(photos, quiet=True)
    assert {p.name: why for p, why in dataset.skipped} == expected
    assert len(dataset.samples) == 12


def test_scan_skips_a_file_over_the_size_limit(photos, monkeypatch):
    monkeypatch.setattr(guards, "MAX_FILE_BYTES", 1000)
    (photos / "bees" / "huge.jpg").write_bytes(b"\xff\xd8\xff" + bytes(5000))
    dataset = scan_dataset(photos, quiet=True)
    reasons = dict((p.name, why) for p, why in dataset.skipped)
    assert reasons["huge.jpg"] == "skipped: file is 5,003 bytes, over the 1,000-byte limit for an image"
    assert "huge.jpg" not in {p.name for p in dataset.samples.paths}


@pytest.mark.parametrize("make, reason", [
    (lambda p: os.mkfifo(p), "skipped: a named pipe, not a regular file"),
    (lambda p: os.symlink("/dev/zero", p), "skipped: a character device, not a regular file"),
    (lambda p: os.symlink("/dev/null", p), "skipped: a character device, not a regular file"),
    (lambda p: p.mkdir(), "skipped: a folder, not a regular file"),
])
def test_decoder_refuses_special_files_without_blocking(tmp_path, make, reason):
    path = tmp_path / "x.jpg"
    make(path)
    with deadline(10), pytest.raises(UnreadableImage) as e:
        load_image(path, bench_prep())
    assert str(e.value) == reason


def bench_prep():
    from retrain.preprocess import Preprocessing
    return Preprocessing(size=32)


def test_train_cli_skips_special_files_and_lists_them(photos, tiny, cache, tmp_path, capsys):
    expected = plant_special_files(photos / "bees")
    with deadline(60):
        code, err = run_cli(capsys, "train", photos, "--output", tmp_path / "m", *train_args(tiny, cache))
    assert code == 0, err
    skipped = json.loads((tmp_path / "m" / "metrics.json").read_text())["skipped_files"]
    assert {Path(s["path"]).name: s["reason"] for s in skipped} == expected


def test_doctor_reports_special_files_and_finishes(photos, cache, capsys, tiny):
    expected = plant_special_files(photos / "ants")
    with deadline(60):
        code = retrain_main(["doctor", str(photos), "--json", "--quiet", "--cache_dir", str(cache),
                             "--backbone", str(tiny)])
    out, err = capsys.readouterr()
    assert code == 0, err
    unreadable = {Path(u["path"]).name: u["reason"] for u in json.loads(out)["unreadable"]}
    assert unreadable == expected


def test_predict_reports_special_files_per_row(model_dir, tmp_path, capsys):
    expected = plant_special_files(tmp_path)
    with deadline(30):
        code = retrain_main(["predict", str(model_dir), *(str(tmp_path / n) for n in expected), "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert code == 1
    assert {Path(r["path"]).name: r["error"] for r in rows} == expected


def test_a_labels_file_that_is_a_pipe_is_refused_not_waited_on(model_dir, tmp_path, capsys):
    os.mkfifo(tmp_path / "labels.txt")
    with deadline(10):
        code, err = run_cli(capsys, "predict", model_dir, tmp_path, "--labels", tmp_path / "labels.txt")
    assert_one_line_error(code, err, "cannot read labels file", "a named pipe, not a regular file")


# ---------------------------------------------------------------- 2. numbers, validated before any work

# Each flag with values it must refuse; the error must name the flag.
BAD_VALUES = {"--learning_rate": ["nan", "inf", "-0.1", "0"], "--weight_decay": ["nan", "-1"],
              "--how_many_training_steps": ["0"], "--train_batch_size": ["-3"], "--hidden_units": ["1000000000"],
              "--eval_step_interval": ["0"], "--validation_percentage": ["nan"], "--testing_percentage": ["100"],
              "--seed": ["-1"], "--workers": ["0"]}
BAD_NUMBERS = [([flag, value], flag) for flag, values in BAD_VALUES.items() for value in values] + [
    (["--validation_percentage", "60", "--testing_percentage", "40"], "leave images for training"),
    (["--input_std", "0", "--backbone", "x.onnx"], "--input_std"),
    (["--mode", "finetune", "--finetune_learning_rate", "nan"], "--finetune_learning_rate"),
    (["--mode", "finetune", "--epochs", "-2"], "--epochs"),
    (["--mode", "finetune", "--train_size", "100000"], "--train_size"),
    (["--mode", "auto", "--time_budget", "inf"], "--time_budget"),
]


@pytest.mark.parametrize("flags, named", BAD_NUMBERS, ids=[" ".join(f) for f, _ in BAD_NUMBERS])
def test_bad_numbers_are_one_line_errors_before_any_work(flags, named, tmp_path, capsys):
    # The image folder does not exist: the number must be refused before the scan would notice.
    code, err = run_cli(capsys, "train", tmp_path / "no-such-folder", "--output", tmp_path / "m", *flags)
    assert_one_line_error(code, err, named)
    assert not (tmp_path / "m").exists()


def test_config_dataclasses_validate_where_the_api_receives_them():
    with pytest.raises(UserError, match=r"HeadConfig.learning_rate"):
        HeadConfig(learning_rate=float("nan"))
    with pytest.raises(UserError, match=r"FinetuneConfig.batch_size"):
        FinetuneConfig(batch_size=-1)
    with pytest.raises(UserError, match=r"TrainConfig.validation_percentage"):
        TrainConfig(validation_percentage=float("inf"))
    with pytest.raises(UserError, match=r"unknown_threshold"):
        TrainConfig(unknown_threshold=1.5)
    # Objects and paths of the wrong kind: one line naming the field, not an AttributeError mid-run.
    for field, value in (("head", {"steps": 10}), ("finetune", None), ("backbone", 3), ("cache_dir", 5)):
        with pytest.raises(UserError, match=rf"TrainConfig.{field} must be"):
            TrainConfig(**{field: value})


def test_the_api_checks_its_arguments_and_settings_changed_after_the_config_was_made(photos, tmp_path):
    config = TrainConfig(mode="head", cache_dir=str(tmp_path / "cache"))
    config.head.steps = -5  # a plain dataclass: train() validates it again
    with pytest.raises(UserError, match=r"HeadConfig.steps"):
        retrain.train(photos, config)
    config = TrainConfig(mode="head", cache_dir=str(tmp_path / "cache"))
    config.mode = "fast"
    with pytest.raises(UserError, match=r"unknown mode 'fast'"):
        retrain.train(photos, config)
    with pytest.raises(UserError, match=r"config must be a TrainConfig"):
        retrain.train(photos, {"mode": "head"})
    with pytest.raises(UserError, match=r"image_dir must be a folder's path"):
        retrain.train(None, TrainConfig(mode="head"))
    # Names the exported models use inside: refused before any work (they failed the export at the end).
    for name in ("", "Placeholder", "unknown", "logits", "features", "image", "head_w1"):
        with pytest.raises(UserError, match=r"output_name"):
            retrain.train(photos, TrainConfig(mode="head", output_name=name, cache_dir=str(tmp_path / "cache")))
    assert not (tmp_path / "cache").exists()  # nothing was scanned or exported


def test_output_names_that_worked_still_work_and_an_onnx_backbones_own_names_are_refused(photos, tiny, cache,
                                                                                          tmp_path):
    import onnx

    config = TrainConfig(mode="head", backbone=str(tiny), cache_dir=str(cache), quiet=True, head=HeadConfig(steps=20))
    for name in ("final_result:0", "output/probs", "probs.1"):  # TensorFlow-style names label_image users give
        model = retrain.train(photos, replace(config, output_name=name))
        assert [o.name for o in model.model.graph.output][0] == name
    inside = next(n for node in onnx.load(str(tiny)).graph.node for n in node.output if n not in ("features",))
    with pytest.raises(UserError, match=r"output_name"):
        retrain.train(photos, replace(config, output_name=inside))


def test_predict_and_evaluate_check_their_arguments(model_dir, photos):
    one = next(p for p in sorted(Path(photos).rglob("*")) if p.is_file())
    assert [p.path for p in retrain.predict(model_dir, one)] == [str(one)]  # one path: a list of one
    assert [p.path for p in retrain.predict(model_dir, str(one))] == [str(one)]
    for kwargs, named in (({"top_k": "3"}, "top_k"), ({"top_k": 0}, "top_k"), ({"min_confidence": "0.5"},
                          "min_confidence"), ({"min_confidence": 5}, "min_confidence")):
        with pytest.raises(UserError, match=named):
            retrain.predict(model_dir, [one], **kwargs)
    for workers in (0, "2"):
        with pytest.raises(UserError, match=r"workers \(--workers\)"):
            retrain.evaluate(model_dir, photos, workers=workers)


def test_serve_config_refuses_settings_that_would_break_every_request():
    for field, value in (("max_queue", 0), ("max_upload_bytes", "32"), ("max_classes", 1),
                         ("header_timeout_s", 0), ("max_connections", -1)):
        with pytest.raises(UserError, match=rf"ServeConfig.{field}"):
            ServeConfig(**{field: value})
    config = ServeConfig()
    config.max_queue = 0  # changed after it was made: the app checks again
    with pytest.raises(UserError, match=r"ServeConfig.max_queue"):
        create_app(None, config)


def test_head_training_that_diverges_stops_and_says_so():
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 50, (200, 16)).astype(np.float32), rng.integers(0, 3, 200)
    with pytest.raises(Diverged, match=r"training diverged at step \d+: .* no model was written"):
        train_head(x, y, x[:20], y[:20], 3, HeadConfig(steps=200, learning_rate=10, weight_decay=10), log=lambda m: None)


def test_diverging_cli_run_writes_no_model(photos, tiny, cache, tmp_path, capsys):
    code, err = run_cli(capsys, "train", photos, "--output", tmp_path / "m", *train_args(tiny, cache),
                        "--learning_rate", "50", "--weight_decay", "10")
    assert_one_line_error(code, err, "training diverged", "no model was written")
    assert not (tmp_path / "m").exists()  # no model, not even an empty folder


NUMERIC_FLAGS = {  # flag -> the type argparse converts it to
    "--learning_rate": float, "--weight_decay": float, "--validation_percentage": float,
    "--testing_percentage": float, "--how_many_training_steps": int, "--train_batch_size": int,
    "--hidden_units": int, "--eval_step_interval": int, "--seed": int, "--workers": int,
    "--epochs": int, "--unfreeze": int, "--train_size": int, "--finetune_batch_size": int,
    "--finetune_learning_rate": float, "--time_budget": float,
}
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-320, 1e308]))
ints = st.one_of(st.integers(-10, 10), st.integers(-2 ** 70, 2 ** 70))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(sorted(NUMERIC_FLAGS)), st.one_of(floats, ints), min_size=1, max_size=3))
def test_fuzzed_numeric_flags_give_a_config_or_one_line_error(tmp_path, capsys, values):
    """Any numbers on the CLI: either refused in one line naming a flag, or valid all the way to the scan
    (the image folder is missing, so a run that gets past the numbers ends there). NaN, infinite or
    negative values (but --unfreeze -1) must always be refused."""
    given = {flag: (int(v) if math.isfinite(v) else 0) if NUMERIC_FLAGS[flag] is int and isinstance(v, float) else v
             for flag, v in values.items()}
    flags = ["--mode=auto"] + [f"{flag}={v!r}" for flag, v in given.items()]  # auto: every flag applies; '=': '-1'
    code, err = run_cli(capsys, "train", tmp_path / "no-such-folder", "--output", tmp_path / "m", *flags)
    line = assert_one_line_error(code, err)
    assert "image folder not found" in line or "must be" in line or "leave images for training" in line, line
    if [f for f, v in given.items() if not math.isfinite(v) or v < (-1 if f == "--unfreeze" else 0)]:
        assert "image folder not found" not in line and any(f in line for f in given), line


# ---------------------------------------------------------------- 3. outputs never destroy user files

def test_output_into_a_folder_of_user_files_is_refused_and_they_survive(photos, tiny, cache, tmp_path, capsys):
    mine = tmp_path / "userdir"
    mine.mkdir()
    (mine / "report.html").write_text("my report")
    (mine / "labels.txt").write_text("my labels")
    code, err = run_cli(capsys, "train", photos, "--output", mine, *train_args(tiny, cache))
    assert_one_line_error(code, err, "already holds files retrain did not write", "labels.txt, report.html",
                          "--overwrite")
    assert (mine / "report.html").read_text() == "my report" and (mine / "labels.txt").read_text() == "my labels"


def test_overwrite_writes_into_a_user_folder_and_keeps_unrelated_files(photos, tiny, cache, tmp_path, capsys):
    mine = tmp_path / "userdir"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, err = run_cli(capsys, "train", photos, "--output", mine, "--overwrite", *train_args(tiny, cache))
    assert code == 0, err
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "model.onnx").is_file()
    assert "model.onnx" in json.loads((mine / MARKER).read_text())["files"]


def test_rerun_into_retrains_own_folder_needs_no_overwrite(photos, tiny, cache, tmp_path, capsys):
    for _ in range(2):
        code, err = run_cli(capsys, "train", photos, "--output", tmp_path / "m", *train_args(tiny, cache))
        assert code == 0, err
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".retrain-staging")]


def test_legacy_model_folder_without_marker_counts_as_retrains_own(model_dir, photos, tiny, cache, tmp_path, capsys):
    legacy = tmp_path / "old"
    legacy.mkdir()
    (legacy / "metrics.json").write_text(json.dumps({"provenance": {"created": "2025"}}))
    code, err = run_cli(capsys, "train", photos, "--output", legacy, *train_args(tiny, cache))
    assert code == 0, err


@pytest.mark.parametrize("where", ["ants", "ants/deeper", "."])
def test_output_inside_the_image_folder_is_refused(photos, where, tiny, cache, capsys):
    code, err = run_cli(capsys, "train", photos, "--output", photos / where, *train_args(tiny, cache))
    assert_one_line_error(code, err, "is inside the image folder")
    assert sorted(p.suffix for p in (photos / "ants").iterdir()) == [".jpg"] * 6


def test_output_naming_an_existing_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, err = run_cli(capsys, "train", tmp_path / "no-such-folder", "--output", tmp_path / "file")
    assert_one_line_error(code, err, "is an existing file")


@pytest.mark.parametrize("flag, example", [("--output_graph", "output_graph.onnx"),
                                           ("--output_labels", "output_labels.txt")])
def test_classic_output_naming_a_folder_is_refused_before_training(flag, example, tmp_path, capsys):
    code, err = run_cli(capsys, "--image_dir", tmp_path / "no-such-folder", flag, tmp_path)
    assert_one_line_error(code, err, f"{flag} {tmp_path} is a folder: give a file name, e.g. {tmp_path / example}")


def test_predict_output_naming_a_folder_is_refused_before_predicting(model_dir, photos, tmp_path, capsys):
    (tmp_path / "out.csv").mkdir()
    code, err = run_cli(capsys, "predict", model_dir, photos, "--output", tmp_path / "out.csv")
    assert_one_line_error(code, err, "is a folder")


def test_full_disk_while_saving_leaves_the_previous_model_whole(photos, tiny, cache, tmp_path, monkeypatch, capsys):
    out = tmp_path / "m"
    assert run_cli(capsys, "train", photos, "--output", out, *train_args(tiny, cache))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = api_mod.atomic_write_json

    def disk_full(path, obj):  # model.onnx and labels.txt were staged; metrics.json hits a full disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(api_mod, "atomic_write_json", disk_full)
    code, err = run_cli(capsys, "train", photos, "--output", out, *train_args(tiny, cache), "--seed", "3")
    assert_one_line_error(code, err, f"cannot write the model to {out}", "No space left on device",
                          "previous contents are unchanged")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setattr(api_mod, "atomic_write_json", real)


@pytest.mark.parametrize("code_", [errno.EROFS, errno.EACCES])
def test_unwritable_output_is_found_before_training(code_, tmp_path, monkeypatch, capsys):
    def refused(*a, **k):
        raise OSError(code_, os.strerror(code_))
    monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    code, err = run_cli(capsys, "train", tmp_path / "no-such-folder", "--output", tmp_path / "m")
    assert_one_line_error(code, err, f"cannot write to {tmp_path / 'm'}", os.strerror(code_))


def test_classic_save_on_a_read_only_disk_is_one_line(photos, tiny, cache, tmp_path, monkeypatch, capsys):
    def read_only(path, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    monkeypatch.setattr(api_mod, "atomic_write_bytes", read_only)
    code, err = run_cli(capsys, "--image_dir", photos, "--output_graph", tmp_path / "g.onnx",
                        "--output_labels", tmp_path / "l.txt", *train_args(tiny, cache))
    assert_one_line_error(code, err, f"cannot write {tmp_path / 'g.onnx'}", "Read-only file system")


# ---------------------------------------------------------------- 4. user errors: one line, exit 2

def test_class_folder_name_that_is_not_utf8_is_a_one_line_error(photos, tiny, cache, tmp_path, capsys):
    os.rename(photos / "bees", os.path.join(os.fsencode(photos), b"b\xe9es"))
    code, err = run_cli(capsys, "train", photos, "--output", tmp_path / "m", *train_args(tiny, cache))
    assert_one_line_error(code, err, "b'b\\xe9es'", "is not valid UTF-8: rename it")


@pytest.mark.subprocess
def test_file_name_that_is_not_utf8_trains_and_metrics_stay_valid_json(photos, tiny, cache, tmp_path):
    odd = os.path.join(os.fsencode(photos / "ants"), b"\xff\xfe.jpg")
    with open(odd, "wb") as f:
        f.write(b"not an image")
    # A real process: its stderr writes undecodable names as Python does for a terminal (pytest's capture would not).
    run = subprocess.run([sys.executable, "-m", "retrain", "train", str(photos), "--output", str(tmp_path / "m"),
                          *train_args(tiny, cache)], capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr
    skipped = json.loads((tmp_path / "m" / "metrics.json").read_text(encoding="utf-8"))["skipped_files"]
    assert [os.fsencode(s["path"]) for s in skipped] == [odd]


def test_labels_file_that_is_not_utf8_is_a_one_line_error(model_dir, tmp_path, capsys):
    (tmp_path / "labels.txt").write_bytes(b"ants\n\xff\xfebees\n")
    code, err = run_cli(capsys, "predict", model_dir, tmp_path, "--labels", tmp_path / "labels.txt")
    assert_one_line_error(code, err, "is not UTF-8 text")


@pytest.mark.parametrize("key, value", [("retrain:labels", "not json ["), ("retrain:labels", '{"a": 1}'),
                                        ("retrain:preprocessing", '{"size": "x"}'),
                                        ("retrain:unknown_threshold", "7")])
def test_model_with_damaged_metadata_is_a_one_line_error(model_dir, tmp_path, key, value, capsys):
    import onnx

    model = onnx.load(str(model_dir / "model.onnx"))
    entries = {p.key: p.value for p in model.metadata_props} | {key: value}
    onnx.helper.set_model_props(model, entries)
    onnx.save(model, str(tmp_path / "bad.onnx"))
    code, err = run_cli(capsys, "predict", tmp_path / "bad.onnx", tmp_path)
    assert_one_line_error(code, err, "damaged retrain metadata")


def test_cache_dir_that_is_a_file_is_a_one_line_error(photos, tiny, tmp_path, capsys):
    (tmp_path / "cachefile").write_text("x")
    code, err = run_cli(capsys, "train", photos, "--output", tmp_path / "m", "--backbone", tiny, "--quiet",
                        "--cache_dir", tmp_path / "cachefile")
    assert_one_line_error(code, err, "cachefile")


def test_retrain_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RETRAIN_DEBUG", "1")
    code, err = run_cli(capsys, "train", tmp_path / "no-such-folder", "--output", tmp_path / "m")
    assert code == 2 and "Traceback" in err and "retrain: error: image folder not found" in err


def test_serving_on_a_port_in_use_or_out_of_range_or_an_unusable_cache_is_a_one_line_error(model_dir, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        code, err = run_cli(capsys, "serve", model_dir, "--port", busy.getsockname()[1])
    assert_one_line_error(code, err, "cannot listen on 127.0.0.1", "Address already in use")
    code, err = run_cli(capsys, "serve", model_dir, "--port", 99999)  # bind() would raise OverflowError
    assert_one_line_error(code, err, "port (--port) ", "got 99999")
    code, err = run_cli(capsys, "serve", model_dir, "--cache_dir", "/proc/no-such-cache")  # found at start-up before
    assert_one_line_error(code, err, "--cache_dir /proc/no-such-cache: ")


# ---------------------------------------------------------------- 5. cached backbones are verified

def test_damaged_cached_backbone_is_rebuilt_with_a_note(tiny, tmp_path, photos, capsys):
    backbone = retrain.backbones.get_backbone(str(tiny))
    path = extractor_path(backbone, tmp_path)
    assert path.with_name(path.name + ".sha256").is_file()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights: still parses as ONNX
    path.write_bytes(bytes(data))
    code, err = run_cli(capsys, "train", photos, "--output", tmp_path / "m", "--backbone", tiny, "--quiet",
                        "--cache_dir", tmp_path, "--steps", "20")
    assert code == 0, err
    assert f"Note: the cached {path.name} is damaged (its SHA-256 does not match" in err
    assert path.read_bytes() != bytes(data)


# ---------------------------------------------------------------- 6. the server and stalled clients

@contextmanager
def live_server(model_dir: Path, tmp_path: Path, **limits):
    """A real uvicorn server (in a thread) with the protocol and middleware `retrain serve` uses."""
    import uvicorn

    config = ServeConfig(workspace=str(tmp_path / "workspace"), **limits)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(
        create_app(load(model_dir), config), host="127.0.0.1", port=port, access_log=False, log_config=None,
        http=guarded_protocol(config.header_timeout_s, config.max_connections_per_client, config.max_connections)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    started = time.monotonic()
    while not server.started:
        assert time.monotonic() - started < 30, "server did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(30)


BOUNDARY = "hostileboundary"


def multipart(data: bytes) -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="c.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def half_sent(port: int, source: str = "127.0.0.1") -> socket.socket:
    """The headers of a POST /predict claiming 100,000 body bytes, then four of them, then silence."""
    s = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
    s.sendall((f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
               f"boundary={BOUNDARY}\r\nContent-Length: 100000\r\n\r\n--{BOUNDARY[:2]}").encode())
    return s


def post_predict(port: int, body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/predict", body=body, headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status


def test_64_idle_half_sent_requests_do_not_stop_100_good_ones(model_dir, tmp_path):
    """The issue's done-when: every good request is answered 200 while 64 stalled ones sit open."""
    body = multipart(image_bytes("circles", size=48))
    with live_server(model_dir, tmp_path) as port:
        idle = [half_sent(port, "127.0.0.2") for _ in range(64)]  # another client address, as an attacker's
        try:
            started = time.monotonic()
            statuses = [post_predict(port, body) for _ in range(100)]
            elapsed = time.monotonic() - started
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/metrics")
            metrics = json.loads(conn.getresponse().read())
        finally:
            for s in idle:
                s.close()
    print(f"100 good /predict beside 64 idle half-sent requests: {statuses.count(200)} x 200 in {elapsed:.2f} s")
    assert statuses == [200] * 100
    assert elapsed < ServeConfig().body_timeout_s  # none waited for a stalled request's deadline
    assert metrics["receiving_bodies"] == 64  # all still open, waiting for their bodies
    assert metrics["predict"]["in_flight"] == 0  # yet holding no queue slot


def test_a_body_not_complete_in_time_gets_408_and_the_connection_closes(model_dir, tmp_path):
    with live_server(model_dir, tmp_path, body_timeout_s=0.5) as port:
        s = half_sent(port)
        s.settimeout(10)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
        s.close()
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert b"request body not complete within 0.5 s" in reply


def test_headers_not_complete_in_time_close_the_connection(model_dir, tmp_path):
    with live_server(model_dir, tmp_path, header_timeout_s=0.5) as port:
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
        s.settimeout(10)
        started = time.monotonic()
        assert s.recv(4096) == b""  # closed by the server, no reply
        assert time.monotonic() - started < 5
        s.close()


def test_connections_per_client_are_capped_and_other_clients_still_served(model_dir, tmp_path):
    body = multipart(image_bytes("squares", size=48))
    with live_server(model_dir, tmp_path, max_connections_per_client=3) as port:
        held = [socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.3", 0)) for _ in range(3)]
        extra = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.3", 0))
        extra.settimeout(10)
        try:
            assert extra.recv(4096) == b""  # the fourth from the same address is closed at once
            assert post_predict(port, body) == 200  # another address is served
        finally:
            for s in [*held, extra]:
                s.close()


def test_connections_are_capped_in_all_and_a_freed_one_is_served_again(model_dir, tmp_path):
    body = multipart(image_bytes("squares", size=48))
    with live_server(model_dir, tmp_path, max_connections=4) as port:
        held = [socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.0.{10 + i}", 0))
                for i in range(4)]  # four addresses, one connection each: under the per-client cap
        time.sleep(0.2)  # accepted
        extra = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.20", 0))
        extra.settimeout(10)
        try:
            assert extra.recv(4096) == b""  # a fifth, from yet another address, is closed at once
            held.pop().close()
            time.sleep(0.2)
            assert post_predict(port, body) == 200
        finally:
            for s in [*held, extra]:
                s.close()


def test_client_disconnect_mid_body_is_one_quiet_log_line(model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with live_server(model_dir, tmp_path) as port:
        s = half_sent(port)
        time.sleep(0.2)
        s.close()
        time.sleep(0.5)
        assert post_predict(port, multipart(image_bytes("stripes", size=48))) == 200
    ours = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert len(ours) == 1 and "before sending its whole request" in ours[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_import_idx_refuses_a_pipe_instead_of_waiting(tmp_path, capsys):
    os.mkfifo(tmp_path / "images.idx")
    (tmp_path / "labels.idx").write_bytes(b"")
    with deadline(10):
        code, err = run_cli(capsys, "import-idx", tmp_path / "images.idx", tmp_path / "labels.idx", tmp_path / "out")
    assert_one_line_error(code, err, "cannot read IDX file", "a named pipe, not a regular file")


def test_fine_tuning_that_diverges_stops_and_writes_no_model(photos, cache, tmp_path, monkeypatch, capsys):
    """From-scratch and fine-tuning share one epoch loop: an epoch whose loss is NaN ends the run."""
    import retrain.finetune as finetune_mod

    real = finetune_mod._train_epoch
    monkeypatch.setattr(finetune_mod, "_train_epoch", lambda *a, **k: real(*a, **k) | {"train_loss": float("nan")})
    code, err = run_cli(capsys, "train", photos, "--output", tmp_path / "m", "--backbone", "scratch-small",
                        "--epochs", "3", "--cache_dir", cache, "--quiet")
    assert_one_line_error(code, err, "training diverged at epoch 1", "lower --finetune_learning_rate")
    assert not (tmp_path / "m").exists()  # no model, not even an empty folder


def test_feature_cache_on_a_read_only_disk_is_a_one_line_error(photos, tiny, tmp_path, monkeypatch, capsys):
    import retrain.features as features_mod

    def read_only(self, items):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self.path))
    monkeypatch.setattr(features_mod.FeatureStore, "append", read_only)
    code, err = run_cli(capsys, "train", photos, "--output", tmp_path / "m", "--backbone", tiny, "--quiet",
                        "--cache_dir", tmp_path / "cache")
    assert_one_line_error(code, err, f"cannot use {tmp_path / 'cache'}", "Read-only file system", "write elsewhere")


def test_fine_tuning_that_diverges_stops_within_ten_steps_not_at_the_epochs_end(cache, tmp_path, monkeypatch, capsys):
    import torch.nn.functional as F

    import retrain.finetune as finetune_mod

    data = make_dataset(tmp_path / "photos", per_class=30, classes=("ants", "bees"))  # 48 training photos
    real, calls = F.cross_entropy, []

    def nan_from_the_second_step(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss if len(calls) < 2 else loss * float("nan")
    monkeypatch.setattr(finetune_mod.F, "cross_entropy", nan_from_the_second_step)
    code, err = run_cli(capsys, "train", data, "--output", tmp_path / "m", "--backbone", "scratch-small",
                        "--epochs", "3", "--finetune_batch_size", "2", "--cache_dir", cache, "--quiet")
    assert_one_line_error(code, err, "training diverged at epoch 1", "lower --finetune_learning_rate")
    assert len(calls) <= finetune_mod.CHECK_EVERY + 1 < 24  # an epoch has 24 steps of 2 photos
    assert not (tmp_path / "m").exists()
