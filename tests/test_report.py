"""report.html: self-contained, opens in headless Chromium without errors, every section filled."""
from __future__ import annotations

import functools
import json
import re
import shutil
from html import escape

import numpy as np
import pytest

import retrain
from retrain.api import TrainConfig
from retrain.calibrate import MIN_EVIDENCE
from retrain.cli import retrain_main
from retrain.head import HeadConfig
from retrain.summaries import write_summaries

from conftest import make_dataset, quick_config, real_subset, shared_dataset

SECTIONS = ["dataset", "learning-curves", "confusion-matrix", "per-class-metrics", "worst-mistakes",
            "calibration", "what-the-model-looked-at"]


def check_in_browser(chromium, report, screenshot) -> dict:
    """Open the report offline; return {section id: number of loaded images}; fail on console errors."""
    page = chromium.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: errors.append(f"network request: {r.url}") if not r.url.startswith(("file:", "data:")) else None)
    page.goto(report.as_uri())
    page.screenshot(path=str(screenshot), full_page=True)
    found = {}
    for section in SECTIONS:
        loc = page.locator(f"section#{section}")
        assert loc.count() == 1, f"missing section {section}"
        assert loc.inner_text().strip(), f"empty section {section}"
        found[section] = loc.evaluate("s => [...s.querySelectorAll('img')].filter(i => i.complete && i.naturalWidth > 0).length")
    page.close()
    assert errors == []
    return found


@pytest.mark.browser
def test_report_for_a_generated_dataset(tmp_path, cache_dir, chromium):
    root = make_dataset(tmp_path / "d", per_class=24)
    cfg = TrainConfig(cache_dir=str(cache_dir), quiet=True, head=HeadConfig(steps=200), unknown_threshold="auto",
                      validation_percentage=25, testing_percentage=25)
    out = retrain.train(root, cfg).save(tmp_path / "m")
    html = (out / "report.html").read_text()
    assert not re.search(r'(src|href)="(http|//)', html)  # no external scripts, fonts or images
    for png in ("learning_curves.png", "confusion_matrix.png", "saliency_0.png"):
        assert (out / png).stat().st_size > 1000
    # 18 test photos: too few for a calibration error, so no reliability diagram (see
    # test_a_reliability_diagram_is_drawn_only_on_enough_photos), and the section says so.
    assert not (out / "reliability.png").exists() and "expected calibration error: not measurable on 18" in html
    images = check_in_browser(chromium, out / "report.html", tmp_path / "shot.png")
    assert images["learning-curves"] == 1 and images["confusion-matrix"] == 1 and images["calibration"] == 0
    assert images["what-the-model-looked-at"] >= 2
    assert (tmp_path / "shot.png").stat().st_size > 10_000


def test_report_command_on_another_folder(head_model, tmp_path, capsys):
    shutil.copytree(head_model.folder, tmp_path / "m")
    other = make_dataset(tmp_path / "other", per_class=4, seed=9)
    assert retrain_main(["report", str(tmp_path / "m"), str(other)]) == 0
    html = (tmp_path / "m" / "report.html").read_text()
    assert "N=12" in html and "images of" in html and str(other) in html
    # It opens with a verdict on that folder's photos, and calibration is told as the model has it.
    assert "<h2>Verdict</h2>" in html and f"of the photos in {other}; for comparison" in html
    # Calibration as the model has it; on 12 photos no calibration error is stated (it once was, to 0.1%).
    assert f"Temperature {head_model.model.metrics.calibration.temperature:.3f}; " in html
    assert "expected calibration error: not measurable on 12 photos." in html
    assert "folder this model was trained from" not in html
    assert retrain_main(["report", str(tmp_path / "nothing")]) == 2


def test_a_report_on_the_models_own_training_folder_says_its_accuracy_is_inflated(head_model, shapes_data, tmp_path):
    shutil.copytree(head_model.folder, tmp_path / "m")
    assert retrain_main(["report", str(tmp_path / "m"), str(shapes_data)]) == 0
    html = (tmp_path / "m" / "report.html").read_text()
    assert "is the folder this model was trained from" in html and "accuracy is inflated" in html
    seen = head_model.model.metrics.num_images
    unseen = 48 - seen["train"] - seen["validation"]  # the test split's photos: too few to claim a figure on
    assert f"not measurable on 48 photos, {unseen} of them not trained on" in html
    assert f"Only 48 photos in {shapes_data} ({unseen} not trained on): too few to measure" in html


def test_a_report_on_a_copy_of_the_training_folder_claims_no_figure_on_the_copies(head_model, shapes_data, tmp_path):
    shutil.copytree(head_model.folder, tmp_path / "m")
    shutil.copytree(shapes_data, tmp_path / "copy")  # another path, the same photos: caught by content
    assert retrain_main(["report", str(tmp_path / "m"), str(tmp_path / "copy")]) == 0
    html = (tmp_path / "m" / "report.html").read_text()
    assert "are copies of photos the model trained on" in html and "not trained on): too few to measure" in html
    assert html.count("are copies of photos the model trained on") == 1  # the verdict says it once


def test_tensorboard_summaries(head_model, tmp_path):
    folder = write_summaries(tmp_path / "tb", head_model.model.metrics)
    second = write_summaries(tmp_path / "tb", head_model.model.metrics)  # another run: shown apart, not merged
    assert folder.parent == second.parent == tmp_path / "tb" and folder != second
    assert sorted(p.name for p in (tmp_path / "tb").iterdir()) == sorted([folder.name, second.name])  # no staging left
    events = list((folder / "head").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 100
    from tensorboardX.proto import event_pb2  # read back: the scalars are really there
    import struct

    data, tags = events[0].read_bytes(), set()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        tags |= {v.tag for v in event.summary.value}
        pos += 12 + length + 4
    assert {"accuracy/train", "loss/validation"} <= tags


def rps_model(folder, cache_dir):
    """A head on 40 photos a class of rock_paper_scissors' training/ and testing/ folders (a fixed test split)."""
    subset = real_subset(shared_dataset("rock_paper_scissors"), folder, 40)
    return retrain.train(subset, TrainConfig(cache_dir=str(cache_dir), quiet=True, unknown_threshold="auto",
                                             mode="head"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hymenoptera", "rock_paper_scissors"])
@pytest.mark.browser
def test_report_on_real_data(name, tmp_path, real_model, cache_dir, chromium):
    """hymenoptera: train/ and report on val/; rock_paper_scissors: its own test split."""
    model = real_model(name, "train") if name == "hymenoptera" else rps_model(tmp_path / "rps", cache_dir)
    out = model.save(tmp_path / name, report=False)
    from retrain.report import write_report

    report = write_report(out, shared_dataset(name) / "val" if name == "hymenoptera" else None)
    images = check_in_browser(chromium, report, tmp_path / f"{name}.png")
    assert all(images[s] >= 1 for s in ("learning-curves", "confusion-matrix", "worst-mistakes", "calibration"))
    metrics = json.loads((out / "metrics.json").read_text())
    cal = metrics["calibration"]
    if metrics["num_images"]["test"] >= MIN_EVIDENCE:
        assert cal["test_ece_after"] <= cal["test_ece_before"]  # a temperature is kept only when it helps
    else:  # hymenoptera's train/ holds out ~24 test photos: too few to state a calibration error on
        assert "test_ece_after" not in cal
    assert metrics["verdict"][0].startswith("Right on ") and f"N={metrics['num_images']['test']}" in metrics["verdict"][0]


def test_a_metrics_file_from_a_newer_retrain_is_refused_in_one_line(head_model, tmp_path, capsys):
    shutil.copytree(head_model.folder, tmp_path / "m")
    metrics = json.loads((tmp_path / "m" / "metrics.json").read_text())
    (tmp_path / "m" / "metrics.json").write_text(json.dumps(metrics | {"schema_version": 99}))
    assert retrain_main(["report", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "schema version 99" in err and "upgrade retrain" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m" / "report.html").exists()


def test_the_report_is_titled_with_the_model_folder_not_the_staging_one(head_model, tmp_path):
    out = head_model.model.save(tmp_path / "ants-vs-bees")
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "<title>retrain report: ants-vs-bees</title>" in page and ".retrain-staging" not in page


def test_a_report_drawn_again_for_the_same_model_reuses_its_plots(head_model, tmp_path, monkeypatch):
    """A rerun saves the same model for the same photos: its plots come from the cache, bit for bit."""
    import retrain.report as report

    for copy in ("a", "b"):
        shutil.copytree(head_model.folder, tmp_path / copy)
    report.write_report(tmp_path / "a", cache_dir=tmp_path / "cache")
    drawn = sorted((tmp_path / "cache" / "figures").iterdir())
    assert len(drawn) >= 4  # curves, confusion, reliability, saliency
    for name in ("occlusion_saliency", "learning_curves", "confusion_plot", "reliability_plot"):
        monkeypatch.setattr(report, name, lambda *a, **k: pytest.fail("drawn again"))
    report.write_report(tmp_path / "b", cache_dir=tmp_path / "cache")
    pngs = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert pngs == sorted(p.name for p in (tmp_path / "b").glob("*.png")) and "saliency_0.png" in pngs
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in pngs)
    assert sorted((tmp_path / "cache" / "figures").iterdir()) == drawn


def coarse_saliency(report, monkeypatch) -> None:
    """Saliency maps on a 3x3 grid instead of 7x7 (9 occluded copies a photo, not 49): for tests of when plots are
    drawn, not of what the maps show."""
    monkeypatch.setattr(report, "occlusion_saliency", functools.partial(report.occlusion_saliency, grid=3))


def test_a_changed_model_or_a_damaged_plot_is_drawn_anew(head_model, tmp_path, monkeypatch):
    import onnx
    from onnx import numpy_helper

    import retrain.report as report

    coarse_saliency(report, monkeypatch)
    shutil.copytree(head_model.folder, tmp_path / "m")
    path = tmp_path / "m" / "model.onnx"
    report.write_report(tmp_path / "m", cache_dir=tmp_path / "cache")
    kept = sorted((tmp_path / "cache" / "figures").iterdir())
    calls = []
    real = report.occlusion_saliency
    monkeypatch.setattr(report, "occlusion_saliency", lambda *a: calls.append(1) or real(*a))
    model = onnx.load(path)
    for prop in model.metadata_props:  # the same model made again: only its provenance (and date) differ
        if prop.key == "retrain:provenance":
            prop.value = prop.value.replace('"created": "', '"created": "1999')
    onnx.save(model, path)
    report.write_report(tmp_path / "m", cache_dir=tmp_path / "cache")
    assert calls == []
    for png in kept:
        png.write_bytes(png.read_bytes()[:-20])  # truncated
    report.write_report(tmp_path / "m", cache_dir=tmp_path / "cache")
    assert len(calls) == len(list((tmp_path / "m").glob("saliency_*.png"))) >= 2
    assert all(report._sound_png(p.read_bytes()) for p in kept)
    calls.clear()
    last = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT][-1]
    last.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(last) + np.float32(0.01), last.name))  # another model
    onnx.save(model, path)
    report.write_report(tmp_path / "m", cache_dir=tmp_path / "cache")
    assert len(calls) >= 2  # every saliency map again: they depend on what the model computes


def test_class_names_the_plot_font_cannot_draw_are_numbered_with_a_key(tmp_path, cache_dir):
    """Korean class names: no empty boxes in the plots (matplotlib warns of each missing glyph); the
    page, which the browser draws in any script, names every class."""
    import warnings

    from retrain.report import font_lacks_letters

    root = make_dataset(tmp_path / "d", per_class=12)
    names = {"circles": "원", "squares": "사각형", "stripes": "줄무늬"}
    for old, new in names.items():
        (root / old).rename(root / new)
    model = retrain.train(root, quick_config(cache_dir, validation_percentage=25, testing_percentage=25))
    from dataclasses import replace

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = replace(model, cache_dir=tmp_path / "fresh").save(tmp_path / "m")  # every plot drawn, none reused
    assert not [w for w in caught if "missing from font" in str(w.message)]
    assert len(list((tmp_path / "fresh" / "figures").iterdir())) >= 4
    page = (out / "report.html").read_text(encoding="utf-8")
    classes = model.classes
    assert (f"0 = {classes[0]}, 1 = {classes[1]}, 2 = {classes[2]}" in page) == font_lacks_letters(classes)
    captions = re.findall(r"<figcaption>[^<]*: evidence for <b>([^<]+)</b>", page)
    assert captions and set(captions) <= set(names.values())


def test_a_cache_that_cannot_keep_plots_costs_a_note_not_the_report(head_model, tmp_path, capsys):
    shutil.copytree(head_model.folder, tmp_path / "m")
    (tmp_path / "file").write_text("not a folder")
    assert retrain_main(["report", str(tmp_path / "m"), "--cache_dir", str(tmp_path / "file" / "cache")]) == 0
    captured = capsys.readouterr()
    assert (tmp_path / "m" / "report.html").is_file() and (tmp_path / "m" / "saliency_0.png").is_file()
    assert f"Note: the report's plots could not be kept for reruns (cannot write {tmp_path / 'file' / 'cache' / 'figures'}: " in captured.err
    assert "Not a directory" in captured.err and len(captured.err.splitlines()) == 1


def test_a_report_on_a_folder_names_the_files_it_could_not_read(head_model, tmp_path, capsys):
    shutil.copytree(head_model.folder, tmp_path / "m")
    other = make_dataset(tmp_path / "other", per_class=4, seed=9)
    (other / "circles" / "broken.jpg").write_bytes(b"not a photo")
    assert retrain_main(["report", str(tmp_path / "m"), str(other)]) == 0
    err = capsys.readouterr().err
    assert "Skipped 1 unreadable file(s): circles/broken.jpg (" in err
    page = (tmp_path / "m" / "report.html").read_text()
    assert "Skipped 1 unreadable file(s): circles/broken.jpg (" in page and "Files (or folders) skipped in training: " in page


def test_thumbnails_are_upright_and_decoded_as_for_prediction(tmp_path):
    import base64
    import io

    from PIL import Image

    from retrain.report import _thumbnail

    img = Image.new("RGB", (200, 100), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown rotated a quarter turn
    img.save(tmp_path / "sideways.jpg", exif=exif)
    tag = _thumbnail(str(tmp_path / "sideways.jpg"))
    data = base64.b64decode(re.search(r"base64,([^\"]+)", tag).group(1))
    assert Image.open(io.BytesIO(data)).size == (64, 128)
    (tmp_path / "gray16.png").write_bytes(b"")
    Image.fromarray(np.full((50, 80), 40000, np.uint16)).save(tmp_path / "gray16.png")
    assert "base64," in _thumbnail(str(tmp_path / "gray16.png"))  # 16-bit: shown, not "(image unavailable)"


def test_a_model_without_its_metrics_is_not_given_an_empty_report_over_its_good_one(head_model, tmp_path, capsys):
    shutil.copytree(head_model.folder, tmp_path / "m")
    assert retrain_main(["report", str(tmp_path / "m")]) == 0
    good = (tmp_path / "m" / "report.html").read_bytes()
    (tmp_path / "m" / "metrics.json").unlink()
    assert retrain_main(["report", str(tmp_path / "m")]) == 2
    assert "has no metrics.json" in capsys.readouterr().err
    assert (tmp_path / "m" / "report.html").read_bytes() == good
    other = make_dataset(tmp_path / "other", per_class=4, seed=9)
    assert retrain_main(["report", str(tmp_path / "m"), str(other)]) == 0  # measured on photos: a real report
    assert "N=12" in (tmp_path / "m" / "report.html").read_text()


def test_class_names_with_dollar_signs_are_drawn_as_written(tmp_path, cache_dir):
    """A class folder named "cost $_$" crashed the save at the very end (matplotlib's maths parser), and
    "$x^2$" was drawn as x squared: names are text, and an API user's rcParams are left as they were."""
    import matplotlib

    import retrain.report as report

    root = make_dataset(tmp_path / "d", per_class=12, classes=("circles", "squares"))
    (root / "circles").rename(root / "cost $_$")
    (root / "squares").rename(root / "$x^2$")
    model = retrain.train(root, quick_config(cache_dir, validation_percentage=25, testing_percentage=25))
    out = model.save(tmp_path / "m")
    assert (out / "model.onnx").is_file() and (out / "confusion_matrix.png").stat().st_size > 1000
    assert "cost $_$" in (out / "report.html").read_text(encoding="utf-8")
    [fig] = drawn_figures(report, lambda: report.confusion_plot(np.array([[2, 1], [0, 3]]), ["cost $_$", "$x^2$"]))
    labels = [t for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels()]
    assert {t.get_text() for t in labels} == {"cost $_$", "$x^2$"} and not any(t.get_parse_math() for t in labels)
    assert matplotlib.rcParams["text.parse_math"]


def drawn_figures(report, draw) -> list:
    """The matplotlib figures report.py saves as PNGs while draw() runs, to look at what they show."""
    figures = []
    real = report._png
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(report, "_png", lambda fig: figures.append(fig) or real(fig))
        draw()
    return figures


def test_a_reliability_diagram_is_drawn_only_on_enough_photos(head_model, tmp_path, monkeypatch):
    """An ECE legend on 2-6 photos, and "after temperature scaling" with no temperature: drawn only where an
    ECE is stated (MIN_EVIDENCE photos), one curve as trained where the temperature is 1, N in the legend."""
    import retrain.report as report

    coarse_saliency(report, monkeypatch)
    shutil.copytree(head_model.folder, tmp_path / "m")
    assert not head_model.model.metrics.calibration.calibrated  # 48 photos: too few held out for a temperature
    report.write_report(tmp_path / "m", cache_dir=tmp_path / "cache")  # its own ~5 test photos
    page = (tmp_path / "m" / "report.html").read_text()
    assert not (tmp_path / "m" / "reliability.png").exists() and "reliability diagram" not in page
    assert "expected calibration error: not measurable on" in page
    big = make_dataset(tmp_path / "big", per_class=34, seed=13)  # 102 photos
    figures = drawn_figures(report, lambda: report.write_report(tmp_path / "m", big, cache_dir=tmp_path / "cache"))
    legends = [ax.get_legend() for fig in figures for ax in fig.axes if ax.get_legend()]
    page = (tmp_path / "m" / "report.html").read_text()
    assert (tmp_path / "m" / "reliability.png").stat().st_size > 1000 and "reliability diagram" in page
    assert "expected calibration error on 102 photos: " in page and "% (confidence as trained)" in page
    [legend] = [g for g in legends if g.get_title().get_text()]
    texts = [t.get_text() for t in legend.get_texts()]
    assert legend.get_title().get_text() == "N = 102 photos"
    assert len(texts) == 2 and texts[1].startswith("confidence as trained (ECE ")
    assert "temperature scaling" not in " ".join(texts)


def test_a_report_on_a_folder_says_how_many_of_its_photos_the_models_threshold_flags(shapes_data, cache_dir,
                                                                                     tmp_path):
    model = retrain.train(shapes_data, quick_config(cache_dir, unknown_threshold=0.9))
    out = model.save(tmp_path / "m", report=False)
    other = make_dataset(tmp_path / "other", per_class=4, seed=9)
    assert retrain_main(["report", str(out), str(other)]) == 0
    page = (out / "report.html").read_text()
    from retrain.prediction import Classifier

    flagged = sum(p.unknown for p in Classifier(out / "model.onnx").predict_paths(sorted(other.glob("*/*.jpg"))))
    assert (f"Unknown threshold 0.900 (set by --unknown_threshold): it flags {flagged}/12 photos in {other} as "
            f"unknown ({100 * flagged / 12:.1f}%; 95% CI ") in page


def test_a_report_on_a_folder_shows_per_class_counts_where_a_class_has_few_photos(head_model, tmp_path):
    from retrain.evaluation import FEW_PHOTOS

    shutil.copytree(head_model.folder, tmp_path / "m")
    other = make_dataset(tmp_path / "other", per_class=3, seed=9)
    assert retrain_main(["report", str(tmp_path / "m"), str(other)]) == 0
    page = (tmp_path / "m" / "report.html").read_text()
    table = page[page.index('<section id="per-class-metrics">'):]
    table = table[:table.index("</section>")]
    rows = re.findall(r"<tr><td>(\w+)</td><td>([^<]*)</td><td>([^<]*)</td><td>([^<]*)</td><td>3</td></tr>", table)
    assert len(rows) == 3 and all(re.fullmatch(r"\d/3", recall) and f1 == "n/a" for _, _, recall, f1 in rows)
    assert escape(FEW_PHOTOS) in table and not re.search(r"<td>[01]\.\d{3}</td>", table)


def test_a_new_report_leaves_no_plot_of_an_earlier_one(head_model, tmp_path):
    """A report on a big folder, then one on the model's own few test photos: reliability.png and the
    extra saliency maps of the first would sit beside the second. Other PNGs are the user's: kept."""
    shutil.copytree(head_model.folder, tmp_path / "m")
    m = tmp_path / "m"
    for name in ("reliability.png", "saliency_3.png", "saliency_2.png"):
        (m / name).write_bytes(b"an earlier report's plot")
    (m / "saliency_notes.png").write_bytes(b"the user's")
    (m / "photo.png").write_bytes(b"the user's")
    assert retrain_main(["report", str(m)]) == 0
    page = (m / "report.html").read_text()
    shown = len(re.findall(r'alt="saliency map \d+"', page))
    assert not (m / "reliability.png").exists()
    assert sorted(p.name for p in m.glob("saliency_*.png")) == sorted(
        [f"saliency_{i}.png" for i in range(shown)] + ["saliency_notes.png"])
    assert (m / "photo.png").read_bytes() == b"the user's"
