"""outputs.py: a model folder is replaced whole; what the previous model alone had does not linger beside the new one."""
from __future__ import annotations

import json
from pathlib import Path

from retrain.outputs import MARKER, write_model_dir


def writer(files: dict[str, bytes]):
    def write(folder: Path) -> None:
        for name, data in files.items():
            (folder / name).write_bytes(data)
    return write


def test_files_only_the_previous_model_had_are_removed_and_the_users_stay(tmp_path):
    out = tmp_path / "model"
    write_model_dir(out, writer({"model.onnx": b"old", "saliency_3.png": b"old", "reliability.png": b"old"}), "model")
    (out / "notes.txt").write_text("mine")  # the user's: never listed in the note, never touched
    write_model_dir(out, writer({"model.onnx": b"new"}), "model")
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "model.onnx", "notes.txt"])
    assert (out / "model.onnx").read_bytes() == b"new" and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / MARKER).read_text())["files"] == ["model.onnx"]


def test_a_note_edited_to_name_other_places_removes_nothing_outside_the_folder(tmp_path):
    out, outside = tmp_path / "model", tmp_path / "precious.txt"
    outside.write_text("keep")
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "inner.txt").write_text("keep")
    (out / "dir").mkdir()
    (out / MARKER).write_text(json.dumps({"by_kind": {
        "model": ["../precious.txt", "sub/inner.txt", "..", "", "dir", 3]}}))
    write_model_dir(out, writer({"model.onnx": b"new"}), "model")
    assert outside.read_text() == "keep" and (out / "sub" / "inner.txt").read_text() == "keep"
    assert (out / "dir").is_dir() and (out / "model.onnx").read_bytes() == b"new"
    for damaged in ("not json", "[1, 2]", '{"files": "model.onnx"}', '{"by_kind": {"model": "model.onnx"}}'):
        (out / MARKER).write_text(damaged)
        write_model_dir(out, writer({"labels.txt": b"x"}), "model")
        assert (out / "model.onnx").exists()  # unlisted by a readable note: kept


def test_a_comparison_beside_a_model_leaves_it_and_both_stay_listed(tmp_path):
    # A comparison written into a model's folder (allowed: the folder is retrain's) must not take the model away,
    # and the model written again later still cleans up after itself.
    out = tmp_path / "runs"
    write_model_dir(out, writer({"model.onnx": b"m", "report.html": b"r", "saliency_3.png": b"s"}), "model")
    write_model_dir(out, writer({"compare.txt": b"c"}), "comparison")
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "compare.txt", "model.onnx", "report.html",
                                                            "saliency_3.png"])
    write_model_dir(out, writer({"model.onnx": b"m2", "report.html": b"r2"}), "model")
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "compare.txt", "model.onnx", "report.html"])
    assert json.loads((out / MARKER).read_text())["by_kind"] == {"comparison": ["compare.txt"],
                                                                 "model": ["model.onnx", "report.html"]}


def test_an_export_over_a_model_replaces_the_models_other_files_and_the_other_way(tmp_path):
    out = tmp_path / "shared"
    write_model_dir(out, writer({"model.onnx": b"e", "model.ort": b"o", "export.json": b"{}"}), "export")
    write_model_dir(out, writer({"model.onnx": b"m", "metrics.json": b"{}"}), "model")  # shares model.onnx
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "metrics.json", "model.onnx"])
    write_model_dir(out, writer({"model.onnx": b"e2", "export.json": b"{}"}), "export")
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "export.json", "model.onnx"])


def test_a_note_written_before_kinds_were_recorded_is_read_by_its_files(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    for name in ("model.onnx", "saliency_3.png"):
        (out / name).write_bytes(b"old")
    (out / MARKER).write_text(json.dumps({"written_by": "retrain", "files": ["model.onnx", "saliency_3.png"]}))
    write_model_dir(out, writer({"model.onnx": b"new"}), "model")
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "model.onnx"])


def test_written_files_get_the_umask_or_keep_the_replaced_files_permissions(tmp_path):
    import os
    import stat

    from retrain.files import _UMASK, atomic_write_bytes

    atomic_write_bytes(tmp_path / "new", b"x")
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o666 & ~_UMASK  # not mkstemp's 0600
    os.chmod(tmp_path / "new", 0o640)
    atomic_write_bytes(tmp_path / "new", b"y")
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o640 and (tmp_path / "new").read_bytes() == b"y"


def test_a_file_system_without_modes_still_gets_the_file(tmp_path, monkeypatch):
    import errno
    import os

    from retrain.files import atomic_write_bytes

    def refused(fd, mode):
        raise OSError(errno.EPERM, "Operation not permitted")  # as chmod on a vfat mount answers
    monkeypatch.setattr(os, "fchmod", refused)
    atomic_write_bytes(tmp_path / "m.json", b"{}")
    assert (tmp_path / "m.json").read_bytes() == b"{}"


def test_a_pipe_or_device_at_an_output_path_is_refused_not_replaced(tmp_path):
    import os

    import pytest

    from retrain.errors import UserError
    from retrain.files import atomic_write_bytes
    from retrain.guards import UnsafeFile
    from retrain.outputs import check_output_dir, check_output_file

    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(UserError, match=r"--output_labels .*pipe is a named pipe, not a regular file"):
        check_output_file(tmp_path / "pipe", "--output_labels")
    with pytest.raises(UnsafeFile, match="a named pipe"):
        atomic_write_bytes(tmp_path / "pipe", b"x")
    assert (tmp_path / "pipe").is_fifo()
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match="--summaries_dir .*file is an existing file"):
        check_output_dir(tmp_path / "file", [], True, "--summaries_dir")
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file" / "tb", [], True, "--summaries_dir")
    with pytest.raises(UserError, match=r"--output .*file/model: .*file is a file, not a folder"):
        check_output_dir(tmp_path / "file" / "model", [], False)  # a model folder below a file, as one for summaries
    with pytest.raises(UserError, match="inside"):
        check_output_dir(tmp_path / "photos" / "tb", [tmp_path / "photos"], True, "--summaries_dir")
    check_output_dir(tmp_path / "tb", [], True, "--summaries_dir")


def test_staging_folders_of_killed_writes_on_this_host_are_removed_by_the_next_write(tmp_path):
    import os
    import socket
    import subprocess

    from retrain.outputs import STAGING

    out = tmp_path / "m"
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process that no longer exists, like a run killed with SIGKILL
    host = socket.gethostname()
    abandoned = out / f"{STAGING}{host}-{gone.pid}-abc123"
    live = out / f"{STAGING}{host}-{os.getpid()}-def456"  # a write still going on
    elsewhere = out / f"{STAGING}another-host-{gone.pid}-ghi789"  # on a shared disk: not ours to judge
    for folder in (abandoned, live, elsewhere):
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"half")
    write_model_dir(out, writer({"model.onnx": b"new"}), "model")
    assert not abandoned.exists() and live.exists() and elsewhere.exists()
    assert (out / "model.onnx").read_bytes() == b"new"
