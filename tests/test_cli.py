"""The classic commands verbatim, the modern CLI, and user errors without tracebacks."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

from retrain.cli import label_image_main, retrain_main

from conftest import shared_dataset

FAST = ["--how_many_training_steps=200", "--quiet"]


@pytest.fixture(scope="module")
def trained(shapes_data, cache_dir, tmp_path_factory):
    """The classic command's model, trained once for the tests that only use it."""
    folder = tmp_path_factory.mktemp("classic")
    graph, labels = folder / "output_graph.onnx", folder / "output_labels.txt"
    assert retrain_main([f"--image_dir={shapes_data}", f"--output_graph={graph}", f"--output_labels={labels}",
                         "--testing_percentage=20", *FAST]) == 0
    return graph, labels


def test_classic_retrain_then_label_image(trained, shapes, capsys):
    graph, labels = trained
    capsys.readouterr()
    image = sorted((shapes / "stripes").iterdir())[0]
    assert label_image_main([f"--graph={graph}", f"--labels={labels}", "--input_layer=Placeholder",
                             "--output_layer=final_result", f"--image={image}"]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 3  # top 5, capped at the number of classes
    names, scores = zip(*(line.rsplit(" ", 1) for line in lines))
    assert names[0] == "stripes" and set(names) == {"circles", "squares", "stripes"}
    assert list(map(float, scores)) == sorted(map(float, scores), reverse=True)
    assert err == ""  # the classic tensor names match: no notes
    # A folder is not an image: the error says which command classifies a folder.
    assert label_image_main([f"--graph={graph}", f"--labels={labels}", f"--image={shapes / 'stripes'}"]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and "retrain predict" in err and "Traceback" not in err


def test_classic_output_graph_replaces_an_earlier_model_but_not_a_file_of_the_users(trained, shapes_data, tmp_path,
                                                                                  capsys):
    notes, labels = tmp_path / "notes.txt", tmp_path / "labels.txt"
    notes.write_text("my notes")  # what an auditor lost: it became an ONNX binary
    argv = [f"--image_dir={shapes_data}", f"--output_labels={labels}", *FAST]
    assert retrain_main([f"--output_graph={notes}", *argv]) == 2
    err = capsys.readouterr().err
    assert "already exists and is not an ONNX model" in err and "Traceback" not in err
    assert notes.read_text() == "my notes" and not labels.exists()
    graph = tmp_path / "graph.onnx"
    graph.write_bytes(trained[0].read_bytes())  # an earlier model: replaced, as retrain.py did
    assert retrain_main([f"--output_graph={graph}", *argv]) == 0
    empty = tmp_path / "made_by_mktemp.onnx"
    empty.touch()  # nothing to lose
    assert retrain_main([f"--output_graph={empty}", *argv]) == 0 and empty.stat().st_size > 1_000_000


def test_classic_defaults_write_to_temp_dir(shapes, cache_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert retrain_main([f"--image_dir={shapes}", *FAST]) == 0
    assert (tmp_path / "output_graph.onnx").stat().st_size > 1_000_000
    assert (tmp_path / "output_labels.txt").read_text().split() == ["circles", "squares", "stripes"]
    assert "Final test accuracy = " in capsys.readouterr().err  # --quiet keeps the result line


def test_final_test_accuracy_line(shapes, cache_dir, tmp_path, capfd):
    retrain_main([f"--image_dir={shapes}", f"--output_graph={tmp_path / 'g.onnx'}",
                  f"--output_labels={tmp_path / 'l.txt'}", "--testing_percentage=25", "--how_many_training_steps=100"])
    err = capfd.readouterr().err
    assert "Train accuracy = " in err and "Validation accuracy = " in err
    # The shapes folder holds 4 validation photos: progress says so, not a bare percentage.
    step = next(l for l in err.splitlines() if "Validation accuracy = " in l)
    assert re.search(r"Validation accuracy = not measurable on \d validation photos \(\d/\d right; 95% CI", step), step
    line = next(l for l in err.splitlines() if l.startswith("Final test accuracy = "))
    assert line.endswith(")") and "(N=" in line


def test_label_image_notes_for_mismatched_compat_flags(trained, shapes, capsys):
    graph, labels = trained
    image = sorted((shapes / "circles").iterdir())[0]
    assert label_image_main([f"--graph={graph}", f"--image={image}", "--input_layer=input",
                             "--input_height=299", "--input_mean=0", "--input_std=255"]) == 0
    err = capsys.readouterr().err
    assert "--input_layer=input ignored" in err
    assert "--input_height=299 ignored" in err and "--input_mean=0 ignored" in err and "--input_std=255 ignored" in err


def test_label_image_rejects_pb_and_missing_files(tmp_path, capsys):
    pb = tmp_path / "output_graph.pb"
    pb.write_bytes(b"\x08\x01")
    assert label_image_main([f"--graph={pb}", f"--image={pb}"]) == 2
    assert "TensorFlow graph" in capsys.readouterr().err
    assert label_image_main([f"--graph={tmp_path / 'nope.onnx'}", "--image=x.jpg"]) == 2
    assert "model not found" in capsys.readouterr().err


def test_the_course_handout_commands_verbatim(trained, shapes_data, capsys):
    """The handout's label_image line: a .pb path, and `--input_layper` (sic), after `retrain --image_dir`."""
    graph, labels = trained
    image = sorted((shapes_data / "squares").iterdir())[0]
    assert label_image_main([f"--graph={graph.parent}/output_graph.pb", f"--labels={labels}", "--input_layper=Placeholder",
                             "--output_layer=final_result", f"--image={image}"]) == 0
    out, err = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines()][0] == "squares" and len(out.splitlines()) == 3
    assert "--input_layper read as --input_layer" in err and f"using {graph}" in err


def test_a_misspelt_label_image_flag_names_the_flag_meant(tmp_path, capsys):
    assert label_image_main(["--grpah=model.onnx", "--image=x.jpg"]) == 2
    assert capsys.readouterr().err == "label_image: error: unrecognized flag --grpah: did you mean --graph?\n"


@pytest.mark.parametrize("argv, wrong, meant", [
    (["train", "photos", "--outptu", "m"], "--outptu", "--output"),  # before argparse asks for the missing --output
    (["predict", "m", "x.jpg", "--topk=3"], "--topk", "--top_k"),
    (["serve", "m", "--prot", "8000"], "--prot", "--port"),
])
def test_a_misspelt_subcommand_flag_names_the_flag_meant(argv, wrong, meant, capsys):
    assert retrain_main(argv) == 2
    assert capsys.readouterr().err == f"retrain: error: unrecognized flag {wrong}: did you mean {meant}?\n"


def test_arguments_after_a_double_dash_are_never_read_as_flags(tmp_path, capsys):
    assert retrain_main(["predict", str(tmp_path / "model"), "--", "--output.jpg"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" not in err and "model not found" in err  # the model is looked at, not the file's name


def test_unknown_and_retired_flags_are_errors(shapes, capsys):
    assert retrain_main([f"--image_dir={shapes}", "--how_many_trainig_steps=10"]) == 2
    err = capsys.readouterr().err
    assert err == ("retrain: error: unrecognized flag --how_many_trainig_steps: "
                   "did you mean --how_many_training_steps?\n")
    with pytest.raises(SystemExit):
        retrain_main([f"--image_dir={shapes}", "--tfhub_module=https://tfhub.dev/x"])
    assert "use --backbone" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no prefix matching: a typo is never silently expanded
        retrain_main([f"--image_dir={shapes}", "--how_many=10"])


def test_distortion_flags_train_on_live_distorted_images(shapes, cache_dir, tmp_path):
    out = tmp_path / "m"
    assert retrain_main(["train", str(shapes), "--output", str(out), "--flip_left_right", "--random_crop=10",
                         "--random_brightness=20", "--epochs=1", *FAST]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "head-live" and [e["epoch"] for e in metrics["finetune"]["history"]] == [0, 1]
    assert metrics["provenance"]["config"]["finetune"]["augment"]["legacy_crop"] == 0.1


def test_bad_distortion_values_are_errors(shapes, capsys):
    assert retrain_main([f"--image_dir={shapes}", "--random_scale=150"]) == 2
    assert "--random_scale is a percentage" in capsys.readouterr().err


def test_modern_train_predict_evaluate(shapes, cache_dir, tmp_path, capsys):
    out = tmp_path / "model"
    assert retrain_main(["train", str(shapes), "--output", str(out), "--steps", "200", "--quiet"]) == 0
    assert (out / "metrics.json").exists()
    capsys.readouterr()
    assert retrain_main(["predict", str(out), str(shapes / "circles"), "--top-k", "2", "--json"]) == 0
    rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert len(rows) == 16 and all(len(r["predictions"]) == 2 for r in rows)
    assert sum(r["predictions"][0]["label"] == "circles" for r in rows) >= 14
    assert retrain_main(["evaluate", str(out), str(shapes), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["accuracy"] >= 0.9 and len(m["confusion_matrix"]) == 3 and "f1" in m["per_class"]["squares"]


def test_predict_reports_unreadable_file_and_keeps_going(trained, shapes, tmp_path, capsys):
    graph, _ = trained
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    good = sorted((shapes / "squares").iterdir())[0]
    assert retrain_main(["predict", str(graph), str(bad), str(good)]) == 1
    out, err = capsys.readouterr()
    assert "bad.jpg: skipped" in err and str(good) in out


@pytest.mark.parametrize("args, message", [
    (["--image_dir=/does/not/exist"], "image folder not found"),
    (["train", "/does/not/exist", "--output", "/tmp/x"], "image folder not found"),
    (["--image_dir=.", "--backbone=resnet9000"], "unknown backbone"),
])
@pytest.mark.subprocess
def test_user_errors_have_no_traceback(args, message):
    proc = subprocess.run([sys.executable, "-m", "retrain", *args], capture_output=True, text=True,
                          env=os.environ | {"PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_one_class_is_an_error(tmp_path, capsys):
    (tmp_path / "only").mkdir()
    assert retrain_main([f"--image_dir={tmp_path}"]) == 2
    assert "at least 2 class folders" in capsys.readouterr().err


@pytest.mark.slow
def test_label_image_without_graph_uses_imagenet(cache_dir, capsys):
    bee = sorted((shared_dataset("hymenoptera") / "val" / "bees").iterdir())[0]
    assert label_image_main([f"--image={bee}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    from retrain.imagenet import imagenet_labels

    names = [line.rsplit(" ", 1)[0] for line in lines]
    assert len(names) == 5 and set(names) <= set(imagenet_labels())
    assert "bee" in names


def test_cache_dir_means_the_same_in_label_image(cache_dir, tmp_path, monkeypatch, capsys):
    """--cache_dir is accepted by every command that reads the cache; here the bundled model is built there."""
    monkeypatch.setenv("RETRAIN_CACHE", str(cache_dir))  # restored after the test, whatever the command sets
    bee = sorted((shared_dataset("hymenoptera") / "val" / "bees").iterdir())[0]
    assert label_image_main([f"--image={bee}", f"--cache_dir={tmp_path / 'other'}"]) == 0
    assert list((tmp_path / "other" / "backbones").glob("*.onnx"))
    assert "bee" in capsys.readouterr().out


@pytest.mark.subprocess
def test_help_gives_each_default_once():
    for command in (["train", "--help"], ["doctor", "--help"], ["serve", "--help"]):
        out = subprocess.run([sys.executable, "-m", "retrain", *command], capture_output=True, text=True).stdout
        assert "(default: None)" not in out and out.count("--cache_dir CACHE_DIR, --cache-dir") == 1, command


@pytest.mark.parametrize("flags", [["--compile"], ["--device", "cpu", "--epochs", "3"], ["--hold_images"],
                                   ["--unfreeze", "2"], ["--resume"]])
def test_live_image_flags_are_refused_in_head_mode(shapes, tmp_path, capsys, flags):
    """--mode head trains on cached features: these flags would otherwise do nothing, silently."""
    assert retrain_main(["train", str(shapes), "--output", str(tmp_path / "m"), "--mode", "head", *flags]) == 2
    err = capsys.readouterr().err
    assert flags[0] in err and "--mode head trains on cached features" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


@pytest.mark.subprocess
def test_help_imports_neither_onnx_runtime_nor_torch():
    """`retrain --help` reads its defaults from config.py; the heavy libraries load only for real work."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "retrain", "--help"], capture_output=True,
                          text=True, check=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "retrain.cli" in imported and "retrain.config" in imported
    assert not imported & {"onnx", "onnxruntime", "torch"}, imported & {"onnx", "onnxruntime", "torch"}
    assert "usage: retrain" in done.stdout


def subcommand_options() -> dict[str, list]:
    """{subcommand: its visible optional actions}, from the parser itself."""
    import argparse

    from retrain.cli import modern_parser

    [sub] = [a for a in modern_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: [a for a in p._actions if a.option_strings and a.dest != "help" and a.help != argparse.SUPPRESS]
            for name, p in sub.choices.items()}


def test_an_option_is_spelt_and_defaulted_the_same_in_every_subcommand():
    seen: dict[str, set] = {}
    for command, actions in subcommand_options().items():
        for a in actions:
            seen.setdefault(a.dest, set()).add((tuple(a.option_strings), repr(a.default) if a.dest != "output" else ""))
    assert {dest: forms for dest, forms in seen.items() if len(forms) > 1} == {}


def test_every_multi_word_option_takes_both_spellings():
    for command, actions in subcommand_options().items():
        for a in actions:
            words = [s[2:] for s in a.option_strings if s.startswith("--")]
            if any("_" in w or "-" in w for w in words):
                assert any("_" in w or w.isalnum() for w in words) and any("-" in w or w.isalnum() for w in words), \
                    (command, a.option_strings)


def test_an_onnx_backbone_named_scratch_is_not_taken_for_a_scratch_one(shapes_data, tmp_path, capsys):
    """Head mode refuses live-image flags for any pretrained backbone, whatever its file is called."""
    assert retrain_main(["train", str(shapes_data), "--output", str(tmp_path / "m"), "--backbone",
                         "scratch_net.onnx", "--mode", "head", "--epochs", "3"]) == 2
    assert "--mode head trains on cached features" in capsys.readouterr().err


def test_a_pb_model_path_is_judged_by_its_content_not_its_name(trained, shapes_data, tmp_path, capsys):
    """`retrain --output_graph=out/v.pb` writes ONNX there: it is used. A missing .pb is not found; a
    TensorFlow GraphDef is named as one."""
    graph, labels = trained
    pb = tmp_path / "v.pb"
    pb.write_bytes(graph.read_bytes())
    image = sorted((shapes_data / "squares").iterdir())[0]
    assert label_image_main([f"--graph={pb}", f"--labels={labels}", f"--image={image}"]) == 0
    assert retrain_main(["predict", str(pb), str(image)]) == 0
    capsys.readouterr()
    assert label_image_main([f"--graph={tmp_path / 'missing.pb'}", f"--image={image}"]) == 2
    assert capsys.readouterr().err == f"label_image: error: model not found: {tmp_path / 'missing.pb'}\n"
    graphdef = tmp_path / "tf.pb"
    graphdef.write_bytes(b"\n\x14\n\x05input\x12\x0bPlaceholder")  # a GraphDef of one NodeDef (name, op)
    assert label_image_main([f"--graph={graphdef}", f"--image={image}"]) == 2
    assert "is a TensorFlow graph; this tool reads ONNX models" in capsys.readouterr().err


def test_a_named_pipe_given_as_image_or_model_is_said_to_be_one(trained, shapes_data, tmp_path, capsys):
    graph, _ = trained
    pipe = tmp_path / "pipe.jpg"
    os.mkfifo(pipe)
    image = sorted((shapes_data / "squares").iterdir())[0]
    assert label_image_main([f"--graph={graph}", f"--image={pipe}"]) == 2
    assert capsys.readouterr().err == f"label_image: error: cannot read image {pipe}: a named pipe, not a regular file\n"
    model = tmp_path / "model.onnx"
    os.mkfifo(model)
    assert label_image_main([f"--graph={model}", f"--image={image}"]) == 2
    assert retrain_main(["predict", str(model), str(image)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{prog}: error: cannot read model {model}: a named pipe, not a regular file" for prog in ("label_image", "retrain")]


def test_classic_outputs_refuse_what_would_destroy_a_users_file_before_training(trained, shapes_data, tmp_path,
                                                                                capsys):
    """--output_labels over a model or a photo, both flags on one file, another tool's ONNX model, a device,
    and a --summaries_dir that is a file: each one line before any training, nothing changed."""
    import hashlib

    graph, labels = trained
    foreign = tmp_path / "their_model.onnx"
    import onnx

    model = onnx.load(graph)
    del model.metadata_props[:]  # an ONNX model retrain did not write
    onnx.save(model, foreign)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(next(shapes_data.rglob("*.jpg")).read_bytes())
    model_copy = tmp_path / "keep.onnx"
    model_copy.write_bytes(graph.read_bytes())
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "afile").write_text("mine")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (foreign, photo, model_copy, tmp_path / "afile")}
    new_graph, new_labels = tmp_path / "g.onnx", tmp_path / "l.txt"
    cases = [
        ([f"--output_graph={new_graph}", f"--output_labels={model_copy}"], "is not a labels file"),
        ([f"--output_graph={new_graph}", f"--output_labels={photo}"], "is not a labels file"),
        ([f"--output_graph={new_labels}", f"--output_labels={new_labels}"], "name the same file"),
        ([f"--output_graph={foreign}", f"--output_labels={new_labels}"], "is an ONNX model retrain did not write"),
        ([f"--output_graph={new_graph}", f"--output_labels={tmp_path / 'pipe'}"], "is a named pipe, not a regular file"),
        ([f"--output_graph={new_graph}", f"--output_labels={new_labels}", f"--summaries_dir={tmp_path / 'afile'}"],
         "--summaries_dir .* is an existing file"),
    ]
    for flags, message in cases:
        assert retrain_main([f"--image_dir={shapes_data}", *flags, *FAST]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and len(err.strip().splitlines()) == 1 and "Training" not in err, err
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before} == before
    assert (tmp_path / "pipe").is_fifo() and not new_graph.exists() and not new_labels.exists()
    labels_copy = tmp_path / "old_labels.txt"
    labels_copy.write_text("earlier\nrun\n")  # an earlier run's labels: replaced, as retrain.py did
    assert retrain_main([f"--image_dir={shapes_data}", f"--output_graph={new_graph}", f"--output_labels={labels_copy}",
                         *FAST]) == 0
    assert labels_copy.read_text().split() == labels.read_text().split()


@pytest.mark.parametrize("argv", [
    ["--image_dir=", "--output_graph=OUT/g.onnx"], ["train", "", "--output", "OUT/m"], ["doctor", " "],
    ["evaluate", "OUT/m", ""], ["predict", "OUT/m", ""], ["report", "OUT/m", ""], ["train", "x", "-o", "OUT/m", "--val_dir="],
])
def test_an_empty_path_argument_is_refused_not_read_as_the_current_folder(argv, tmp_path, capsys):
    """An unset shell variable: the current folder would be walked and hashed whole."""
    with pytest.raises(SystemExit) as exit_:
        retrain_main([a.replace("OUT", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "an empty path (an unset shell variable?)" in err and not list(tmp_path.iterdir())


def test_the_python_api_refuses_an_empty_image_folder_too():
    import retrain
    from retrain.errors import UserError

    with pytest.raises(UserError, match="image_dir must be a folder's path; got ''"):
        retrain.train("")


@pytest.mark.parametrize("argv, hint", [
    (["--image_dir=x", "--how_many_training_steps=abc"], "`retrain --image_dir=DIR --help` lists the options"),
    (["train"], "`retrain train --help` lists the options"),
])
def test_a_wrong_command_line_is_one_line_with_where_to_look(argv, hint, capsys):
    with pytest.raises(SystemExit) as exit_:
        retrain_main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and hint in err and "usage:" not in err


def test_retrain_py_values_that_mean_what_retrain_does_are_accepted(shapes_data, tmp_path, capsys):
    out = [f"--output_graph={tmp_path / 'g.onnx'}", f"--output_labels={tmp_path / 'l.txt'}", "--mode", "head",
           "--how_many_training_steps=30"]
    assert retrain_main([f"--image_dir={shapes_data}", *out, "--test_batch_size=-1", "--validation_batch_size=-1",
                         "--logging_verbosity=ERROR"]) == 0
    err = capsys.readouterr().err
    assert "Final test accuracy" in err and "Found " not in err  # ERROR: quiet, the result lines stay
    with pytest.raises(SystemExit):
        retrain_main([f"--image_dir={shapes_data}", *out, "--test_batch_size=5"])
    assert "--test_batch_size is not supported: every test image is always evaluated" in capsys.readouterr().err


def test_quiet_drops_the_first_models_narration_but_still_saves_it(capsys):
    from retrain.commands import _announced

    saved = []
    _announced(saved.append, "out", True)("head model")
    assert saved == ["head model"] and capsys.readouterr().err == ""
    _announced(saved.append, "out", False)("head model")
    assert "Saved a first model" in capsys.readouterr().err and len(saved) == 2


def test_a_time_budget_out_of_range_is_said_in_the_minutes_it_was_given_in(tmp_path, capsys):
    from retrain.cli import retrain_main

    assert retrain_main(["train", str(tmp_path), "--output", str(tmp_path / "m"), "--time_budget", "1e8"]) == 2
    err = capsys.readouterr().err
    assert "--time_budget must be a number of minutes above 0 and at most 16,666,667; got 100000000.0" in err
    assert "6000000000" not in err  # not the seconds TrainConfig holds
