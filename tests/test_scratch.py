"""From-scratch backbones: they learn, export faithfully, reproduce, honour the time budget; `retrain compare`."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import retrain
from retrain import finetune as ft
from retrain.api import TrainConfig
from retrain.backbones import get_backbone
from retrain.cli import retrain_main as main
from retrain.compare import Run, comparison_table, default_models
from retrain.config import scratch_defaults
from retrain.errors import UserError
from retrain.prediction import Classifier

from conftest import draw_shape, make_dataset
from test_finetune import assert_onnx_matches_network


def small_gray_dataset(root: Path, per_class: int = 40, seed: int = 0) -> Path:
    """28x28 grayscale images of three shapes: the kind of data scratch-small is for."""
    rng = np.random.default_rng(seed)
    for kind in ("circles", "squares", "stripes"):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw_shape(kind, rng, 28).convert("L").save(root / kind / f"{i:03d}.png")
    return root


def scratch_config(cache_dir, **kw) -> TrainConfig:
    from dataclasses import replace

    return TrainConfig(backbone="scratch-small", cache_dir=str(cache_dir), quiet=True,
                       scratch=replace(scratch_defaults(), epochs=kw.pop("epochs", 15)), **kw)


def test_scratch_small_learns_and_its_onnx_matches_pytorch(tmp_path, cache_dir, monkeypatch):
    data = small_gray_dataset(tmp_path / "gray")
    kept = {}
    from retrain import scratch

    real = scratch.train_from_scratch
    monkeypatch.setattr(scratch, "train_from_scratch", lambda *a, **k: kept.setdefault("r", real(*a, **k)))
    model = retrain.train(data, scratch_config(cache_dir))
    model.save(tmp_path / "m", report=False)
    metrics = model.metrics
    assert metrics.mode == "scratch" and metrics.backbone == "scratch-small"
    assert metrics.head is None and len(metrics.finetune.history) == 15
    assert metrics.test_accuracy >= 0.8  # three shapes; chance is 0.33

    tuned, _ = kept["r"]
    clf = Classifier(tmp_path / "m" / "model.onnx")
    assert clf.prep.size == 28
    assert_onnx_matches_network(clf, tuned, sorted(data.glob("*/*.png"))[::7])
    # A colour photo of any size goes through the same model (colour averaged, resized to 28).
    photo = tmp_path / "photo.jpg"
    draw_shape("circles", np.random.default_rng(5), 150).save(photo)
    [prediction] = retrain.predict(tmp_path / "m", [photo])
    assert prediction.error is None and len(prediction.top) == 3


def test_scratch_training_is_deterministic(tmp_path, cache_dir):
    data = small_gray_dataset(tmp_path / "gray", per_class=20)
    a = retrain.train(data, scratch_config(cache_dir, epochs=3)).metrics
    b = retrain.train(data, scratch_config(cache_dir, epochs=3)).metrics
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("seconds", "images_per_second")} for e in h]  # noqa: E731
    assert strip(a.finetune.history) == strip(b.finetune.history)
    assert a.test_accuracy == b.test_accuracy


def test_unreadable_images_are_skipped_not_fatal(tmp_path, cache_dir):
    data = small_gray_dataset(tmp_path / "gray", per_class=15)
    (data / "circles" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    model = retrain.train(data, scratch_config(cache_dir, epochs=2))
    assert any(Path(s.path).name == "broken.png" for s in model.metrics.skipped_files)


def test_time_budget_shortens_the_schedule(tmp_path, cache_dir, monkeypatch):
    """A budget smaller than one epoch's time leaves exactly one epoch, and says so."""
    data = small_gray_dataset(tmp_path / "gray", per_class=15)
    logs: list[str] = []
    model = retrain.train(data, scratch_config(cache_dir, epochs=10, time_budget=1e-3), log=logs.append)
    assert len(model.metrics.finetune.history) == 1
    assert any("the schedule now ends after epoch 1 (planned 10)" in line for line in logs)


def test_time_budget_schedule_factor_follows_the_new_length():
    plan = {"epochs": 10}
    factor = ft._schedule(lambda: plan["epochs"] * 4, 0.25)
    assert factor(0) == pytest.approx(1 / 10)  # warm-up over 10 of 40 steps
    plan["epochs"] = 2
    assert factor(1) == pytest.approx(1.0)  # warm-up is now 2 steps
    assert 0 < factor(7) < 0.1 and factor(8) == pytest.approx(0.0)  # the 8-step schedule ends at zero


@pytest.mark.parametrize("flags, message", [
    (["--unfreeze", "2"], "no pretrained layers"),
    (["--train_size", "64"], "trains at its input size"),
    (["--flip_left_right"], "distortion flags"),
])
def test_fine_tuning_flags_that_do_not_apply_are_errors(tmp_path, cache_dir, capsys, flags, message):
    data = small_gray_dataset(tmp_path / "gray", per_class=5)
    rc = main(["train", str(data), "--output", str(tmp_path / "m"), "--backbone", "scratch-small",
               "--cache_dir", str(cache_dir), "--quiet", *flags])
    assert rc != 0 and message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_scratch_backbones_have_no_features_to_cache(cache_dir):
    backbone = get_backbone("scratch_color")  # either spelling
    assert backbone.name == "scratch-color" and not backbone.pretrained and backbone.prep.size == 64
    with pytest.raises(UserError, match="random weights"):
        backbone.write_network(Path("unused.onnx"))


def test_scratch_color_architecture_shapes():
    features = get_backbone("scratch-color").torch_network()
    assert len(features.blocks) == 5 and len(features.dense) == 1  # 5 conv blocks; with the classifier, 2 FC
    out = features.eval()(torch.zeros(2, 3, 64, 64))
    assert out.shape == (2, features.dim)
    small = get_backbone("scratch-small").torch_network()
    assert len(small.blocks) == 3 and len(small.dense) == 0  # 3 conv blocks; the classifier is the 1 FC


def test_comparison_table_times_to_reach_each_others_best():
    slow = Run("scratch-color", "scratch", 0.80, 200, 100.0, [(10.0, 0.5), (50.0, 0.7), (100.0, 0.80)])
    fast = Run("lite0", "head", 0.95, 200, 12.0, [(12.0, 0.95)])
    assert slow.accuracy_at(12.0) == 0.5 and slow.accuracy_at(5.0) is None
    assert fast.time_to(0.80) == 12.0 and slow.time_to(0.95) is None
    table = comparison_table([slow, fast])
    assert "lite0 95.0%: not reached" in table and "scratch-color 80.0%: 12.0 s" in table
    assert "acc @ 12.0 s" in table
    assert ("on the same 200 photos: scratch-color 80.0% (N=200, 95% CI 73-85%); lite0 95.0% (N=200, 95% CI 91-98%)"
            in table)
    few = comparison_table([replace(slow, test_images=6), replace(fast, test_images=6)])
    assert "scratch-color not measurable on 6 photos (5/6 right; 95% CI" in few
    assert "Warning" not in table
    leaked = comparison_table([replace(slow, copies_of_training=1), replace(fast, copies_of_training=1)])
    assert "Warning: 1 of the 200 test photos are copies of photos the model trained on" in leaked  # --quiet too


def test_default_models_follow_image_size(tmp_path):
    assert default_models(small_gray_dataset(tmp_path / "gray", per_class=3)) == ["scratch-small", "lite0"]
    assert default_models(make_dataset(tmp_path / "photos", per_class=3)) == ["scratch-color", "lite0"]


def test_compare_cli_writes_table_json_and_plot(tmp_path, cache_dir, capsys):
    data = small_gray_dataset(tmp_path / "gray", per_class=20)
    out = tmp_path / "cmp"
    rc = main(["compare", str(data), "--output", str(out), "--cache_dir", str(cache_dir), "--quiet",
               "--time_budget", "0.05"])  # 3 s: many epochs of 48 tiny images
    assert rc == 0
    printed = capsys.readouterr().out
    assert "scratch-small" in printed and "lite0" in printed and "time to reach" in printed
    runs = json.loads((out / "compare.json").read_text())
    assert [r["model"] for r in runs] == ["scratch-small", "lite0"]
    for r in runs:
        times = [t for t, _ in r["points"]]
        assert times == sorted(times) and r["seconds"] == times[-1] > 0
        assert r["test_accuracy"] == r["points"][-1][1]
    assert len(runs[0]["points"]) >= 3  # one per epoch, then the exported model
    with Image.open(out / "compare.png") as png:
        assert png.size[0] > 400
    for name in ("scratch-small", "lite0"):
        assert (out / name / "model.onnx").exists() and (out / name / "report.html").exists()


def test_compare_needs_two_models(tmp_path, cache_dir, capsys):
    data = small_gray_dataset(tmp_path / "gray", per_class=3)
    assert main(["compare", str(data), "--models", "lite0", "--output", str(tmp_path / "c")]) != 0
    assert "at least two models" in capsys.readouterr().err


def test_compare_model_suffix_other_than_finetune_is_an_error(tmp_path, cache_dir, capsys):
    data = small_gray_dataset(tmp_path / "gray", per_class=3)
    rc = main(["compare", str(data), "--models", "scratch-small,lite0+fast", "--output", str(tmp_path / "c"),
               "--cache_dir", str(cache_dir), "--quiet", "--time_budget", "0.01"])
    assert rc != 0 and "the only suffix is +finetune" in capsys.readouterr().err


@pytest.fixture
def no_training(monkeypatch) -> None:
    """compare() may not start training any model: each refusal must come before the first one trains."""
    def train(image_dir, config, log, timeline):
        raise AssertionError(f"{config.backbone} started training before the refusal")
    monkeypatch.setattr("retrain.compare.train", train)


def refused(args: list[str], capsys, out: Path) -> str:
    """Run `retrain compare ARGS`; assert a one-line error and nothing written, and return the error."""
    assert main(["compare", *args, "--output", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("retrain: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    return err


@pytest.mark.parametrize("models, says", [
    ("lite0,bogus", ["unknown backbone 'bogus'", "lite0, lite1, lite2, scratch-color, scratch-small"]),
    ("lite0,lite0", ["the same model twice ('lite0' and 'lite0')"]),
    ("lite0,EfficientNet_Lite0", ["the same model twice ('lite0' and 'EfficientNet_Lite0')"]),
    ("scratch-small+finetune,lite0", ["model 'scratch-small+finetune': +finetune fine-tunes a pretrained backbone",
                                      "scratch-small starts from random weights"]),
])
def test_compare_checks_every_model_before_training_any(tmp_path, cache_dir, capsys, no_training, models, says):
    data = small_gray_dataset(tmp_path / "gray", per_class=5)  # a test split: the models are what is wrong
    err = refused([str(data), "--models", models, "--cache_dir", str(cache_dir)], capsys, tmp_path / "out")
    assert all(s in err for s in says), err


@pytest.mark.parametrize("per_class, options, says", [
    (3, [], "none is held out: a class needs 5+ photos before any of it is held out, and circles, squares, stripes "
            "have fewer; add photos (50+ per class), or put held-out photos in val/ and test/ folders beside train/ "
            "(or give --test_dir)"),
    (5, ["--testing_percentage", "0"], "--testing_percentage 0 holds none out"),
    (5, ["--test_dir", "EMPTY"], "the test folder EMPTY holds no readable photo of these classes"),
])
def test_compare_without_test_photos_is_refused_before_training(tmp_path, cache_dir, capsys, no_training,
                                                                per_class, options, says):
    """There would be no accuracy to compare: the table said nan% and compare.json held bare NaN (not JSON)."""
    data = small_gray_dataset(tmp_path / "gray", per_class=per_class)
    empty = tmp_path / "empty test"
    for cls in ("circles", "squares", "stripes"):
        (empty / cls).mkdir(parents=True)
    options = [str(empty) if o == "EMPTY" else o for o in options]
    err = refused([str(data), "--models", "scratch-small,lite0", "--cache_dir", str(cache_dir), *options], capsys,
                  tmp_path / "out")
    assert "compare measures every model on test photos, and " + says.replace("EMPTY", str(empty)) in err, err


def test_compare_whose_test_photos_are_all_unreadable_stops_at_the_first_model(tmp_path, cache_dir, capsys):
    """They hash, so the split has test photos, but none decodes: the first model finds it, and writes nothing."""
    data = small_gray_dataset(tmp_path / "gray", per_class=5)
    broken = tmp_path / "broken test"
    for cls in ("circles", "squares", "stripes"):
        (broken / cls).mkdir(parents=True)
        (broken / cls / "x.png").write_bytes(b"not a photo " + cls.encode())
    out = tmp_path / "out"
    assert main(["compare", str(data), "--models", "lite0,scratch-small", "--test_dir", str(broken), "--output",
                 str(out), "--cache_dir", str(cache_dir), "--quiet", "--time_budget", "0.01"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == ("retrain: error: lite0: none of the test photos could be read, so there is no "
                                    "accuracy to compare; `retrain doctor` lists the unreadable files")
    assert not out.exists()


@pytest.mark.parametrize("user_file", ["notes.txt", "lite0/model.onnx"])
def test_compare_never_writes_over_files_it_did_not_write(tmp_path, capsys, user_file):
    from retrain.outputs import MARKER

    data = small_gray_dataset(tmp_path / "gray", per_class=3)
    out = tmp_path / "out"
    mine = out / user_file
    mine.parent.mkdir(parents=True)
    mine.write_text("the user's own")
    if mine.parent != out:  # a comparison's folder, but a model's folder in it holds the user's file
        (out / MARKER).write_text("{}")
    before = sorted(p.name for p in out.iterdir())
    assert main(["compare", str(data), "--models", "scratch-small,lite0", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds files retrain did not write" in err and "--overwrite" in err and "Traceback" not in err
    assert str(mine.parent) in err
    assert mine.read_text() == "the user's own" and sorted(p.name for p in out.iterdir()) == before  # nothing written


def test_a_comparison_stopped_part_way_can_be_run_again(tmp_path, cache_dir):
    """Only a model folder of an earlier, interrupted compare is there: that folder is retrain's. (Five photos a
    class: the fewest that hold one out for testing.)"""
    from retrain.outputs import write_model_dir

    data = small_gray_dataset(tmp_path / "gray", per_class=5)
    write_model_dir(tmp_path / "out" / "scratch-small", lambda folder: (folder / "model.onnx").write_bytes(b"x"),
                    "model")
    assert main(["compare", str(data), "--models", "scratch-small,lite0", "--output", str(tmp_path / "out"),
                 "--cache_dir", str(cache_dir), "--quiet", "--time_budget", "0.02"]) == 0
    runs = json.loads((tmp_path / "out" / "compare.json").read_text(),  # strict JSON: no bare NaN
                      parse_constant=lambda name: pytest.fail(f"compare.json holds {name}"))
    assert [r["model"] for r in runs] == ["scratch-small", "lite0"] and all(r["test_images"] > 0 for r in runs)


def test_a_comparison_may_replace_its_own_files(tmp_path):
    from retrain.compare import write_comparison
    from retrain.outputs import check_output_dir

    runs = [Run("scratch-small", "scratch", 0.5, 10, 2.0, [(1.0, 0.4), (2.0, 0.5)]),
            Run("lite0", "head", 0.9, 10, 1.0, [(1.0, 0.9)])]
    write_comparison(runs, tmp_path / "out")
    check_output_dir(tmp_path / "out", [], overwrite=False)  # retrain's: a rerun may write here
    write_comparison(runs[::-1], tmp_path / "out")
    assert json.loads((tmp_path / "out" / "compare.json").read_text())[0]["model"] == "lite0"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".retrain-staging")]


def test_compare_called_with_settings_one_model_would_ignore_trains_none(tmp_path, cache_dir, no_training):
    from retrain.compare import compare
    from retrain.config import HeadConfig, TrainConfig
    from retrain.errors import UserError

    data = small_gray_dataset(tmp_path / "gray", per_class=5)
    config = TrainConfig(cache_dir=str(cache_dir), quiet=True, head=HeadConfig(hidden_units=64))
    with pytest.raises(UserError, match="model 'scratch-small': --hidden_units"):
        compare(data, ["lite0", "scratch-small"], config, tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_an_onnx_backbone_in_compare_gets_a_folder_inside_the_output_named_by_its_file(tiny, tmp_path):
    from conftest import bench_scale
    from retrain.compare import contenders

    entries = contenders(["lite0", str(tiny), f"{tiny}+finetune"])
    assert [e.folder for e in entries] == ["lite0", "tiny", "tiny+finetune"]  # not the path: output / path escaped it
    (tmp_path / "other").mkdir()
    another = bench_scale().tiny_backbone(tmp_path / "other" / "tiny.onnx", size=32)  # another network, same name
    with pytest.raises(UserError, match="names the same model twice"):  # two files named alike: one folder, refused
        contenders([str(tiny), str(another)])
    spaced, underscored = tmp_path / "a b.onnx", tmp_path / "a_b.onnx"  # two networks, both saved as a_b
    spaced.write_bytes(tiny.read_bytes())
    underscored.write_bytes(tiny.read_bytes())
    with pytest.raises(UserError, match="would both be saved as a_b"):
        contenders([str(spaced), str(underscored)])


def test_compare_checks_an_onnx_models_folder_as_it_will_be_named(tiny, tmp_path, capsys):
    from retrain.outputs import MARKER

    data = small_gray_dataset(tmp_path / "gray", per_class=3)
    out = tmp_path / "out"
    (out / "tiny").mkdir(parents=True)
    (out / "tiny" / "notes.txt").write_text("the user's own")
    (out / MARKER).write_text("{}")
    assert main(["compare", str(data), "--models", f"lite0,{tiny}", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds files retrain did not write" in err and str(out / "tiny") in err
    assert (out / "tiny" / "notes.txt").read_text() == "the user's own"


def test_a_time_budget_no_model_of_the_comparison_reads_is_refused(tmp_path, cache_dir, no_training):
    from retrain.compare import compare
    from retrain.config import TrainConfig

    data = small_gray_dataset(tmp_path / "gray", per_class=5)
    with pytest.raises(UserError, match="--time_budget: only the models that train from random weights"):
        compare(data, ["lite0", "lite1"], TrainConfig(cache_dir=str(cache_dir), quiet=True, time_budget=60),
                tmp_path / "out", log=lambda m: None)


def test_a_model_name_with_dollar_signs_is_drawn_as_written_in_the_comparison_plot(tmp_path, monkeypatch):
    """The legend names each model as the user wrote it: "cost $_$.onnx" crashed matplotlib's maths parser
    after every model had trained, and "$x^2$" would be drawn as x squared."""
    import matplotlib
    import matplotlib.pyplot as plt

    from retrain.compare import write_comparison

    legends = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: legends.extend(ax.get_legend() for ax in fig.axes) or
                        real_close(fig))
    runs = [Run("models/cost $_$.onnx", "head", 0.5, 10, 2.0, [(1.0, 0.4), (2.0, 0.5)]),
            Run("$x^2$", "head", 0.9, 10, 1.0, [(1.0, 0.9)])]
    write_comparison(runs, tmp_path / "out")
    with Image.open(tmp_path / "out" / "compare.png") as png:
        assert png.size[0] > 400
    texts = [t for legend in legends for t in legend.get_texts()]
    assert [t.get_text().split(" (")[0] for t in texts] == ["models/cost $_$.onnx", "$x^2$"]
    assert not any(t.get_parse_math() for t in texts) and matplotlib.rcParams["text.parse_math"]
